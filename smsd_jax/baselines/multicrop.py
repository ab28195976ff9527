"""DINO's image multi-crop, on the device: pure functions of a key and a batch of images.

Each crop is a random resized crop (a box of random area and aspect ratio, resampled
bilinearly to the crop's size), then an optional left-right flip and contrast change, the
same photometric changes that `data.Augment` makes at the sites. Global crops are what
teacher and student both see; local crops are smaller, for the student only.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax.distill import Views

# Aspect ratios (width / height) of a crop box, drawn log-uniformly (torchvision's default).
_RATIO = (3 / 4, 4 / 3)


def _crop_box(key: jax.Array, height: int, width: int, scale: tuple[float, float]
              ) -> tuple[jax.Array, jax.Array]:
    """A random box: (top, left) `[2]` and (box height, box width) `[2]`, in pixels (float).

    The area is a fraction of the image drawn uniformly from `scale`, the aspect ratio
    log-uniformly from `_RATIO`. A side longer than the image is cut to the image and the
    other side lengthened to keep the area where it fits (torchvision draws again instead,
    which would need a loop); a box of the whole area is the whole image.
    """
    k_area, k_ratio, k_offset = jax.random.split(key, 3)
    area = jax.random.uniform(k_area, minval=scale[0], maxval=scale[1]) * height * width
    ratio = jnp.exp(jax.random.uniform(k_ratio, minval=np.log(_RATIO[0]),
                                       maxval=np.log(_RATIO[1])))
    box_w = jnp.minimum(jnp.sqrt(area * ratio), width)
    box_h = jnp.minimum(area / box_w, height)
    box = jnp.stack([box_h, jnp.minimum(area / box_h, width)])
    corner = jax.random.uniform(k_offset, (2,)) * (jnp.array([height, width]) - box)
    return corner, box


def random_resized_crop(key: jax.Array, image: jax.Array, size: int,
                        scale: tuple[float, float]) -> jax.Array:
    """image `[H, W, C]` -> a random box of it resampled to `[size, size, C]` (bilinear,
    antialiased when the box is larger than `size`)."""
    height, width, channels = image.shape
    corner, box = _crop_box(key, height, width, scale)
    factor = size / box  # output pixels per input pixel, per axis
    return jax.image.scale_and_translate(image, (size, size, channels), (0, 1), factor,
                                         -corner * factor, method="linear")


def photometric(key: jax.Array, crop: jax.Array, *, flip: bool, contrast: float) -> jax.Array:
    """crop `[h, w, C]` in [0, 1] -> flipped left-right with probability 1/2 (if `flip`), and
    its deviations from its per-channel mean scaled by a factor drawn uniformly from
    `[1 - contrast, 1 + contrast]`, clipped to [0, 1] (as `data.Augment`)."""
    k_flip, k_contrast = jax.random.split(key)
    if flip:
        crop = jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)
    if contrast:
        factor = jax.random.uniform(k_contrast, minval=1 - contrast, maxval=1 + contrast)
        mean = crop.mean(axis=(0, 1), keepdims=True)
        crop = jnp.clip((crop - mean) * factor + mean, 0.0, 1.0)
    return crop


def _crops(key: jax.Array, images: jax.Array, count: int, size: int,
           scale: tuple[float, float], flip: bool, contrast: float) -> jax.Array:
    """images `[B, H, W, C]` -> `count` independent crops of each `[B, count, size, size, C]`."""
    def one(crop_key, image):
        k_crop, k_photo = jax.random.split(crop_key)
        crop = random_resized_crop(k_crop, image, size, scale)
        return photometric(k_photo, crop, flip=flip, contrast=contrast)

    keys = jax.random.split(key, (images.shape[0], count))
    return jax.vmap(jax.vmap(one, in_axes=(0, None)))(keys, images)


def multicrop(key: jax.Array, images: jax.Array, *, global_size: int, local_size: int,
              num_local: int, global_scale: tuple[float, float],
              local_scale: tuple[float, float], flip: bool = True, contrast: float = 0.0
              ) -> Views:
    """DINO's views of each image: 2 global crops and `num_local` local crops.

    Args:
      key: a `jax.random` key; the same key gives the same crops.
      images: `[B, H, W, C]` float in [0, 1].
      global_size, local_size: side in pixels of a global / local crop.
      num_local: local crops per image (0 for none).
      global_scale, local_scale: (min, max) fraction of the image's area in a crop's box.
      flip, contrast: the photometric changes of each crop (see `photometric`).

    Returns:
      `Views` with `global_views [B, 2, global_size, global_size, C]` and `local_views
      [B, num_local, local_size, local_size, C]` (None when `num_local` is 0), float32 in
      [0, 1]; every crop is drawn independently.
    """
    chex.assert_rank(images, 4)
    images = images.astype(jnp.float32)
    k_global, k_local = jax.random.split(key)
    crops = functools.partial(_crops, images=images, flip=flip, contrast=contrast)
    global_views = crops(k_global, count=2, size=global_size, scale=global_scale)
    if not num_local:
        return Views(global_views, None)
    return Views(global_views, crops(k_local, count=num_local, size=local_size,
                                     scale=local_scale))
