"""grain transforms and pipelines: numpy in, numpy out, one record at a time.

Randomness comes only from the `np.random.Generator` that grain hands to
`random_map`; grain derives it from the dataset seed and the element's index, so a
pipeline gives bitwise-identical batches every time it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grain
import numpy as np

from smsd_jax.data.sources import Source


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """Random flip, translation and contrast of a float32 image [H, W, C] in [0, 1].

    flip: mirror left-right with probability 1/2.
    max_shift: translate by up to this many pixels on each axis, filling with zeros.
    contrast: scale deviations from the per-channel image mean by a factor drawn
      uniformly from [1 - contrast, 1 + contrast].
    As a grain transform it maps a record's "image" and keeps its other keys.
    """

    flip: bool = False
    max_shift: int = 0
    contrast: float = 0.0

    def __post_init__(self):
        if self.max_shift < 0 or not 0 <= self.contrast <= 1:
            raise ValueError(f"Augment needs max_shift >= 0 and contrast in [0, 1], got {self}.")

    def image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 [H, W, C] -> float32 [H, W, C]."""
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.max_shift:
            s = self.max_shift
            dy, dx = rng.integers(-s, s + 1, size=2)
            height, width = image.shape[:2]
            padded = np.pad(image, ((s, s), (s, s), (0, 0)))
            image = padded[s + dy: s + dy + height, s + dx: s + dx + width]
        if self.contrast:
            factor = rng.uniform(1 - self.contrast, 1 + self.contrast)
            mean = image.mean(axis=(0, 1), keepdims=True)
            # Clipped so that augmented inputs stay in the [0, 1] range the head sees at test time.
            image = np.clip((image - mean) * factor + mean, 0.0, 1.0)
        return np.ascontiguousarray(image, np.float32)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "image": self.image(element["image"], rng)}


def augment_from_config(config: Mapping | Augment | None) -> Augment:
    """An `Augment` from a config mapping with keys flip, max_shift, contrast (None: identity)."""
    if isinstance(config, Augment):
        return config
    config = dict(config or {})
    known = {field.name for field in dataclasses.fields(Augment)}
    if not set(config) <= known:
        raise ValueError(
            f"unknown augment options {sorted(set(config) - known)}; use {sorted(known)}.")
    return Augment(**config)


class ToFloat(grain.transforms.Map):
    """A record's "image" uint8 [H, W, C] -> float32 [H, W, C] in [0, 1]."""

    def map(self, element: dict) -> dict:
        return {**element, "image": np.asarray(element["image"], np.float32) / np.float32(255)}


@dataclasses.dataclass(frozen=True)
class SiteSamples(grain.transforms.RandomMap):
    """`{"image": float32 [H, W, C], "label"}` -> `{"images": float32 [M, H, W, C]}`.

    M independently augmented copies of one image. The label is dropped on purpose: a
    site's payload never carries labels.
    """

    num_samples: int
    augment: Augment = Augment()

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        copies = [self.augment.image(image, rng) for _ in range(self.num_samples)]
        return {"images": np.stack(copies)}


class _Subset:
    """The records of `source` at `indices`, in that order (a grain random-access source)."""

    def __init__(self, source: Source, indices):
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"{source.name}: indices must be a non-empty integer array, got"
                             f" {indices.dtype} {indices.shape}.")
        if indices.min() < 0 or indices.max() >= len(source):
            raise ValueError(
                f"{source.name}: indices span [{indices.min()}, {indices.max()}] but the source"
                f" has {len(source)} records; was the partition made for this source?")
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return self._indices.size

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._indices[index])]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")


def site_dataset(source: Source, indices, *, num_samples: int, augment: Mapping | Augment | None,
                 batch_size: int, seed: int) -> grain.MapDataset:
    """Batches `{"images": float32 [b, M, H, W, C]}` over `indices` in order, for encoding.

    No shuffle (a site encodes each image once): batch i holds indices[i*b:(i+1)*b], the
    last batch may be smaller. The augmentation of the j-th image depends only on `seed`
    and j, so re-running gives identical batches.
    """
    _check_batch_size(batch_size)
    samples = SiteSamples(num_samples, augment_from_config(augment))
    return (grain.MapDataset.source(_Subset(source, indices)).seed(seed)
            .map(ToFloat()).random_map(samples).batch(batch_size))


def labelled_dataset(source: Source, indices, *, batch_size: int, seed: int,
                     augment: Mapping | Augment | None = None, shuffle: bool = False,
                     num_epochs: int | None = 1,
                     drop_remainder: bool = False) -> grain.MapDataset:
    """Batches `{"image": float32 [b, H, W, C], "label": int32 [b]}` for fine-tuning/probes.

    `shuffle` draws a new order each epoch; `num_epochs=None` repeats forever. Call
    `.to_iter_dataset()` on the result for prefetching.
    """
    _check_batch_size(batch_size)
    ds = grain.MapDataset.source(_Subset(source, indices)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs).map(ToFloat())
    if augment:
        ds = ds.random_map(augment_from_config(augment))
    return ds.batch(batch_size, drop_remainder=drop_remainder)
