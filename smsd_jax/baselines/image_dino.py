"""Image DINO, what both baselines train: standard DINO on raw images, the whole ViT trained.

The baselines run SMSD's own distillation step (`distill.make_distill_step`), optimizer and
schedules from `config.server` (lr, temperatures, momenta, out_dim, batch size, clipping,
weight decay, last-layer freeze), so that the methods differ only in their views and in what
is trained: here the views are image multi-crops (`multicrop`, drawn on the device inside the
jitted step) and the head (patch and position embedding) is trained with the body and the
DINO head. Per image, multi-crop costs more FLOPs than SMSD's token views (a 28 px global crop
is all 49 tokens, where SMSD's global view keeps 0.75 of the 24 tokens a site sent): the FLOPs
are measured and reported, not matched.

Every run is a set of sites (centralized DINO: one site holding the pooled images); site `k`
draws its batches and crops from seeds derived from `seed` and `k` alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax import cost, data, distill, models
from smsd_jax.baselines import multicrop
from smsd_jax.errors import NotFiniteError, SMSDError


class Pretrained(NamedTuple):
    """A pre-trained ViT and what it cost; `head` and `body` run on full images downstream.

    head, head_params: `ViTHead` for `config.data.image_size` and the teacher's head params.
    body, body_params: `ViTBody` and the teacher's body params (as SMSD's server exports).
    images_seen: images processed in pre-training, over all sites and rounds.
    steps: training steps, over all sites and rounds.
    server_flops, client_flops_per_site: FLOPs (XLA's count) spent at the server / each site.
    upload_bytes_per_site, download_bytes_per_site: bytes each site sends / receives.
    wall_s: seconds of the whole pre-training (compilation included).
    history: one dict per round (FedAvg) or epoch (centralized): loss, teacher entropy, ...
    """
    head: models.ViTHead
    head_params: Any
    body: models.ViTBody
    body_params: Any
    images_seen: int
    steps: int
    server_flops: float
    client_flops_per_site: list[float]
    upload_bytes_per_site: list[int]
    download_bytes_per_site: list[int]
    wall_s: float
    history: list[dict]


class ImageDINO(NamedTuple):
    """What one image-DINO run trains with.

    step: jitted `(state, images [B, H, W, C] float32 in [0, 1], key) -> (state, metrics)`;
      it donates `state`.
    state: the initial state (student = teacher, centre 0).
    step_flops: XLA's FLOP count of one step.
    """
    step: Callable
    state: distill.DistillState
    step_flops: float


def num_local(config) -> int:
    """Local crops per image: `config.baselines.num_local`, or SMSD's number when it is -1."""
    n = config.baselines.num_local
    return config.server.num_local if n < 0 else n


def views_fn_from_config(config) -> Callable[[jax.Array, jax.Array], distill.Views]:
    """`views_fn(key, images [B, H, W, C] in [0, 1]) -> Views` of crops normalised with
    `config.data.mean` and `std`: 2 global crops of `image_size`, local crops of
    `config.baselines.local_size`."""
    b, d = config.baselines, config.data
    crop = functools.partial(
        multicrop.multicrop, global_size=d.image_size, local_size=b.local_size,
        num_local=num_local(config), global_scale=tuple(b.global_scale),
        local_scale=tuple(b.local_scale), flip=b.flip, contrast=b.contrast)

    def views_fn(key: jax.Array, images: jax.Array) -> distill.Views:
        views = crop(key, images)
        return distill.Views(*((v - d.mean) / d.std if v is not None else None for v in views))

    return views_fn


def init_key(seed: int) -> jax.Array:
    """The key of the initial parameters of a run of seed `seed` (every site starts there)."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def site_seeds(seed: int, site: int) -> tuple[int, jax.Array]:
    """Site `site`'s data seed (batch order) and step key (crops) in a run of seed `seed`."""
    return seed + site, jax.random.fold_in(jax.random.key(seed), site + 1)


# The compiled pieces of a run by (config, schedule length): runs that differ only in their
# seed or images (a study's seeds, FedAvg's rounds) compile their step once.
_COMPILED: dict[tuple[str, int, int], tuple] = {}


def _compiled(config, total_steps: int, steps_per_epoch: int) -> tuple:
    """`(init, step, step_flops)` of `config`; `init(key)` and `step` are jitted."""
    cache_key = (config.to_json_best_effort(sort_keys=True), total_steps, steps_per_epoch)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    config = config.copy_and_resolve_references()  # what the step is traced with, frozen
    cfg, d = config.server, config.data
    net = models.image_dino_net_from_config(config)
    schedules = distill.make_schedules(cfg, total_steps, steps_per_epoch)
    tx = distill.make_optimizer(cfg, schedules)
    image_shape = (d.image_size, d.image_size, d.channels)
    # Jitted: one compilation is faster than running the initialisers op by op.
    init = jax.jit(lambda key: distill.init_state(key, net, tx, image_shape))
    step = distill.make_distill_step(net, tx, schedules, cfg, views_fn_from_config(config))
    step = jax.jit(step, donate_argnums=0)
    state = jax.eval_shape(init, jax.random.key(0))
    batch = jax.ShapeDtypeStruct((cfg.batch_size, *image_shape), jnp.float32)
    flops = cost.compiled_flops(step, state, batch, jax.random.key(0))
    _COMPILED[cache_key] = (init, step, flops)
    return _COMPILED[cache_key]


def build(config, *, total_steps: int, steps_per_epoch: int, seed: int) -> ImageDINO:
    """The network, optimizer, jitted step and initial state of a run of `total_steps` steps
    (the schedules' length; `steps_per_epoch` converts the config's epochs to steps)."""
    init, step, flops = _compiled(config, total_steps, steps_per_epoch)
    return ImageDINO(step, init(init_key(seed)), flops)


def batches_per_epoch(sizes: list[int], batch_size: int, names: list[str]) -> list[int]:
    """Full batches in one pass over each site's images.

    Raises:
      ValueError: a site holds fewer images than one batch (it could not take a step).
    """
    for size, name in zip(sizes, names):
        if size < batch_size:
            raise SMSDError(f"{name} has {size} images, fewer than one batch of "
                            f"config.server.batch_size={batch_size}; lower the batch size or "
                            "give the site more images")
    return [size // batch_size for size in sizes]


def batches(config, source, indices, *, seed: int, start: int, stop: int
            ) -> Iterator[np.ndarray]:
    """Batches `start` to `stop` of the endless stream of `source[indices]` (reshuffled each
    epoch): images `[batch_size, H, W, C]` float32 in [0, 1]."""
    stream = data.labelled_dataset(source, indices, batch_size=config.server.batch_size,
                                   seed=seed, shuffle=True, num_epochs=None,
                                   drop_remainder=True)
    return (batch["image"] for batch in stream[start:stop].to_iter_dataset())


def train(dino: ImageDINO, state: distill.DistillState, images: Iterator[np.ndarray],
          key: jax.Array, where: str) -> tuple[distill.DistillState, dict[str, np.ndarray]]:
    """Runs the step on each batch of `images`; returns the state and the metrics `[steps]`.

    Raises:
      FloatingPointError: the loss became non-finite (names `where` and the step).
    """
    per_step = []
    for batch in images:
        state, metrics = dino.step(state, batch, key)
        per_step.append(metrics)
    # Read once at the end: a read per step would stall the asynchronous dispatch.
    metrics = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(per_step))
    bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
    if bad.size:
        raise NotFiniteError(f"{where}: the DINO loss is not finite from local step "
                             f"{bad[0]}; lower config.server.lr or use float32")
    return state, metrics


def summary(metrics: dict[str, np.ndarray]) -> dict:
    """Means of the loss and teacher entropy over a chunk of steps, as Python floats."""
    return dict(loss=float(np.mean(metrics["loss"])),
                teacher_entropy=float(np.mean(metrics["teacher_entropy"])))


def progress(name: str, done: int, total: int, row: dict, elapsed_s: float,
             out_dim: int) -> str:
    """One line: where the run is, the `row`'s loss, teacher entropy (of its maximum,
    ln(out_dim)) and images/s, and the time left at the speed so far."""
    eta = elapsed_s / done * (total - done)
    return (f"{name} {done}/{total}: loss {row['loss']:.4f}, teacher entropy "
            f"{row['teacher_entropy']:.3f} of {math.log(out_dim):.3f}, "
            f"{row['images_per_s']:.0f} img/s, ETA {eta:.0f} s")


def image_bytes(source, indices) -> int:
    """Bytes of the raw images `source[indices]` (what a site would upload to pool them)."""
    if len(indices) == 0:
        return 0
    return int(source[int(indices[0])]["image"].nbytes) * len(indices)


def from_teacher(config, teacher, **cost) -> Pretrained:
    """The teacher's head and body (on the host) as a `Pretrained`, with `cost`'s fields."""
    teacher = jax.device_get(teacher)
    return Pretrained(head=models.head_from_config(config), head_params=teacher["head"],
                      body=models.body_from_config(config), body_params=teacher["body"],
                      **cost)

