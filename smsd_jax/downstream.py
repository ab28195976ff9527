"""Stage 3, at a site, after: what a site does with the body it gets back.

The site joins its own head, the body and a fresh classification tail into a `ViTClassifier`
and measures the body on its labelled data in a low-label regime: a linear probe and DINO's
weighted k-NN on frozen class features, and a full fine-tune (docs/method.md, "What must be
measured"). Raw pixels and a randomly initialised body are the baselines on the same subsets.

Single-label data (one class per image) is scored by accuracy and macro AUC; multi-label data
(F binary findings per image, some unknown: `data.MultiLabelSource`) by a sigmoid per finding,
binary cross-entropy over the known labels only, and mean AUC over findings. The same k-NN,
linear probe and fit loop serve both; the labels' shape chooses the loss.

Pure math first (`label_subset`, `knn_classify`, `linear_probe`, ...), then the
stage functions that read data through grain (`extract_features`, `finetune`,
`evaluate_body`, ...), then the results table.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smsd_jax import (consortium, data, evaluation, export, files, keys, models, ops, segmentation,
                      tasks)
from smsd_jax.errors import NotFiniteError, SMSDError
from smsd_jax.layout import Layout

# Images per batch when reading raw pixels (no model runs on them, so only memory matters).
_PIXEL_BATCH = 1024
# Mixed into the seed of `validation_split`, so that its draw is not `label_subset`'s.
_VALIDATION_STREAM = 0x7A11D


# ---------------------------------------------------------------- pure math


def _strata(labels) -> list[np.ndarray]:
    """The groups a draw of labelled images is stratified by: the positions of each class of
    integer `labels [N]`, in class order; for multi-label `labels [N, F]` one group of all N
    positions (an image has no single class, so the draw is a random share of the images).

    Raises:
      ValueError: labels neither a non-empty integer `[N]` nor a non-empty `[N, F]`.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[0] > 0:
        return [np.arange(labels.shape[0])]
    labels = data.checks.integer_array(labels, "labels")
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def label_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """A stratified random subset of `labels [N]`: sorted positions into `labels`, int64.

    Each class present keeps `round(fraction * count)` of its members, at least one;
    multi-label `labels [N, F]` keep `round(fraction * N)` random images, at least one
    (`_strata`). The draw depends only on `seed`, not on `fraction`, so for one seed the
    subset of a smaller fraction is contained in that of a larger one (features extracted for
    the largest serve all).

    Raises:
      ValueError: `fraction` outside (0, 1], or labels neither integer `[N]` nor `[N, F]`.
    """
    if not 0 < fraction <= 1:
        raise SMSDError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for members in _strata(labels):
        members = rng.permutation(members)
        chosen.append(members[:max(1, round(fraction * members.size))])
    return np.sort(np.concatenate(chosen))


def validation_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split of the positions `0..N-1` of `labels [N]` into `(train, val)`.

    Each class with at least 2 members puts `round(fraction * count)` of them, at least 1 and
    at most `count - 1`, into validation; a class with one member stays in train (multi-label
    `labels [N, F]`: the same for one group of all N images, `_strata`). The two are
    disjoint, together all of `0..N-1`, each sorted int64, and depend only on `seed` (a
    stream apart from `label_subset`'s). `fraction == 0`: everything trains, val is empty.

    Raises:
      ValueError: `fraction` outside [0, 1), or labels neither integer `[N]` nor `[N, F]`.
    """
    if not 0 <= fraction < 1:
        raise SMSDError(f"validation fraction must be in [0, 1), got {fraction}")
    strata = _strata(labels)
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    val = [np.zeros(0, np.int64)]
    for members in strata:
        members = rng.permutation(members)
        if fraction > 0 and members.size >= 2:
            val.append(members[:min(members.size - 1, max(1, round(fraction * members.size)))])
    val = np.sort(np.concatenate(val)).astype(np.int64)
    return np.setdiff1d(np.arange(len(np.asarray(labels)), dtype=np.int64), val), val


def best_epoch(run_epoch, validate, *, epochs: int, patience: int = 0,
               metric: str = "accuracy"):
    """Early stopping: the parameters of the epoch with the best validation score.

    Calls `run_epoch(epoch)` for epoch = 1, 2, ... (it trains one epoch and returns the
    parameters after it) and `validate(params) -> (score, loss)` after each, the score being
    `metric` (accuracy; mean AUC for multi-label). The best epoch has the highest score, ties
    going to the lower loss, then to the earlier epoch; a NaN score (no finding with both
    classes among the validation labels) ranks below every number, so the loss decides.
    `patience > 0` stops once that many epochs in a row have not been the best; 0 runs all
    `epochs`. `validate` None: no selection, the last epoch's parameters.

    Returns:
      `(params, info)`: info is `{"best_epoch", "epochs_run", "val_<metric>": [per epoch],
      "val_loss": [per epoch]}` (1-based epochs; empty curves without `validate`).
    """
    best = best_params = None
    curve = f"val_{metric}"
    info = {"best_epoch": 0, "epochs_run": 0, curve: [], "val_loss": []}
    for epoch in range(1, epochs + 1):
        params = run_epoch(epoch)
        info["epochs_run"] = epoch
        if validate is None:
            best_params, info["best_epoch"] = params, epoch
            continue
        score, loss = (float(v) for v in validate(params))
        info[curve].append(score)
        info["val_loss"].append(loss)
        rank = (-math.inf if math.isnan(score) else score, -loss)
        if best is None or rank > best:
            best, best_params, info["best_epoch"] = rank, params, epoch
        elif patience > 0 and epoch - info["best_epoch"] >= patience:
            break
    return best_params, info


def masked_binary_cross_entropy(logits, labels, mask) -> jax.Array:
    """Mean sigmoid binary cross-entropy of `logits [B, F]` against 0/1 `labels [B, F]` over
    the entries whose `mask [B, F]` is 1 (known); a masked entry adds nothing to the loss or
    its gradient, whatever its label. 0 when no entry is known."""
    known = mask > 0
    losses = jnp.where(known, optax.sigmoid_binary_cross_entropy(logits, labels), 0.0)
    return losses.sum() / jnp.maximum(known.sum(), 1)


def task_loss(logits, labels, mask=None) -> jax.Array:
    """The training loss of a classifier's `logits [B, C]`: softmax cross-entropy against
    integer `labels [B]` (`mask` None, single-label), else `masked_binary_cross_entropy`."""
    if mask is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return masked_binary_cross_entropy(logits, labels, mask)


def probabilities(logits, multilabel: bool) -> jax.Array:
    """Scores from logits `[n, C]`: a softmax over classes, or a sigmoid per finding."""
    return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)


class Targets(NamedTuple):
    """What predictions are trained on or scored against: integer `labels [n]` (single-label,
    `mask` and `names` None), or 0/1 `labels [n, F]` with `mask [n, F]` (1 = known) and the
    findings' `names` (multi-label)."""

    labels: np.ndarray
    mask: np.ndarray | None = None
    names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, source, indices) -> "Targets":
        """The targets of `source[indices]`."""
        idx = np.asarray(indices)
        if not data.is_multilabel(source):
            return cls(source.labels[idx])
        return cls(source.labels[idx], source.mask[idx], source.finding_names)

    def take(self, rows) -> "Targets":
        """The targets at positions `rows`."""
        return Targets(self.labels[rows], None if self.mask is None else self.mask[rows],
                       self.names)

    def evaluate(self, scores) -> dict:
        """`evaluation.evaluate_scores` of `scores [n, C]` (single-label: "accuracy", "auc"),
        or `evaluation.evaluate_multilabel` ("auc", "auc_per_finding", "ap", ...)."""
        if self.mask is None:
            return evaluation.evaluate_scores(scores, self.labels)
        return evaluation.evaluate_multilabel(scores, self.labels, self.mask, self.names)


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _knn_scores(train_feats, train_labels, train_mask, test_feats, temp, *, num_classes, k,
                chunk_size):
    train = _l2_normalise(train_feats)
    n, dim = test_feats.shape
    chunks = jnp.pad(_l2_normalise(test_feats), ((0, -n % chunk_size), (0, 0)))

    def one_chunk(queries):  # [chunk, D] -> [chunk, C]; only [chunk, n_train] sims in memory
        top, neighbours = jax.lax.top_k(queries @ train.T, k)
        # softmax = exp(sim / temp) normalised over the k neighbours: DINO's weights, stable
        # for small temp, and comparable across test images (which AUC needs).
        weights = jax.nn.softmax(top / temp, axis=-1)
        if train_mask is None:
            votes = jax.nn.one_hot(train_labels[neighbours], num_classes, dtype=weights.dtype)
            return jnp.einsum("qk,qkc->qc", weights, votes)
        known = jnp.einsum("qk,qkc->qc", weights, train_mask[neighbours])
        positive = jnp.einsum("qk,qkc->qc", weights, (train_labels * train_mask)[neighbours])
        return jnp.where(known > 0, positive / jnp.where(known > 0, known, 1.0), 0.5)

    scores = jax.lax.map(one_chunk, chunks.reshape(-1, chunk_size, dim))
    return scores.reshape(-1, num_classes)[:n]


def knn_neighbours(k: int, num_labelled: int) -> int:
    """The k that k-NN uses on `num_labelled` labelled images: `max(1, min(k, n // 10))`.

    At most a tenth of the labelled set, so that with a few labels per class the vote is not
    dominated by other classes (k=20 of 40 labelled images would reach half of them).
    """
    return max(1, min(int(k), int(num_labelled) // 10))


def knn_classify(train_feats, train_labels, test_feats, *, num_classes: int, k: int = 20,
                 temp: float = 0.07, chunk_size: int = 256, mask=None) -> np.ndarray:
    """DINO's weighted k-NN on cosine similarity: scores `[n_test, num_classes]`.

    Args:
      train_feats: `[n_train, D]`; train_labels: int `[n_train]`, or 0/1 `[n_train, F]` with
        `mask` (multi-label, F = num_classes); test_feats: `[n_test, D]`.
      k: neighbours (fewer when there are fewer training points).
      temp: the weight of a neighbour with similarity s is exp(s / temp).
      chunk_size: test points per step; memory holds `[chunk_size, n_train]` similarities.
      mask: multi-label only, `[n_train, F]`, 1 where a training label is known.

    Returns:
      float32 `[n_test, num_classes]`: per class, the weights of the k neighbours of that
      class over the weights of all k (rows sum to 1; argmax as DINO's raw weight sums).
      Multi-label: per finding, the weights of the positive neighbours over the weights of
      the neighbours whose label of it is known (the same k neighbours and weights); 0.5 (no
      evidence) when none of the k is known.
    """
    train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
    k = min(k, train_feats.shape[0])
    chunk_size = max(1, min(chunk_size, test_feats.shape[0]))
    mask = None if mask is None else np.asarray(mask, np.float32)
    return np.asarray(_knn_scores(train_feats, np.asarray(train_labels), mask, test_feats,
                                  jnp.float32(temp), num_classes=num_classes, k=k,
                                  chunk_size=chunk_size))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "lr", "weight_decay"))
def _fit_linear(key, train_feats, train_labels, train_mask, test_feats, *, num_classes, steps,
                lr, weight_decay):
    mean, std = train_feats.mean(0), train_feats.std(0)
    std = jnp.where(std > 1e-6, std, 1.0)  # constant features (e.g. blank border pixels)
    x, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    params = {"w": 0.01 * jax.random.normal(key, (x.shape[1], num_classes)),
              "b": jnp.zeros(num_classes)}
    tx = optax.adamw(ops.warmup_cosine(lr, 0.0, steps), weight_decay=weight_decay,
                     mask={"w": True, "b": False})

    def loss_fn(p):
        return task_loss(x @ p["w"] + p["b"], train_labels, train_mask)

    def step(carry, _):
        p, opt_state = carry
        grads = jax.grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return probabilities(x_test @ params["w"] + params["b"], train_mask is not None)


def linear_probe(train_feats, train_labels, test_feats, *, num_classes: int, steps: int,
                 lr: float, weight_decay: float = 1e-4, seed: int = 0,
                 mask=None) -> np.ndarray:
    """Softmax regression on frozen features: class probabilities `[n_test, num_classes]`;
    multi-label (`mask` given): a logistic regression per finding, trained with
    `masked_binary_cross_entropy`, giving each finding's probability `[n_test, F]`.

    Features are standardised with the training set's mean and std; the weights start from
    `N(0, 0.01^2)` drawn from `seed` and train full-batch for `steps` AdamW steps (cosine lr
    from `lr` to 0, weight decay on the weights, not the bias), all in one jitted scan.

    Args:
      train_feats: `[n_train, D]`; train_labels: int `[n_train]`, or 0/1 `[n_train, F]` with
        `mask [n_train, F]` (1 = known; multi-label); test_feats: `[n_test, D]`.
    """
    if steps < 1:
        raise SMSDError(f"linear probe needs steps >= 1, got {steps}")
    mask = None if mask is None else np.asarray(mask, np.float32)
    scores = _fit_linear(
        jax.random.key(seed), np.asarray(train_feats, np.float32), np.asarray(train_labels),
        mask, np.asarray(test_feats, np.float32), num_classes=num_classes, steps=steps,
        lr=float(lr), weight_decay=float(weight_decay))
    return np.asarray(scores)


# ---------------------------------------------------------------- stage functions (I/O)


def _normalise(images: jax.Array, mean: float, std: float) -> jax.Array:
    return (images - mean) / std


@functools.partial(jax.jit, static_argnames=("model", "method", "mean", "std"))
def _forward(model, params, images, *, method, mean, std):
    return model.apply({"params": params}, _normalise(images, mean, std), method=method)


def apply_in_batches(model: models.ViTClassifier, params, source, indices, *, batch_size: int,
                      mean: float, std: float, method: str | None) -> np.ndarray:
    """`model.apply(method=...)` over `source[indices]` in order: `[n, ...]` float32.

    The last batch is padded to `batch_size` so that one shape compiles.
    """
    dataset = data.labelled_dataset(source, indices, batch_size=batch_size, seed=0)
    outputs = []
    for batch in dataset.to_iter_dataset():
        images = batch["image"]
        padded = np.pad(images, ((0, batch_size - len(images)),) + ((0, 0),) * 3)
        out = _forward(model, params, padded, method=method, mean=mean, std=std)
        outputs.append(np.asarray(out[:len(images)], np.float32))
    return np.concatenate(outputs)


def extract_features(model: models.ViTClassifier, params, source, indices, *, batch_size: int,
                     mean: float, std: float) -> np.ndarray:
    """Class features `[n, D]` float32 of `source[indices]`, in the order of `indices`.

    Images are normalised as `(x - mean) / std`; `params` are the classifier's
    (`{"head", "body", "tail"}`).
    """
    return apply_in_batches(model, params, source, indices, batch_size=batch_size, mean=mean,
                             std=std, method="features")


def raw_pixel_features(source, indices) -> np.ndarray:
    """Flattened pixels `[n, H*W*C]` float32 in [0, 1] of `source[indices]`, in order."""
    dataset = data.labelled_dataset(source, indices, batch_size=_PIXEL_BATCH, seed=0)
    return np.concatenate([b["image"].reshape(len(b["image"]), -1)
                           for b in dataset.to_iter_dataset()])


def evaluate_model(model: models.ViTClassifier, params, source, indices, *, batch_size: int,
                   mean: float, std: float) -> dict:
    """`{"accuracy", "auc"}` of the classifier's predictions on `source[indices]` (multi-label:
    `Targets.evaluate`'s mean and per-finding AUC and AP)."""
    logits = apply_in_batches(model, params, source, indices, batch_size=batch_size,
                               mean=mean, std=std, method=None)
    return Targets.of(source, indices).evaluate(
        probabilities(logits, data.is_multilabel(source)))


def _train_step(model, tx, mean, std, params, opt_state, images, labels, mask):
    def loss_fn(p):
        logits = model.apply({"params": p}, _normalise(images, mean, std))
        return task_loss(logits, labels, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _finetune_step(model, lr: float, weight_decay: float, total_steps: int, mean: float,
                   std: float):
    """`(tx, jitted step)`; cached, so fine-tunes with one budget share their compilation."""
    tx = optax.adamw(ops.warmup_cosine(lr, 0.0, total_steps, warmup_steps=total_steps // 10),
                     weight_decay=weight_decay)
    return tx, jax.jit(functools.partial(_train_step, model, tx, mean, std))


def _selection_metric(source) -> str:
    """What fine-tuning selects its epoch by: accuracy, or mean AUC for multi-label data."""
    return "auc" if data.is_multilabel(source) else "accuracy"


class _Validator:
    """`validate(params) -> (accuracy, mean cross-entropy)` on `source[indices]`; multi-label:
    `(mean AUC, masked binary cross-entropy)`.

    The images are read once and kept on the device; each call is one jitted forward per
    chunk of at most `batch_size` (the set is padded to whole chunks: one shape compiles).
    """

    def __init__(self, model, source, indices, *, batch_size: int, mean: float, std: float):
        n = len(indices)
        self.chunk = max(1, min(batch_size, n))
        images = raw_pixel_features(source, indices).reshape(n, *source.image_shape)
        images = np.pad(images, ((0, -n % self.chunk),) + ((0, 0),) * 3)
        self.images = jnp.asarray(images).reshape(-1, self.chunk, *source.image_shape)
        self.targets = Targets.of(source, indices)
        self.model, self.mean, self.std = model, mean, std

    def __call__(self, params) -> tuple[float, float]:
        labels, mask = self.targets.labels, self.targets.mask
        logits = np.concatenate([np.asarray(_forward(self.model, params, chunk, method=None,
                                                     mean=self.mean, std=self.std))
                                 for chunk in self.images])[:len(labels)]
        if mask is not None:
            return (self.targets.evaluate(probabilities(logits, True))["auc"],
                    float(masked_binary_cross_entropy(logits, labels, mask)))
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        loss = -log_probs[np.arange(len(labels)), labels].mean()
        return float(np.mean(logits.argmax(-1) == labels)), float(loss)


def fit(model: models.ViTClassifier, params, source, train_idx, *, epochs: int, lr: float,
        batch_size: int, seed: int, mean: float, std: float, augment=None,
        weight_decay: float = 0.05, val_idx=None, patience: int = 0,
        eval_batch_size: int | None = None, max_steps: int = 0, min_steps: int = 0):
    """Fine-tunes every parameter (head, body, tail) on `source[train_idx]`, up to `epochs`
    epochs, keeping the parameters of the best epoch on `source[val_idx]` (`best_epoch`: by
    accuracy, by mean AUC for multi-label data).

    AdamW with a linear warm-up over the first 10% of the steps of all `epochs` and a cosine
    decay to 0 over them (an early stop does not shorten the schedule), `task_loss` (softmax
    cross-entropy, or masked binary cross-entropy per finding), shuffled batches (`augment` as
    in `data.Augment`). An epoch is `len(train_idx) // batch_size` steps; a labelled set
    smaller than `batch_size` is trained in batches of its own size. `min_steps > 0`
    lengthens the run of a small labelled set (few steps an epoch) to at least that many
    steps: the epochs and the patience grow by the same factor, so early stopping still
    waits the same share of the run. `max_steps > 0` caps the steps of the whole run (a
    budget that does not grow with the labelled set), after `min_steps`. `val_idx` None or
    empty: no validation, the last epoch's parameters.

    Returns:
      `(params, info)`: info as `best_epoch` returns it ("val_accuracy" or "val_auc"), plus
      "steps" (taken), "steps_per_epoch", "train_images", "val_images".

    Raises:
      FloatingPointError: the loss became NaN or infinite (names the first such step).
    """
    if epochs < 1:
        raise SMSDError(f"fine-tuning needs epochs >= 1, got {epochs}")
    batch_size = min(batch_size, len(train_idx))
    steps_per_epoch = len(train_idx) // batch_size
    if epochs * steps_per_epoch < min_steps:
        longer = -(-min_steps // steps_per_epoch)
        patience = -(-patience * longer // epochs)
        epochs = longer
    total_steps = epochs * steps_per_epoch
    if max_steps > 0:
        total_steps = min(total_steps, max_steps)
        epochs = -(-total_steps // steps_per_epoch)  # the last epoch may be partial
    dataset = data.labelled_dataset(source, train_idx, batch_size=batch_size, seed=seed,
                                    augment=augment, shuffle=True, num_epochs=epochs,
                                    drop_remainder=True)[:total_steps]
    tx, step = _finetune_step(model, lr, weight_decay, total_steps, mean, std)
    batches = iter(dataset.to_iter_dataset())
    state = {"params": params, "opt_state": tx.init(params), "step": 0}

    def run_epoch(epoch: int):
        losses = []
        for _ in range(min(steps_per_epoch, total_steps - state["step"])):
            batch = next(batches)
            state["params"], state["opt_state"], loss = step(
                state["params"], state["opt_state"], batch["image"], batch["label"],
                batch.get("mask"))
            losses.append(loss)
        # Checked once an epoch: a check per step would stall the asynchronous dispatch.
        bad = np.flatnonzero(~np.isfinite(np.asarray(jax.device_get(losses))))
        if bad.size:
            raise NotFiniteError(f"fine-tuning loss is not finite at step "
                                 f"{state['step'] + bad[0]} of {total_steps} (epoch {epoch}); "
                                 f"lower the learning rate (lr={lr})")
        state["step"] += len(losses)
        return state["params"]

    has_val = val_idx is not None and len(val_idx) > 0
    validate = _Validator(model, source, val_idx, batch_size=eval_batch_size or batch_size,
                          mean=mean, std=std) if has_val else None
    params, info = best_epoch(run_epoch, validate, epochs=epochs, patience=patience,
                              metric=_selection_metric(source))
    return params, dict(info, steps=state["step"], steps_per_epoch=steps_per_epoch,
                        epochs_planned=epochs, patience=patience,
                        train_images=len(train_idx),
                        val_images=len(val_idx) if has_val else 0)


def finetune(model: models.ViTClassifier, params, source, train_idx, test_source, test_idx, *,
             epochs: int, lr: float, batch_size: int, seed: int, mean: float, std: float,
             augment=None, weight_decay: float = 0.05, val_idx=None, patience: int = 0,
             eval_batch_size: int | None = None, max_steps: int = 0,
             min_steps: int = 0) -> dict:
    """`fit`, then tests the parameters it keeps.

    Returns:
      `evaluate_model`'s metrics on `test_source[test_idx]`, and `fit`'s info ("best_epoch",
      "epochs_run", "val_accuracy", ...): JSON-able.
    """
    params, info = fit(model, params, source, train_idx, epochs=epochs, lr=lr,
                       batch_size=batch_size, seed=seed, mean=mean, std=std, augment=augment,
                       weight_decay=weight_decay, val_idx=val_idx, patience=patience,
                       eval_batch_size=eval_batch_size, max_steps=max_steps,
                       min_steps=min_steps)
    metrics = evaluate_model(model, params, test_source, test_idx,
                             batch_size=eval_batch_size or min(batch_size, len(train_idx)),
                             mean=mean, std=std)
    return {**metrics, **info}


def labelled_candidates(config, train_source) -> np.ndarray:
    """Indices of `train_source` that the site may label: sorted int64.

    The first `config.data.subset` images when that is > 0 (all otherwise); with
    `config.downstream.site >= 0`, only that site's images in the partition of
    `config.data` (the same split, seed `config.seed`, that the sites are given).
    """
    site = config.downstream.site
    if site < 0:
        return np.arange(data.subset_size(config.data, len(train_source)))
    if site >= config.data.num_sites:
        raise SMSDError(f"config.downstream.site={site} but there are only "
                        f"config.data.num_sites={config.data.num_sites} sites; use -1 for "
                        "the whole train split")
    return data.split_sites(train_source.labels, config.data, config.seed)[site]


def held_out_indices(config, test_source) -> np.ndarray:
    """Indices of the test split: the first `config.data.subset` when that is > 0, else all."""
    return np.arange(data.subset_size(config.data, len(test_source)))


def _key(fraction: float) -> str:
    return f"{fraction:g}"


def _probe_features(config, name: str, train_feats, train_idx, subsets: dict,
                    train: Targets, test_feats, test: Targets, num_classes: int,
                    local: tuple | None = None) -> dict:
    """Linear probe and k-NN at each fraction, on features `train_feats` of `train_idx`.

    `subsets` maps each fraction to sorted indices contained in the sorted `train_idx`;
    `train` and `test` are the targets of `train_idx` and of the test features. `local`:
    `(features, Targets)` of a second test set, scored by the same fitted probes.
    Returns `{"linear": {fraction: metrics}, "knn": {...}, "labelled": {fraction: count}}`,
    and with `local` its metrics under "local" (`{"linear": ..., "knn": ...}`).
    """
    cfg = config.downstream
    scored = test_feats if local is None else np.concatenate([test_feats, local[0]])
    probes = {
        "linear": lambda x, y: linear_probe(x, y.labels, scored, num_classes=num_classes,
                                            steps=cfg.linear_steps, lr=cfg.linear_lr,
                                            seed=config.seed, mask=y.mask),
        "knn": lambda x, y: knn_classify(x, y.labels, scored, num_classes=num_classes,
                                         k=knn_neighbours(cfg.knn_k, len(y.labels)),
                                         temp=cfg.knn_temp, mask=y.mask),
    }
    results = {what: {} for what in probes}
    results["labelled"] = {}
    if local is not None:
        results["local"] = {what: {} for what in probes}
    for fraction, idx in subsets.items():
        rows = np.searchsorted(train_idx, idx)
        results["labelled"][_key(fraction)] = len(idx)
        for what, probe in probes.items():
            start = time.perf_counter()
            scores = probe(train_feats[rows], train.take(rows))
            metrics = test.evaluate(scores[:len(test_feats)])
            if local is not None:
                results["local"][what][_key(fraction)] = local[1].evaluate(
                    scores[len(test_feats):])
            if what == "knn":
                metrics["k"] = knn_neighbours(cfg.knn_k, len(idx))
            results[what][_key(fraction)] = metrics
            _report(name, what, fraction, len(idx), metrics, start)
    return results


def _report(name: str, what: str, fraction: float, count: int, metrics: dict,
            start: float) -> None:
    detail = ""
    if "k" in metrics:
        detail = f" (k={metrics['k']})"
    if metrics.get("val_accuracy"):
        detail = (f" (epoch {metrics['best_epoch']} of {metrics['epochs_run']}, validation "
                  f"{100 * max(metrics['val_accuracy']):.1f}% on {metrics['val_images']})")
    if metrics.get("val_auc"):
        detail = (f" (epoch {metrics['best_epoch']} of {metrics['epochs_run']}, validation "
                  f"mean AUC {metrics['val_auc'][metrics['best_epoch'] - 1]:.3f} on "
                  f"{metrics['val_images']})")
    score = (f"accuracy {100 * metrics['accuracy']:.1f}%, AUC {metrics['auc']:.3f}"
             if "accuracy" in metrics else
             f"mean AUC {metrics['auc']:.3f}, mean AP {metrics['ap']:.3f}")
    print(f"[{name}] {what:8s} {100 * fraction:g}% of labels ({count} images): {score}"
          f"{detail}, {time.perf_counter() - start:.1f} s", flush=True)


def _subsets(config, train_source, candidates: np.ndarray) -> dict:
    """Each label fraction -> its stratified subset of `candidates` (sorted indices; multi-label:
    a random share of them, `label_subset`)."""
    labels = train_source.labels[candidates]
    return {f: candidates[label_subset(labels, f, config.seed)]
            for f in config.downstream.label_fractions}


def evaluate_body(config, head_dir, body: models.ViTBody, body_params, *, train_source,
                  test_source, name: str, **where) -> dict:
    """The downstream protocol for one body at a site whose head is in `head_dir`.

    Args:
      config: uses `config.downstream`, `config.seed`, `config.data` (mean, std, subset,
        and the partition when `config.downstream.site >= 0`).
      head_dir: the site's head (`consortium.init_head`).
      body: the body's module; body_params: its parameters as `export.load_body` returns
        them, or None for a randomly initialised body seeded by `config.seed` (a baseline).
      name: the row's name in results and progress lines.
      **where: `candidates` and `local_idx` of `evaluate_pretrained` (classification only).

    Returns:
      What `evaluate_pretrained` returns; segmentation data: what
      `segmentation.evaluate_pretrained` returns.
    """
    head, head_params, head_meta = consortium.load_head(head_dir)
    if head.dim != body.input_dim:
        raise SMSDError(f"the head in {head_dir} makes tokens of width {head.dim} but the "
                        f"body takes width {body.input_dim}; use the body trained for this head")
    for source in (train_source, test_source):
        data.checks.head_fits(consortium.image_shape(head, head_meta), head_dir, source)
    evaluate = (segmentation.evaluate_pretrained if data.is_segmentation(train_source) else
                evaluate_pretrained)
    return evaluate(config, head, head_params, body, body_params, train_source=train_source,
                    test_source=test_source, name=name, **where)


def evaluate_pretrained(config, head: models.ViTHead, head_params, body: models.ViTBody,
                        body_params, *, train_source, test_source, name: str,
                        candidates: np.ndarray | None = None,
                        local_idx: np.ndarray | None = None) -> dict:
    """Linear probe and k-NN at every `config.downstream.label_fractions`, and fine-tuning of
    head + body + tail at every `config.downstream.finetune_fractions`.

    `head_params` / `body_params` None: randomly initialised from `config.seed` (the
    fine-tune-only baseline). Returns `{"name", "linear": {fraction: {"accuracy", "auc"}},
    "knn": {...}, "finetune": {...}, "labelled": {fraction: count}}`, fractions as strings such
    as "0.01" (JSON-able); a "knn" entry adds the "k" it used (`knn_neighbours`). Multi-label
    data: each entry is `{"auc", "auc_per_finding", "ap", "ap_per_finding"}`
    (`evaluation.evaluate_multilabel`) instead of accuracy and macro AUC.

    Fine-tuning, the same for every body (random included): `validation_split` carves
    `config.downstream.finetune_val_fraction` of each class (multi-label: of the images) out
    of the labelled subset, the rest trains for up to `finetune_epochs` epochs, at least
    `finetune_min_steps` steps (early stop after `finetune_patience` epochs without a better
    validation accuracy, or mean AUC, both scaled up together for a small labelled set:
    `fit`), and the test set scores the parameters of the best validation epoch; a "finetune"
    entry adds `fit`'s info ("best_epoch", "val_accuracy" or "val_auc" per epoch, ...).

    `candidates`: the images that may be labelled (default `labelled_candidates`); `local_idx`:
    images of `train_source` outside them, a second test set (a site's own held-out images),
    scored by the same probes and fine-tuned models under "local".
    """
    data.checks.same_task(train_source, test_source)
    cfg, mean, std = config.downstream, config.data.mean, config.data.std
    model = models.ViTClassifier(head, body, num_classes=train_source.num_classes)
    images = jnp.zeros((1, *train_source.image_shape))
    params = dict(model.init(jax.random.key(config.seed), images)["params"])
    if head_params is not None:
        params["head"] = head_params
    if body_params is not None:
        params["body"] = body_params

    if candidates is None:
        candidates = labelled_candidates(config, train_source)
    subsets = _subsets(config, train_source, candidates)
    largest = subsets[max(subsets)]  # nested: it holds every smaller subset
    test_idx = held_out_indices(config, test_source)
    start = time.perf_counter()
    extract = functools.partial(extract_features, model, params, batch_size=cfg.eval_batch_size,
                                mean=mean, std=std)
    train_feats, test_feats = extract(train_source, largest), extract(test_source, test_idx)
    local = None if local_idx is None else (extract(train_source, local_idx),
                                            Targets.of(train_source, local_idx))
    print(f"[{name}] features of {len(largest)} labelled + {len(test_idx)} test images, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    results = {"name": name, **_probe_features(
        config, name, train_feats, largest, subsets, Targets.of(train_source, largest),
        test_feats, Targets.of(test_source, test_idx), train_source.num_classes, local)}
    evaluate = functools.partial(evaluate_model, model, batch_size=cfg.eval_batch_size,
                                 mean=mean, std=std)

    results["finetune"] = {}
    for fraction in cfg.finetune_fractions:
        labelled = candidates[label_subset(train_source.labels[candidates], fraction,
                                           config.seed)]
        train_pos, val_pos = validation_split(train_source.labels[labelled],
                                              cfg.finetune_val_fraction, config.seed)
        start = time.perf_counter()
        tuned, info = fit(model, params, train_source, labelled[train_pos],
                          epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                          batch_size=cfg.batch_size, seed=config.seed, mean=mean, std=std,
                          augment=cfg.get("augment"), val_idx=labelled[val_pos],
                          patience=cfg.finetune_patience, eval_batch_size=cfg.eval_batch_size,
                          max_steps=cfg.finetune_max_steps, min_steps=cfg.finetune_min_steps)
        metrics = {**evaluate(tuned, test_source, test_idx), **info}
        results["finetune"][_key(fraction)] = metrics
        if local_idx is not None:
            results["local"].setdefault("finetune", {})[_key(fraction)] = evaluate(
                tuned, train_source, local_idx)
        _report(name, "finetune", fraction, len(labelled), metrics, start)
    return results


def evaluate_pixels(config, train_source, test_source, name: str = "raw pixels", *,
                    candidates: np.ndarray | None = None,
                    local_idx: np.ndarray | None = None) -> dict:
    """Linear probe and k-NN on raw pixels: the dict of `evaluate_body` without "finetune"
    (`candidates` and `local_idx` as in `evaluate_pretrained`)."""
    data.checks.same_task(train_source, test_source)
    if candidates is None:
        candidates = labelled_candidates(config, train_source)
    subsets = _subsets(config, train_source, candidates)
    largest = subsets[max(subsets)]
    test_idx = held_out_indices(config, test_source)
    local = None if local_idx is None else (raw_pixel_features(train_source, local_idx),
                                            Targets.of(train_source, local_idx))
    return {"name": name, **_probe_features(
        config, name, raw_pixel_features(train_source, largest), largest, subsets,
        Targets.of(train_source, largest), raw_pixel_features(test_source, test_idx),
        Targets.of(test_source, test_idx), train_source.num_classes, local)}


# ---------------------------------------------------------------- report

def _cell(metrics: dict, metric: str) -> str:
    """A table cell: accuracy in percent, or a mean AUC."""
    return f"{100 * metrics['accuracy']:.1f}" if metric == "accuracy" else f"{metrics['auc']:.3f}"


def results_table(results: list[dict], fractions) -> str:
    """A Markdown table of accuracies (percent, one decimal): one row per result dict;
    multi-label results show the mean AUC over findings (three decimals), and each column
    title says so.

    Columns: linear, k-NN and fine-tune at each of `fractions`; a column that no result
    has is left out, a missing entry is shown as "-".
    """
    metric = evaluation.headline_metric(results)
    unit = "" if metric == "accuracy" else " mean AUC"
    columns = [(method, _key(f), f"{title} {100 * f:g}%{unit}")
               for method, title in evaluation.PROBES.items()
               for f in fractions if any(_key(f) in r.get(method, {}) for r in results)]
    lines = ["| features / method | " + " | ".join(c[2] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r in results:
        cells = [_cell(r[m][f], metric) if f in r.get(m, {}) else "-" for m, f, _ in columns]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage


def at_site(config, layout: Layout, body: models.ViTBody, params, site: int
            ) -> tuple[Path, models.ViTBody, dict]:
    """What site `site` fine-tunes: `(its head's folder, body, params)`. The consortium head
    and the body as it came back; with per-site heads the site's own head and the body with
    its stem alone (`models.site_body`)."""
    if bool(body.site_stems) != bool(config.model.per_site_heads):
        raise SMSDError(f"the body has site_stems={body.site_stems} but config.model."
                        f"per_site_heads={config.model.per_site_heads}; use the config the "
                        "body was trained with")
    body, params = models.site_body(body, params, site)
    return consortium.site_head(config, layout, site, draw=False), body, params



def evaluate_task(config, head_dir, body: models.ViTBody, body_params, *,
                  baselines: bool = False) -> tuple[list[dict], str]:
    """One task of stage 3 (`config.data` is what is labelled): the results of the body, after
    raw pixels and the random body with `baselines`, and their Markdown table."""
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    segment = data.is_segmentation(train)
    results = []
    if baselines:
        pixels = segmentation.evaluate_pixels if segment else evaluate_pixels
        results.append(pixels(config, train, test))
        results.append(evaluate_body(config, head_dir, body, None, train_source=train,
                                     test_source=test, name="random body"))
    results.append(evaluate_body(config, head_dir, body, body_params, train_source=train,
                                 test_source=test, name="SMSD body"))
    table = (segmentation.results_table(results) if segment else
             results_table(results, config.downstream.label_fractions))
    return results, table


def downstream_stage(config, layout: Layout, head_dir: str | Path | None = None,
                     body_dir: str | Path | None = None, baselines: bool = False) -> list:
    """Stage 3 at a site of the work directory `layout`: probes of the body it got back
    (`body_dir`, default `layout.body`) with its head (`head_dir`, default `layout.head`) on
    `config.data`, or on each of `config.downstream.tasks` (`smsd_jax.tasks`); with
    `baselines`, the random body and raw pixels first. Writes `results/downstream.json` (the
    rows of every task, each with its "task" name when there are tasks) and
    `results/results.md` (a table per task); returns the rows. With per-site heads the site
    is `config.downstream.site` (-1: site 0), with its own head and stem (`at_site`)."""
    body, params, body_meta = export.load_body(body_dir or layout.body)
    own_head, body, params = at_site(config, layout, body, params,
                                     max(config.downstream.site, 0))
    head_dir = head_dir or own_head
    results, sections = [], []
    for name, task in tasks.task_configs(config):
        with tasks.named(name):
            rows, table = evaluate_task(task, head_dir, body, params, baselines=baselines)
        results += [{**row, "task": name} for row in rows] if name else rows
        sections.append(f"## {tasks.title(name, task)}\n\n{table}" if name else table)
    text = "\n\n".join(sections)
    if body_meta.get("keys") == keys.DEMO:
        text += (f"\n\nThe body was trained on payloads made with {keys.DEMO}: anyone can "
                 "rebuild them. Reproducible; not for real data.")
    files.write_json(layout.downstream_json, results)
    files.write_text(layout.results / "results.md", text + "\n")
    print(text)
    return results
