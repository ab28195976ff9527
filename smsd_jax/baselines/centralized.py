"""Centralized DINO: image DINO on the pooled raw images of all sites, the upper bound that
privacy forbids (docs/method.md, "Baselines").

It runs `config.server.epochs` epochs over the pooled images, as SMSD's server does over the
pooled payloads, so both methods see the same number of images. Its cost: each site uploads
its raw images once and downloads the trained head and body once; all training FLOPs are the
server's.
"""

from __future__ import annotations

import math
import time

import numpy as np

from smsd_jax import cost
from smsd_jax.baselines import image_dino
from smsd_jax.errors import SMSDError


def pretrain_centralized(config, source, indices, *, seed: int,
                         site_indices: list[np.ndarray] | None = None
                         ) -> image_dino.Pretrained:
    """Image DINO on `source[indices]` for `config.server.epochs` epochs.

    Args:
      config: `config.server` gives the DINO hyperparameters and batch size (SMSD's server's),
        `config.baselines` the multi-crop.
      source, indices: the pooled images.
      seed: the run's seed (initialisation, batch order, crops).
      site_indices: how `indices` were split over the sites, for the per-site bytes only
        (training sees the pooled images); default: one site holding them all.

    Prints one line per epoch.

    Raises:
      ValueError: fewer images than one batch, or `site_indices` that do not add up to
        `indices`.
      FloatingPointError: a non-finite loss (names the epoch).
    """
    start = time.perf_counter()
    cfg = config.server
    indices = np.asarray(indices)
    site_indices = [indices] if site_indices is None else site_indices
    if sum(map(len, site_indices)) != len(indices):
        raise SMSDError(f"site_indices hold {sum(map(len, site_indices))} images but indices "
                        f"hold {len(indices)}; pass the sites whose images were pooled")
    (per_epoch,) = image_dino.batches_per_epoch([len(indices)], cfg.batch_size,
                                                ["the pooled data"])
    total = max(1, int(round(cfg.epochs * per_epoch)))
    print(f"centralized: {len(indices)} pooled images, {cfg.epochs:g} epochs of {per_epoch} "
          f"steps")
    dino = image_dino.build(config, total_steps=total, steps_per_epoch=per_epoch, seed=seed)
    # The pooled images are site 0's of a one-site run: the same seeds as FedAvg's site 0.
    data_seed, key = image_dino.site_seeds(seed, 0)
    state, history, epochs = dino.state, [], math.ceil(total / per_epoch)
    for epoch in range(epochs):
        first, stop = epoch * per_epoch, min(total, (epoch + 1) * per_epoch)
        tick = time.perf_counter()
        images = image_dino.batches(config, source, indices, seed=data_seed, start=first,
                                    stop=stop)
        state, metrics = image_dino.train(dino, state, images, key,
                                          where=f"centralized DINO epoch {epoch + 1}")
        row = dict(epoch=epoch + 1, step=stop, **image_dino.summary(metrics),
                   images_per_s=(stop - first) * cfg.batch_size / (time.perf_counter() - tick))
        history.append(row)
        print(image_dino.progress("centralized: epoch", epoch + 1, epochs, row,
                                  time.perf_counter() - start, cfg.out_dim))
    model_bytes = cost.tree_bytes({"head": state.teacher["head"],
                                   "body": state.teacher["body"]})
    return image_dino.from_teacher(
        config, state.teacher, images_seen=total * cfg.batch_size, steps=total,
        server_flops=dino.step_flops * total, client_flops_per_site=[0.0] * len(site_indices),
        upload_bytes_per_site=[image_dino.image_bytes(source, s) for s in site_indices],
        download_bytes_per_site=[model_bytes] * len(site_indices),
        wall_s=time.perf_counter() - start, history=history)
