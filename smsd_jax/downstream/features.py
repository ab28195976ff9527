"""A model's outputs over a data source, read through grain in batches: class features
for the probes, raw pixels, and the predictions the test set is scored on.

Images are normalised by the model itself (`models.ViTClassifier`'s mean and std).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from smsd_jax import data, models
from smsd_jax.downstream.probes import Targets, probabilities

# Images per batch when reading raw pixels (no model runs on them, so only memory matters).
_PIXEL_BATCH = 1024


@functools.partial(jax.jit, static_argnames=("model", "method"))
def forward(model, params, images, *, method: str | None = None) -> jax.Array:
    """`model.apply` of the classifier's `params` on a batch of images in [0, 1] (the model
    normalises them), jitted once per model and method."""
    return model.apply({"params": params}, images, method=method)


def apply_in_batches(model: models.ViTClassifier, params, source, indices, *, batch_size: int,
                     method: str | None) -> np.ndarray:
    """`model.apply(method=...)` over `source[indices]` in order: `[n, ...]` float32 (each
    leaf, for a method that returns several arrays).

    The last batch is padded to `batch_size` so that one shape compiles.
    """
    dataset = data.labelled_dataset(source, indices, batch_size=batch_size, seed=0)
    outputs = []
    for batch in dataset.to_iter_dataset():
        images = batch["image"]
        padded = np.pad(images, ((0, batch_size - len(images)),) + ((0, 0),) * 3)
        out = forward(model, params, padded, method=method)
        outputs.append(jax.tree.map(lambda o: np.asarray(o[:len(images)], np.float32), out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def extract_features(model: models.ViTClassifier, params, source, indices, *,
                     batch_size: int) -> dict[str, np.ndarray]:
    """What the probes read of `source[indices]`, in the order of `indices`:
    `{"knn": class features [n, D], "linear": the model's linear_features [n, F]}` float32
    (`ViTClassifier.probe_features`); `params` are the classifier's (head, body, tail)."""
    return apply_in_batches(model, params, source, indices, batch_size=batch_size,
                            method="probe_features")


def raw_pixel_features(source, indices) -> np.ndarray:
    """Flattened pixels `[n, H*W*C]` float32 in [0, 1] of `source[indices]`, in order."""
    dataset = data.labelled_dataset(source, indices, batch_size=_PIXEL_BATCH, seed=0)
    return np.concatenate([b["image"].reshape(len(b["image"]), -1)
                           for b in dataset.to_iter_dataset()])


def score(targets: Targets, logits, multilabel: bool) -> dict:
    """The metrics of a classifier's `logits` against `targets`: every evaluation of stage 3
    (the test set, and fine-tuning's validation epochs) goes through it."""
    return targets.evaluate(probabilities(logits, multilabel))


def evaluate_model(model: models.ViTClassifier, params, source, indices, *,
                   batch_size: int) -> dict:
    """`{"accuracy", "auc"}` of the classifier's predictions on `source[indices]` (multi-label:
    `Targets.evaluate`'s mean and per-finding AUC and AP)."""
    logits = apply_in_batches(model, params, source, indices, batch_size=batch_size,
                              method=None)
    return score(Targets.of(source, indices), logits, data.is_multilabel(source))
