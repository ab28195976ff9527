"""Segmentation at a site: a dense tail on the body's patch tokens, Dice + cross-entropy.

A site knows the order of its own patches, so downstream it runs its head and the body on all
N tokens of an image in grid order; the body is order-equivariant, so the token features come
back in that order. The tail is linear per patch: each token's feature gives the class logits
of the p x p pixels of its patch (the linear decoder of SETR and Segmenter). It is light on
purpose: like the linear probe on the class feature, it measures what a linear map reads from
a frozen body's token features, not what a decoder can learn on top. Raw pixels get the same
tail on each patch's own normalised values and its position: the baseline without a body.

    feats = token_features(model, params, source.images, ...)      # [n, N, F]
    tail = fit_tail(key, feats, masks, num_classes=K, patch=p, ...)
    conf = confusion(predict(tail, test_feats, patch=p), test_masks, K)
    segmentation_metrics(conf, class_names)   # Dice and IoU per class, their means

Training: `dice_ce_loss`, pixel cross-entropy plus one minus the mean soft Dice of the
foreground classes present in the batch (nnU-Net's pairing, Dice over the whole batch).
Metrics count pixels over the whole test set (a confusion matrix), then Dice = 2TP / (2TP +
FP + FN) and IoU = TP / (TP + FP + FN) per class; a class absent from both truth and prediction has none (None) and is left out of
the means, which are over foreground classes (class 0, the background, is reported apart).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smsd_jax import data, models
from smsd_jax.errors import NotFiniteError, SMSDError

_SMOOTH = 1e-5  # keeps the soft Dice of a class absent from a batch defined


# ---------------------------------------------------------------- the tail, pure


def unpatchify(x: jax.Array, patch: int) -> jax.Array:
    """`[B, N, p*p*C]` in `models.patchify`'s order -> `[B, S, S, C]`, S = p * sqrt(N)."""
    b, n, values = x.shape
    side, c = int(round(np.sqrt(n))), values // (patch * patch)
    if side * side != n or c * patch * patch != values:
        raise SMSDError(f"cannot unpatchify {x.shape} with patch {patch}: need a square number"
                        " of patches and p*p*C values each")
    x = x.reshape(b, side, side, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, side * patch, side * patch, c)


def init_tail(key: jax.Array, in_dim: int, patch: int, num_classes: int) -> dict:
    """A linear map from one token's feature to the logits of its patch's pixels."""
    out = patch * patch * num_classes
    return dict(w=jax.random.normal(key, (in_dim, out)) / np.sqrt(in_dim),
                b=jnp.zeros((out,)))


def tail_logits(params: dict, feats: jax.Array, patch: int) -> jax.Array:
    """feats `[B, N, F]` -> logits `[B, S, S, K]` (float32)."""
    return unpatchify(feats.astype(jnp.float32) @ params["w"] + params["b"], patch)


def dice_ce_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Pixel cross-entropy plus one minus the mean soft Dice of the foreground classes in the
    batch's masks (a class absent from them has no overlap to score), over the batch.
    logits `[B, H, W, K]`, masks int `[B, H, W]`."""
    onehot = jax.nn.one_hot(masks, logits.shape[-1])
    ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
    probs = jax.nn.softmax(logits)
    inter, truth = jnp.sum(probs * onehot, axis=(0, 1, 2)), jnp.sum(onehot, axis=(0, 1, 2))
    dice = (2.0 * inter + _SMOOTH) / (jnp.sum(probs, axis=(0, 1, 2)) + truth + _SMOOTH)
    present = (truth[1:] > 0).astype(jnp.float32)
    return ce + jnp.sum((1.0 - dice[1:]) * present) / jnp.maximum(present.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("patch",))
def _classes(params: dict, feats: jax.Array, patch: int) -> jax.Array:
    return jnp.argmax(tail_logits(params, feats, patch), -1).astype(jnp.uint8)


def predict(params: dict, feats, patch: int, batch_size: int = 256) -> np.ndarray:
    """The class of every pixel: uint8 `[n, S, S]` (one compiled function for every tail)."""
    return np.concatenate([np.asarray(_classes(params, feats[i:i + batch_size], patch))
                           for i in range(0, len(feats), batch_size)])


def confusion(pred: np.ndarray, masks: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 `[K, K]`: pixels of true class i predicted as j."""
    index = masks.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, class_names) -> dict:
    """Dice and IoU per class (None for a class absent from truth and prediction), their
    means over the foreground classes that have one, and pixel accuracy; "classes" keeps the
    classes' order (JSON files sort the keys of the per-class dicts)."""
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(axis=0) - tp, conf.sum(axis=1) - tp
    dice, iou = {}, {}
    for k, name in enumerate(class_names):
        present = tp[k] + fp[k] + fn[k] > 0
        dice[name] = float(2 * tp[k] / (2 * tp[k] + fp[k] + fn[k])) if present else None
        iou[name] = float(tp[k] / (tp[k] + fp[k] + fn[k])) if present else None
    fg = [n for n in class_names[1:] if dice[n] is not None]
    return dict(classes=list(class_names), dice=dice, iou=iou,
                mean_dice=float(np.mean([dice[n] for n in fg])),
                mean_iou=float(np.mean([iou[n] for n in fg])),
                pixel_accuracy=float(tp.sum() / conf.sum()))


@functools.partial(jax.jit, static_argnames=("tx", "patch", "batch"), donate_argnums=(3, 4))
def _tail_step(tx, patch, batch, params, opt_state, feats, masks, key):
    rows = jax.random.choice(key, len(feats), (batch,), replace=False)
    loss, grads = jax.value_and_grad(
        lambda p: dice_ce_loss(tail_logits(p, feats[rows], patch), masks[rows]))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit_tail(key: jax.Array, feats: np.ndarray, masks: np.ndarray, *, num_classes: int,
             patch: int, steps: int, lr: float, batch_size: int) -> dict:
    """The tail trained with Adam (cosine decay) on random batches of (features, mask)."""
    init_key, key = jax.random.split(key)
    params = init_tail(init_key, feats.shape[-1], patch, num_classes)
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
    opt_state = tx.init(params)
    feats, masks = jnp.asarray(feats), jnp.asarray(masks, jnp.int32)
    loss = jnp.nan
    for step in range(steps):
        params, opt_state, loss = _tail_step(tx, patch, min(batch_size, len(feats)), params,
                                             opt_state, feats, masks,
                                             jax.random.fold_in(key, step))
    if not np.isfinite(float(loss)):
        raise NotFiniteError(f"the segmentation tail's loss is {float(loss)} after {steps} "
                             "steps; lower config.downstream.segment_lr")
    return params


# ---------------------------------------------------------------- features of a source


@functools.partial(jax.jit, static_argnames=("model",))
def _tokens(model: models.ViTClassifier, params, images):
    return model.apply({"params": params}, images, method="token_features")


def _normalised(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(255) - mean) / std


def token_features(model: models.ViTClassifier, params, images: np.ndarray, *,
                   batch_size: int) -> np.ndarray:
    """The body's token features of uint8 `images [n, H, W, C]`, all patches in grid order:
    `[n, N, D]` (the last batch padded, so that one shape compiles; the model normalises)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].astype(np.float32) / np.float32(255)
        padded = np.pad(x, ((0, batch_size - len(x)),) + ((0, 0),) * 3)
        out.append(np.asarray(_tokens(model, params, padded))[:len(x)])
    return np.concatenate(out)


def pixel_features(images: np.ndarray, *, patch: int, mean: float, std: float) -> np.ndarray:
    """Each patch's own normalised pixel values and a one-hot of its position: `[n, N,
    p*p*C + N]`, the tail's input without a body. A site knows where its patches are, so this
    baseline does too; on its pixels alone a per-patch map cannot tell one lobe from another."""
    pixels = np.asarray(models.patchify(jnp.asarray(_normalised(images, mean, std)), patch))
    n, num = pixels.shape[:2]
    where = np.broadcast_to(np.eye(num, dtype=np.float32), (n, num, num))
    return np.concatenate([pixels, where], axis=-1)


# ---------------------------------------------------------------- the protocol


def _check(train_source, test_source) -> None:
    for source in (train_source, test_source):
        if not data.is_segmentation(source):
            raise SMSDError(f"{source.name} has no masks; segmentation needs "
                            "config.data.task='segmentation' and a mask source")
    if train_source.class_names != test_source.class_names:
        raise SMSDError(f"{train_source.name} has classes {train_source.class_names} but "
                        f"{test_source.name} has {test_source.class_names}; both splits need "
                        "the same classes in the same order")


def evaluate_features(config, name: str, train_feats, test_feats, train_source,
                      test_source, patch: int) -> dict:
    """Fits the tail on `train_feats` (every labelled training image) and scores it on
    `test_feats`; returns `{"name", "segment": segmentation_metrics + "images"}`."""
    cfg = config.downstream
    start = time.perf_counter()
    tail = fit_tail(jax.random.key(config.seed), train_feats,
                    train_source.masks,
                    num_classes=train_source.num_classes, patch=patch,
                    steps=cfg.segment_steps, lr=cfg.segment_lr, batch_size=cfg.batch_size)
    conf = confusion(predict(tail, test_feats, patch), test_source.masks,
                     train_source.num_classes)
    metrics = dict(segmentation_metrics(conf, train_source.class_names),
                   images=dict(train=len(train_source), test=len(test_source)))
    print(f"[{name}] segmentation tail on {len(train_source)} images: mean Dice "
          f"{metrics['mean_dice']:.3f}, mean IoU {metrics['mean_iou']:.3f} on "
          f"{len(test_source)} test images, {time.perf_counter() - start:.1f} s", flush=True)
    return {"name": name, "segment": metrics}


def evaluate_pretrained(config, head: models.ViTHead, head_params, body: models.ViTBody,
                        body_params, *, train_source, test_source, name: str) -> dict:
    """The tail on the frozen token features of head + body (`body_params` None: the body
    randomly initialised from `config.seed`)."""
    _check(train_source, test_source)
    model = models.ViTClassifier(head, body, num_classes=train_source.num_classes,
                                 mean=config.data.mean, std=config.data.std)
    params = dict(model.init(jax.random.key(config.seed),
                             jnp.zeros((1, *train_source.image_shape)))["params"])
    if head_params is not None:
        params["head"] = head_params
    if body_params is not None:
        params["body"] = body_params
    extract = functools.partial(token_features, model, params,
                                batch_size=config.downstream.eval_batch_size)
    feats = [extract(s.images) for s in (train_source, test_source)]
    return evaluate_features(config, name, *feats, train_source, test_source, head.patch_size)


def evaluate_pixels(config, train_source, test_source, name: str = "raw pixels") -> dict:
    """The same tail on each patch's own pixels and position (`pixel_features`)."""
    _check(train_source, test_source)
    patch = config.model.patch_size
    feats = [pixel_features(s.images, patch=patch, mean=config.data.mean, std=config.data.std)
             for s in (train_source, test_source)]
    return evaluate_features(config, name, *feats, train_source, test_source, patch)


def results_table(results: list[dict]) -> str:
    """Markdown: one row per result, Dice per foreground class, mean Dice and mean IoU."""
    classes = results[0]["segment"]["classes"][1:]
    lines = ["| features | " + " | ".join(f"Dice {c}" for c in classes)
             + " | mean Dice | mean IoU |", "|---|" + "---|" * (len(classes) + 2)]
    for r in results:
        m = r["segment"]
        cells = ["-" if m["dice"][c] is None else f"{m['dice'][c]:.3f}" for c in classes]
        lines.append(f"| {r['name']} | " + " | ".join(cells)
                     + f" | {m['mean_dice']:.3f} | {m['mean_iou']:.3f} |")
    return "\n".join(lines)
