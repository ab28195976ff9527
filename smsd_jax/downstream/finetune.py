"""Fine-tuning head + body + tail at a site: AdamW, early stopping on a validation split,
and the parameters of the best epoch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smsd_jax import data, models, ops
from smsd_jax.downstream.features import forward, raw_pixel_features, score
from smsd_jax.downstream.probes import Targets, task_loss
from smsd_jax.errors import NotFiniteError, SMSDError


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


def deployable(model: models.ViTClassifier) -> models.ViTClassifier:
    """The model a site fine-tunes and keeps: `model` with every patch placed (`ViTHead`'s
    `constant_patches="placed"`, the same parameters), a standard ViT that `export.export_timm`
    writes exactly. The frozen-feature probes read the body as it was trained (blank patches
    unplaced, the privacy default); fine-tuning adapts head and body to the placed tokens."""
    return model.clone(head=model.head.clone(constant_patches="placed"))


def _train_step(model, tx, params, opt_state, images, labels, mask):
    def loss_fn(p):
        return task_loss(model.apply({"params": p}, images), labels, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _finetune_step(model, lr: float, weight_decay: float, total_steps: int):
    """`(tx, jitted step)`; cached, so fine-tunes with one budget share their compilation."""
    tx = optax.adamw(ops.warmup_cosine(lr, 0.0, total_steps, warmup_steps=total_steps // 10),
                     weight_decay=weight_decay)
    return tx, jax.jit(functools.partial(_train_step, model, tx))


def _selection_metric(source) -> str:
    """What fine-tuning selects its epoch by: accuracy, or mean AUC for multi-label data."""
    return "auc" if data.is_multilabel(source) else "accuracy"


class _Validator:
    """`validate(params) -> (score, loss)` on `source[indices]`: the selection metric as the
    test set is scored (`features.score`: accuracy, or mean AUC for multi-label data) and the
    training loss (`task_loss`).

    The images are read once and kept on the device; each call is one jitted forward per
    chunk of at most `batch_size` (the set is padded to whole chunks: one shape compiles).
    """

    def __init__(self, model, source, indices, *, batch_size: int):
        n = len(indices)
        self.chunk = max(1, min(batch_size, n))
        images = raw_pixel_features(source, indices).reshape(n, *source.image_shape)
        images = np.pad(images, ((0, -n % self.chunk),) + ((0, 0),) * 3)
        self.images = jnp.asarray(images).reshape(-1, self.chunk, *source.image_shape)
        self.targets = Targets.of(source, indices)
        self.model, self.metric = model, _selection_metric(source)
        self.multilabel = data.is_multilabel(source)

    def __call__(self, params) -> tuple[float, float]:
        labels, mask = self.targets.labels, self.targets.mask
        logits = np.concatenate([np.asarray(forward(self.model, params, chunk))
                                 for chunk in self.images])[:len(labels)]
        metrics = score(self.targets, logits, self.multilabel)
        loss = task_loss(jnp.asarray(logits, jnp.float32), labels, mask)
        return float(metrics[self.metric]), float(loss)


def fit(model: models.ViTClassifier, params, source, train_idx, *, epochs: int, lr: float,
        batch_size: int, seed: int, augment=None,
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
    tx, step = _finetune_step(model, lr, weight_decay, total_steps)
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
    validate = _Validator(model, source, val_idx,
                          batch_size=eval_batch_size or batch_size) if has_val else None
    params, info = best_epoch(run_epoch, validate, epochs=epochs, patience=patience,
                              metric=_selection_metric(source))
    return params, dict(info, steps=state["step"], steps_per_epoch=steps_per_epoch,
                        epochs_planned=epochs, patience=patience,
                        train_images=len(train_idx),
                        val_images=len(val_idx) if has_val else 0)
