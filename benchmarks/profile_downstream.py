r"""Where stage 3's time goes, on this machine: the quickstart's downstream protocol, phase by
phase, for one body.

    python -m benchmarks.profile_downstream                      # the quickstart's protocol
    python -m benchmarks.profile_downstream --config=configs/quickstart.py:tiny

Runs each phase of `downstream.evaluate_pretrained` as it runs in the quickstart, on a
random body of the config (the same shapes, so the same time, as a trained one) with a head
of the config: feature extraction of the largest labelled subset and of the test split
(first call, compilation included, then again warm), the linear probe and k-NN at each label
fraction, fine-tuning at each fine-tuning fraction (`finetune.fit`: steps taken, seconds per
step, and GFLOP/s from XLA's FLOP count of the fine-tuning step), and the test-set
evaluation of the fine-tuned model; raw pixels' probes beside them.

Writes `--out` (JSON) and prints the table in Markdown (docs/performance.md quotes it).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smsd_jax import cost, data, files, models
from smsd_jax.downstream import features, finetune, probes, protocol

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "The config whose downstream protocol is profiled.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/profile_downstream_cpu.json",
                           "JSON to write.")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _classifier(config, train):
    """The quickstart's classifier (head, random body, tail) and its parameters."""
    head = models.head_from_config(config)
    body = models.body_from_config(config).clone(dtype=jnp.float32)
    model = models.ViTClassifier(head, body, num_classes=train.num_classes,
                                 mean=config.data.mean, std=config.data.std,
                                 linear_features=config.downstream.linear_features)
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, *train.image_shape)))
    return model, params["params"]


def _step_flops(model, params, cfg, shape) -> float:
    """XLA's FLOPs of one fine-tuning step at `cfg.batch_size` images of `shape`."""
    tx, step = finetune._finetune_step(model, cfg.finetune_lr, 0.05, 1000)
    images = jax.ShapeDtypeStruct((cfg.batch_size, *shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
    return cost.compiled_flops(step, params, tx.init(params), images, labels, None)


def profile(config) -> dict:
    cfg = config.downstream
    rows = []
    add = lambda phase, seconds, **more: rows.append(dict(phase=phase, seconds=seconds,
                                                          **more))
    (train, test), seconds = _timed(lambda: (data.load_source(config.data, "train"),
                                             data.load_source(config.data, "test")))
    add("load the data", seconds)
    model, params = _classifier(config, train)
    candidates = protocol.labelled_candidates(config, train)
    subsets = protocol._subsets(config, train, candidates)
    largest = subsets[max(subsets)]
    test_idx = protocol.held_out_indices(config, test)
    extract = functools.partial(features.extract_features, model, params,
                                batch_size=cfg.eval_batch_size)
    for what, source, idx in (("labelled", train, largest), ("test", test, test_idx)):
        _, first = _timed(lambda: extract(source, idx))
        feats, warm = _timed(lambda: extract(source, idx))
        add(f"features of the {what} images (first call)", first, images=len(idx))
        add(f"features of the {what} images (warm)", warm, images=len(idx),
            images_per_s=len(idx) / warm)
    (train_feats, test_feats), _ = _timed(lambda: (extract(train, largest),
                                                   extract(test, test_idx)))
    pixels = {"train": features.raw_pixel_features(train, largest),
              "test": features.raw_pixel_features(test, test_idx)}
    for fraction, idx in subsets.items():
        rows_of = np.searchsorted(largest, idx)
        labels = train.labels[idx]
        for name, x, y in (("body", train_feats, test_feats),
                           ("raw pixels", {"linear": pixels["train"], "knn": pixels["train"]},
                            {"linear": pixels["test"], "knn": pixels["test"]})):
            _, seconds = _timed(lambda: probes.linear_probe(
                x["linear"][rows_of], labels, y["linear"], num_classes=train.num_classes,
                steps=cfg.linear_steps, lr=cfg.linear_lr, seed=config.seed))
            add(f"linear probe {100 * fraction:g}%, {name}", seconds, labelled=len(idx))
            _, seconds = _timed(lambda: probes.knn_classify(
                x["knn"][rows_of], labels, y["knn"], num_classes=train.num_classes,
                k=probes.knn_neighbours(cfg.knn_k, len(idx)), temp=cfg.knn_temp))
            add(f"k-NN {100 * fraction:g}%, {name}", seconds, labelled=len(idx))
    tuning = finetune.deployable(model)
    flops = _step_flops(tuning, params, cfg, train.image_shape)
    for fraction in cfg.finetune_fractions:
        labelled = candidates[probes.label_subset(train.labels[candidates], fraction,
                                                  config.seed)]
        train_pos, val_pos = probes.validation_split(train.labels[labelled],
                                                     cfg.finetune_val_fraction, config.seed)
        (tuned, info), seconds = _timed(lambda: finetune.fit(
            tuning, params, train, labelled[train_pos], epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr, batch_size=cfg.batch_size, seed=config.seed,
            val_idx=labelled[val_pos], patience=cfg.finetune_patience,
            eval_batch_size=cfg.eval_batch_size, max_steps=cfg.finetune_max_steps,
            min_steps=cfg.finetune_min_steps))
        add(f"fine-tune {100 * fraction:g}% (compilation and validation included)", seconds,
            steps=info["steps"], epochs=info["epochs_run"], seconds_per_step=seconds /
            info["steps"], gflop_per_s=flops * info["steps"] / seconds / 1e9)
        _, seconds = _timed(lambda: features.evaluate_model(
            tuning, tuned, test, test_idx, batch_size=cfg.eval_batch_size))
        add("fine-tuned model on the test images", seconds, images=len(test_idx))
    total = sum(r["seconds"] for r in rows if "(warm)" not in r["phase"])
    return dict(config=str(_CONFIG.value.workdir), device=jax.devices()[0].device_kind,
                fine_tune_step_gflop=flops / 1e9, total_seconds=total, phases=rows)


def markdown(doc: dict) -> str:
    lines = ["| phase | seconds | share | detail |", "|---|---|---|---|"]
    for r in doc["phases"]:
        detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in r.items() if k not in ("phase", "seconds"))
        share = ("" if "(warm)" in r["phase"] else
                 f"{100 * r['seconds'] / doc['total_seconds']:.0f}%")
        lines.append(f"| {r['phase']} | {r['seconds']:.1f} | {share} | {detail} |")
    lines.append(f"| total (first calls) | {doc['total_seconds']:.1f} | 100% | |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    doc = profile(_CONFIG.value)
    files.write_json(_OUT.value, doc)
    print(markdown(doc))


if __name__ == "__main__":
    app.run(main)
