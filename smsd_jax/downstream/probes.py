"""Stage 3's pure math: label subsets, targets, and the two probes of frozen features.

A linear probe (`linear_probe`: softmax, or a sigmoid per finding for multi-label data) and
DINO's weighted k-NN (`knn_classify`) on features already extracted; the stratified label
subsets and validation splits every method is measured on. No I/O.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smsd_jax import data, evaluation, ops
from smsd_jax.errors import SMSDError

# Mixed into the seed of `validation_split`, so that its draw is not `label_subset`'s.
_VALIDATION_STREAM = 0x7A11D



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

