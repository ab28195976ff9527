"""Masked sampling distillation: the server's pure training step (no I/O).

A batch is a set of received samples `[batch, M, K, D]` (M encrypted samples of each image).
Each step forms views by masked sampling again: 2 global views per image, one from each of
two different samples (so teacher and student see different augmentations), and `num_local`
smaller local views for the student only. The student (body + DINO head) learns to match
the EMA teacher's centred, sharpened output on every other view.

The step is also image DINO's (the baselines): give `make_distill_step` a `views_fn` that
forms image crops `[batch, V, h, w, C]` and a network that takes images (`ImageDINONet`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from smsd_jax import ops


@flax.struct.dataclass
class DistillState:
    step: jax.Array
    student: Any  # params {"body", "dino_head"}
    teacher: Any
    opt_state: optax.OptState
    center: jax.Array  # [out_dim]


class Views(NamedTuple):
    """The views of each image of a batch: token subsets (SMSD) or image crops (image DINO).

    global_views: `[batch, 2, K_global, D]` or `[batch, 2, h, w, C]`.
    local_views: `[batch, num_local, K_local, D]` or `[batch, num_local, l, l, C]`; None
      without local views.
    """
    global_views: jax.Array
    local_views: jax.Array | None


class Schedules(NamedTuple):
    learning_rate: Callable
    weight_decay: Callable
    teacher_momentum: Callable
    teacher_temp: Callable


def make_views(key: jax.Array, samples: jax.Array, *, global_keep: float, local_keep: float,
               num_local: int) -> Views:
    """Forms the DINO views of each image by masked sub-sampling of its received samples.

    Args:
      key: a `jax.random` key.
      samples: `[batch, M, K, D]`, the M encrypted samples of each image.
      global_keep, local_keep: fraction of a sample's `K` tokens in a global / local view.
      num_local: local views per image (0 for none).

    Returns:
      `Views` with `global_views [batch, 2, Kg, D]`, where the two global views come from two
      different samples when `M >= 2`, and `local_views [batch, num_local, Kl, D]`, each from a
      random sample (None when `num_local` is 0).
    """
    chex.assert_rank(samples, 4)
    batch, m = samples.shape[:2]
    k_first, k_shift, k_local, k_gmask, k_lmask = jax.random.split(key, 5)
    first = jax.random.randint(k_first, (batch,), 0, m)
    # A shift in [1, M) makes the second global view's sample differ from the first's.
    second = (first + jax.random.randint(k_shift, (batch,), 1, max(m, 2))) % m
    local = jax.random.randint(k_local, (batch, num_local), 0, m)
    pick = lambda idx: jnp.take_along_axis(samples, idx[:, :, None, None], axis=1)
    global_views, _ = ops.mask_sample(k_gmask, pick(jnp.stack([first, second], 1)), global_keep)
    if not num_local:
        return Views(global_views, None)
    local_views, _ = ops.mask_sample(k_lmask, pick(local), local_keep)
    return Views(global_views, local_views)


def _logits(net: nn.Module, params, views: jax.Array) -> jax.Array:
    """views `[batch, V, ...]` -> logits `[V, batch, out_dim]` (batch-major for sharding).

    Only the two leading axes are merged, so a view may be tokens `[K, D]` or an image
    `[h, w, C]`.
    """
    batch, v = views.shape[:2]
    logits, _ = net.apply({"params": params}, views.reshape(batch * v, *views.shape[2:]))
    return logits.reshape(batch, v, -1).transpose(1, 0, 2)


def weight_decay_mask(params) -> Any:
    """Decay weight matrices only: not biases, norms, the class token or the last layer's g."""
    def decays(path, leaf):
        name = jax.tree_util.keystr(path)
        return leaf.ndim >= 2 and "cls_token" not in name
    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedules(cfg, total_steps: int, steps_per_epoch: int) -> Schedules:
    """The DINO schedules, per step, from a `config.server` ConfigDict."""
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)
    return Schedules(
        learning_rate=ops.warmup_cosine(cfg.lr, cfg.min_lr, total_steps, warmup),
        weight_decay=ops.warmup_cosine(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        teacher_momentum=ops.warmup_cosine(cfg.teacher_momentum, 1.0, total_steps),
        teacher_temp=ops.linear_warmup(cfg.teacher_temp, cfg.teacher_temp_final,
                                       int(cfg.teacher_temp_warmup_epochs * steps_per_epoch)),
    )


def make_optimizer(cfg, schedules: Schedules) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with scheduled learning rate and weight decay."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_grad),
        optax.adamw(schedules.learning_rate, b1=0.9, b2=0.999,
                    weight_decay=schedules.weight_decay, mask=weight_decay_mask),
    )


def init_state(key: jax.Array, net: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...]) -> DistillState:
    """Student and teacher start equal; the centre starts at zero.

    Args:
      input_shape: the shape of one view, without the batch axis, used only to build the
        parameters: `(K, D)` for tokens (`DINONet`), `(h, w, C)` for images (`ImageDINONet`).
    """
    params = net.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]
    return DistillState(
        step=jnp.zeros((), jnp.int32), student=params, teacher=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params), center=jnp.zeros((net.dino_head.out_dim,), jnp.float32))


def _freeze_last_layer(tree, frozen: jax.Array):
    """Zeroes the DINO head's last layer in `tree` (gradients or updates) while `frozen`."""
    head = dict(tree["dino_head"])
    for name in ("last_layer_v", "last_layer_g"):
        if name in head:
            head[name] = jnp.where(frozen, jnp.zeros_like(head[name]), head[name])
    return {**tree, "dino_head": head}


def make_distill_step(net: nn.Module, tx: optax.GradientTransformation, schedules: Schedules,
                      cfg, views_fn: Callable[[jax.Array, jax.Array], Views] | None = None
                      ) -> Callable[[DistillState, jax.Array, jax.Array],
                                    tuple[DistillState, dict]]:
    """Builds `step(state, samples, key) -> (state, metrics)`, pure, to jit.

    Args:
      net: the student / teacher network (`DINONet` for tokens, `ImageDINONet` for images).
      cfg: `config.server`: view sizes, temperatures, centre momentum, last-layer freeze.
      views_fn: `views_fn(key, samples) -> Views`, given the batch cast to float32 and a key
        fresh at each step. Default: SMSD's masked sampling (`make_views` with the view sizes
        of `cfg`) of samples `[batch, M, K, D]`.
    """
    if views_fn is None:
        views_fn = functools.partial(make_views, global_keep=cfg.global_keep,
                                     local_keep=cfg.local_keep, num_local=cfg.num_local)

    def step(state: DistillState, samples: jax.Array, key: jax.Array):
        samples = samples.astype(jnp.float32)  # payloads arrive as float16
        views = views_fn(jax.random.fold_in(key, state.step), samples)
        teacher_temp = schedules.teacher_temp(state.step)
        teacher_logits = _logits(net, state.teacher, views.global_views)

        def loss_fn(params):
            student_logits = _logits(net, params, views.global_views)
            if views.local_views is not None:
                student_logits = jnp.concatenate(
                    [student_logits, _logits(net, params, views.local_views)], axis=0)
            return ops.dino_loss(student_logits, teacher_logits, state.center,
                                 cfg.student_temp, teacher_temp)

        loss, grads = jax.value_and_grad(loss_fn)(state.student)
        frozen = state.step < cfg.freeze_last_layer_steps
        grads = _freeze_last_layer(grads, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, _freeze_last_layer(updates, frozen))
        momentum = schedules.teacher_momentum(state.step)
        new_state = DistillState(
            step=state.step + 1, student=student,
            teacher=ops.ema(state.teacher, student, momentum), opt_state=opt_state,
            center=ops.update_center(state.center, teacher_logits, cfg.center_momentum))
        metrics = dict(
            loss=loss, grad_norm=optax.tree.norm(grads),
            teacher_entropy=ops.teacher_entropy(teacher_logits, state.center, teacher_temp),
            lr=schedules.learning_rate(state.step), teacher_temp=teacher_temp,
            teacher_momentum=momentum)
        return new_state, metrics

    return step
