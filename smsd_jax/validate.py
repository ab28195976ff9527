"""Config checks that run before any work starts: a bad value fails in a second, not an hour in.

Each error names the config key, the value, and what to do.
"""

from __future__ import annotations

import jax

from smsd_jax import models, ops, sharding, site, tasks
from smsd_jax.data import check_kind, registry
from smsd_jax.errors import SMSDError


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise SMSDError(f"config.{key}={value!r}: {what}")


def _fraction(key: str, value) -> None:
    _require(0.0 < value <= 1.0, key, value, "must be a fraction in (0, 1]")


def check_config(config) -> None:
    """Raises `SMSDError` at the first out-of-range value of `config`.

    Where a stage checks a value itself, this calls that stage's check (one implementation).
    """
    d, m, s, v = config.data, config.model, config.site, config.server
    _check_labelled_data(d)
    check_kind(d.partition, d.task == "multilabel")
    _require(d.num_sites >= 1, "data.num_sites", d.num_sites, "must be at least 1")
    _require(d.alpha > 0, "data.alpha", d.alpha, "the Dirichlet concentration must be positive")
    _require(m.size in models.PRESETS, "model.size", m.size, f"use one of {sorted(models.PRESETS)}")
    _require(m.patch_size >= 1 and d.image_size % m.patch_size == 0, "model.patch_size",
             m.patch_size, f"must divide data.image_size={d.image_size}")
    _require(m.pos_std >= 0, "model.pos_std", m.pos_std, "must be non-negative")
    _require(isinstance(m.head_dim, int) and m.head_dim >= 0, "model.head_dim", m.head_dim,
             "must be 0 (tokens at the body's width, no stem) or a token width >= 1")
    _require(m.head_dim > 0 or not m.per_site_heads, "model.per_site_heads",
             m.per_site_heads, "needs model.head_dim > 0: each site's head gets its own stem")
    _require(m.constant_patches in models.CONSTANT_PATCHES, "model.constant_patches",
             m.constant_patches, f"use one of {models.CONSTANT_PATCHES}")
    _require(0 <= m.blank_range < 1, "model.blank_range", m.blank_range,
             "must be in [0, 1): the widest span of [0, 1] pixel values a blank patch has")
    _require(m.init in models.INITS, "model.init", m.init, f"use one of {tuple(models.INITS)}")
    _require(config.downstream.linear_features in models.LINEAR_FEATURES,
             "downstream.linear_features", config.downstream.linear_features,
             f"use one of {models.LINEAR_FEATURES}")
    num_patches = (d.image_size // m.patch_size) ** 2
    sent = ops.num_kept(num_patches, s.keep, name="config.site.keep", of="patches")
    _require(s.num_samples >= 1, "site.num_samples", s.num_samples, "must be at least 1")
    _require(s.payload_dtype in ("float16", "bfloat16", "float32"), "site.payload_dtype",
             s.payload_dtype, "use float16, bfloat16 or float32")
    site.check_shard_size(s)
    site.check_noise(s)
    for key in ("global_keep", "local_keep"):
        ops.num_kept(sent, v[key], name=f"config.server.{key}", of="tokens each sample holds")
    _require(v.num_local >= 0, "server.num_local", v.num_local, "must be 0 or more")
    devices = v.num_devices or jax.device_count()
    _require(v.num_devices <= jax.device_count(), "server.num_devices", v.num_devices,
             f"only {jax.device_count()} devices are visible")
    sharding.check_batch_size(v.batch_size, devices, name="config.server.batch_size")
    _require(v.epochs > 0, "server.epochs", v.epochs, "must be positive")
    _require(v.lr > 0 and v.min_lr >= 0, "server.lr", v.lr, "learning rates must be positive")
    _require(0 < v.student_temp and 0 < v.teacher_temp and 0 < v.teacher_temp_final,
             "server.teacher_temp", v.teacher_temp, "temperatures must be positive")
    _require(0 <= v.teacher_momentum <= 1, "server.teacher_momentum", v.teacher_momentum,
             "must be in [0, 1]")
    _require(0 <= v.center_momentum <= 1, "server.center_momentum", v.center_momentum,
             "must be in [0, 1]")
    _require(v.out_dim >= 2, "server.out_dim", v.out_dim, "must be at least 2")
    _require(v.clip_grad >= 0, "server.clip_grad", v.clip_grad,
             "must be 0 (no clipping) or a positive per-tensor norm")
    _require(v.freeze_last_layer_epochs >= 0, "server.freeze_last_layer_epochs",
             v.freeze_last_layer_epochs, "must be 0 (never frozen) or more epochs")
    _require(0 <= v.drop_path < 1, "server.drop_path", v.drop_path,
             "the stochastic depth rate must be in [0, 1)")
    _require(v.prefetch >= 0, "server.prefetch", v.prefetch,
             "must be 0 (no read-ahead) or a number of batches")
    check_baselines(config)
    _check_downstream(config.downstream)
    check_tasks(config)


def _check_labelled_data(d) -> None:
    """The checks of `config.data` that hold for pre-training data and a task's data alike."""
    _require(d.source in registry.SOURCES, "data.source", d.source,
             f"use one of {registry.SOURCES}")
    registry.check_task(d)
    _require(d.channels in (1, 3), "data.channels", d.channels, "must be 1 or 3")
    _require(d.std > 0, "data.std", d.std, "must be positive")
    _require(d.subset >= 0, "data.subset", d.subset, "must be 0 (all) or a positive count")


def _check_downstream(w) -> None:
    """The checks of `config.downstream` (`w`), for the stage and for each task."""
    for f in w.label_fractions:
        _fraction("downstream.label_fractions", f)
    for fraction in w.finetune_fractions:
        _fraction("downstream.finetune_fractions", fraction)
    _require(w.knn_k >= 1, "downstream.knn_k", w.knn_k, "must be at least 1")
    _require(w.finetune_epochs >= 1, "downstream.finetune_epochs", w.finetune_epochs,
             "must be at least 1")
    _require(0 <= w.finetune_val_fraction < 1, "downstream.finetune_val_fraction",
             w.finetune_val_fraction, "must be in [0, 1) (0: no validation, the last epoch)")
    _require(w.finetune_patience >= 0, "downstream.finetune_patience", w.finetune_patience,
             "must be 0 (no early stop) or a number of epochs")
    _require(w.finetune_min_steps >= 0, "downstream.finetune_min_steps", w.finetune_min_steps,
             "must be 0 (epochs only) or a number of steps")
    _require(w.finetune_max_steps >= 0, "downstream.finetune_max_steps", w.finetune_max_steps,
             "must be 0 (no cap) or a number of steps")


def check_tasks(config) -> None:
    """Each of `config.downstream.tasks` (`smsd_jax.tasks`): its data is labelled data this
    project reads, at the image size and channels of `config.data` (the head's), and its
    probes' settings are in range. The partition is checked where it is used (a task's data
    is split into sites only with `downstream.site >= 0`)."""
    d = config.data
    for name, task in tasks.task_configs(config):
        if not name:
            continue
        with tasks.named(name):
            _check_labelled_data(task.data)
            _check_downstream(task.downstream)
            t = task.data
            _require((t.image_size, t.channels) == (d.image_size, d.channels), "data.image_size",
                     t.image_size, f"with data.channels={t.channels}: the head takes "
                     f"{d.image_size}x{d.image_size} images of {d.channels} channels "
                     "(config.data), and every task's images must be those")


def check_baselines(config) -> None:
    """Raises `SMSDError` at the first out-of-range value of `config.baselines`."""
    b, patch = config.baselines, config.model.patch_size
    _require(b.rounds >= 1 and int(b.rounds) == b.rounds, "baselines.rounds", b.rounds,
             "must be a whole number of rounds, at least 1")
    _require(b.local_epochs > 0, "baselines.local_epochs", b.local_epochs, "must be positive")
    for key in ("global_scale", "local_scale"):
        low, high = b[key]
        _require(0 < low <= high <= 1, f"baselines.{key}", b[key],
                 "must be (min, max) area fractions with 0 < min <= max <= 1")
    _require(b.local_size >= patch and b.local_size % patch == 0, "baselines.local_size",
             b.local_size, f"must be a positive multiple of model.patch_size={patch}")
    _require(b.num_local >= -1, "baselines.num_local", b.num_local,
             "must be -1 (server.num_local) or a count >= 0")
    _require(0 <= b.contrast <= 1, "baselines.contrast", b.contrast, "must be in [0, 1]")
