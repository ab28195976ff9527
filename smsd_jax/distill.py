"""Masked sampling distillation: the server's pure training step (no I/O).

A batch is a set of received samples `[batch, M, K, D]` (M encrypted samples of each image).
Each step forms views by masked sampling again: 2 global views per image, one from each of
two different samples (so teacher and student see different augmentations), and `num_local`
smaller local views for the student only. The student (body + DINO head) learns to match
the EMA teacher's centred, sharpened output on every other view.

The step is also image DINO's (the baselines): give `make_distill_step` a `views_fn` that
forms image crops `[batch, V, h, w, C]` and a network that takes images (`ImageDINONet`).

The training recipe is facebookresearch/dino's (`main_dino.py`, `utils.py`): the learning rate
is the base rate at batch 256 scaled linearly with the global batch; gradients are clipped
tensor by tensor; AdamW decays every weight but biases and norms; the DINO head's last layer
is frozen for the first `freeze_last_layer_epochs`, skipped by AdamW as PyTorch skips a
parameter without a gradient; the student runs with stochastic depth, the teacher without.
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
    center: jax.Array  # [out_dim]; with per-site stems one per site, [num_sites, out_dim]


class Views(NamedTuple):
    """The views of each image of a batch: token subsets (SMSD) or image crops (image DINO).

    global_views: `[batch, 2, K_global, D]` or `[batch, 2, h, w, C]`.
    local_views: `[batch, num_local, K_local, D]` or `[batch, num_local, l, l, C]`; None
      without local views.
    """
    global_views: jax.Array
    local_views: jax.Array | None


class Schedules(NamedTuple):
    """Functions of the global step (an integer), usable inside `jit`."""
    learning_rate: Callable
    weight_decay: Callable
    teacher_momentum: Callable
    teacher_temp: Callable
    last_layer_frozen: Callable  # step -> bool: the DINO head's last layer is frozen


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


def _logits(net: nn.Module, params, views: jax.Array, *, deterministic: bool = True,
            key: jax.Array | None = None, sites: jax.Array | None = None) -> jax.Array:
    """views `[batch, V, ...]` -> logits `[V, batch, out_dim]` (batch-major for sharding).

    Only the two leading axes are merged, so a view may be tokens `[K, D]` or an image
    `[h, w, C]`. `deterministic=False` is the student's training forward: stochastic depth,
    drawn from `key` (the "drop_path" rng stream). `sites` `[batch]`: each image's site, for
    a body with per-site stems (every view of an image goes through its site's stem).
    """
    batch, v = views.shape[:2]
    flat = views.reshape(batch * v, *views.shape[2:])
    extra = {} if sites is None else {"sites": jnp.repeat(sites, v)}
    if deterministic:
        logits, _ = net.apply({"params": params}, flat, deterministic=True, **extra)
    else:
        logits, _ = net.apply({"params": params}, flat, deterministic=False,
                              rngs={"drop_path": key}, **extra)
    return logits.reshape(batch, v, -1).transpose(1, 0, 2)


def weight_decay_mask(params) -> Any:
    """DINO's `get_params_groups`: decay every parameter but biases and 1-D ones (norms).

    So weight matrices, the class token and (image DINO) the position embedding are decayed;
    biases and LayerNorm scales are not. The weight-normalised last layer's `last_layer_g`
    (only with `norm_last_layer=False`) is decayed too: it is 1-D here, but DINO's is
    PyTorch's `weight_norm` magnitude of shape `[out_dim, 1]`, which its rule decays.
    """
    def decays(path, leaf):
        name = getattr(path[-1], "key", None)
        return name != "bias" and (leaf.ndim >= 2 or name == "last_layer_g")
    return jax.tree_util.tree_map_with_path(decays, params)


def last_layer_mask(params) -> Any:
    """True at the DINO head's last layer (`dino_head.last_layer_v`, `last_layer_g`): the
    parameters DINO's `cancel_gradients_last_layer` freezes (names containing
    "last_layer")."""
    def is_last(path, _):
        names = [getattr(k, "key", None) for k in path]
        return "dino_head" in names and str(names[-1]).startswith("last_layer")
    return jax.tree_util.tree_map_with_path(is_last, params)


def make_schedules(cfg, total_steps: int, steps_per_epoch: int) -> Schedules:
    """The DINO schedules, per global step, from a `config.server` ConfigDict.

    The peak learning rate is `cfg.lr * cfg.batch_size / 256` (DINO's linear scaling rule:
    `cfg.lr` is the rate at a global batch of 256); `cfg.min_lr`, the cosine's end, is not
    scaled (nor is it in DINO). The last layer is frozen for the first
    `round(cfg.freeze_last_layer_epochs * steps_per_epoch)` steps.
    """
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)
    peak_lr = cfg.lr * cfg.batch_size / 256.0
    freeze_steps = int(round(cfg.freeze_last_layer_epochs * steps_per_epoch))
    return Schedules(
        learning_rate=ops.warmup_cosine(peak_lr, cfg.min_lr, total_steps, warmup),
        weight_decay=ops.warmup_cosine(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        teacher_momentum=ops.warmup_cosine(cfg.teacher_momentum, 1.0, total_steps),
        teacher_temp=ops.linear_warmup(cfg.teacher_temp, cfg.teacher_temp_final,
                                       int(cfg.teacher_temp_warmup_epochs * steps_per_epoch)),
        last_layer_frozen=lambda step: jnp.asarray(step) < freeze_steps,
    )


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """DINO's `utils.clip_gradients`: each gradient tensor clipped to its own L2 norm.

    For each leaf `g`: `coef = max_norm / (||g|| + 1e-6)`; if `coef < 1`, `g <- coef * g`,
    else `g` is unchanged. (Not one global norm over all gradients.)
    """
    def update_fn(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            coef = max_norm / (norm + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _global_step(extra_args: dict) -> jax.Array:
    if extra_args.get("global_step") is None:
        raise TypeError("this optimizer's update needs global_step=<the training step> "
                        "(distill.make_distill_step passes it)")
    return extra_args["global_step"]


def _skip_while(inner: optax.GradientTransformation, frozen: Callable
                ) -> optax.GradientTransformationExtraArgs:
    """`inner`, except at global steps where `frozen(global_step)`: zero updates and `inner`'s
    state unchanged (moments and step count), as PyTorch's optimizers skip a parameter whose
    gradient is None."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        skip = frozen(_global_step(extra_args))
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        new_state = jax.tree.map(lambda old, new: jnp.where(skip, old, new), state, new_state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _zero_while(mask: Callable, frozen: Callable) -> optax.GradientTransformationExtraArgs:
    """Zeroes the updates of the leaves of `mask(params)` while `frozen(global_step)`."""
    def update_fn(updates, state, params=None, **extra_args):
        skip = frozen(_global_step(extra_args))
        zero = lambda u, m: jnp.where(skip, jnp.zeros_like(u), u) if m else u
        return jax.tree.map(zero, updates, mask(updates)), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg, schedules: Schedules) -> optax.GradientTransformationExtraArgs:
    """DINO's optimizer: per-tensor clipping, then PyTorch's AdamW with the DINO head's last
    layer frozen early on.

    - `clip_by_tensor_norm(cfg.clip_grad)` (none when `cfg.clip_grad` is 0);
    - Adam (b1 0.9, b2 0.999, eps 1e-8, PyTorch's defaults) with decoupled weight decay on
      `weight_decay_mask`, learning rate and weight decay from `schedules` at the global step;
    - while `schedules.last_layer_frozen(global_step)`, the last layer (`last_layer_mask`) is
      skipped: no update, no weight decay, and its Adam moments and its own bias-correction
      count do not advance (it has its own Adam state), so its first update after the freeze
      is a fresh Adam step. Every other parameter trains throughout.

    `update` takes the extra argument `global_step` (the step's `state.step`). The learning
    rate and weight decay schedules run on optax's own counts, which advance every step and so
    equal the global step (`baselines.fedavg.at_clock` moves them with it).
    """
    labels = lambda params: jax.tree.map(lambda m: "last_layer" if m else "other",
                                         last_layer_mask(params))
    adam = lambda: optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    frozen = schedules.last_layer_frozen
    parts = [clip_by_tensor_norm(cfg.clip_grad)] if cfg.clip_grad > 0 else []
    parts += [
        optax.partition({"last_layer": _skip_while(adam(), frozen), "other": adam()}, labels),
        optax.add_decayed_weights(schedules.weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(schedules.learning_rate),
        _zero_while(last_layer_mask, frozen),
    ]
    return optax.chain(*parts)


def init_state(key: jax.Array, net: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...]) -> DistillState:
    """Student and teacher start equal; the centre starts at zero (a body with per-site
    stems: a centre per site, `ops.update_site_centers`).

    Args:
      input_shape: the shape of one view, without the batch axis, used only to build the
        parameters: `(K, D)` for tokens (`DINONet`), `(h, w, C)` for images (`ImageDINONet`).
    """
    sites = getattr(getattr(net, "body", None), "site_stems", 0)
    extra = {"sites": jnp.zeros((1,), jnp.int32)} if sites else {}
    params = net.init(key, jnp.zeros((1, *input_shape), jnp.float32), **extra)["params"]
    centers = (sites,) if sites else ()
    return DistillState(
        step=jnp.zeros((), jnp.int32), student=params, teacher=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        center=jnp.zeros((*centers, net.dino_head.out_dim), jnp.float32))


def _without_frozen(tree, frozen: jax.Array):
    """`tree` (gradients) with the DINO head's last layer zeroed while `frozen`."""
    return jax.tree.map(lambda g, m: jnp.where(frozen, jnp.zeros_like(g), g) if m else g,
                        tree, last_layer_mask(tree))


def make_distill_step(net: nn.Module, tx: optax.GradientTransformation, schedules: Schedules,
                      cfg, views_fn: Callable[[jax.Array, jax.Array], Views] | None = None
                      ) -> Callable[..., tuple[DistillState, dict]]:
    """Builds `step(state, samples, key, sites=None) -> (state, metrics)`, pure, to jit.

    `sites` `[batch]` (int): the site of each image, for a body with per-site stems
    (`ViTBody.site_stems`); None otherwise.

    Args:
      net: the student / teacher network (`DINONet` for tokens, `ImageDINONet` for images).
      tx: `make_optimizer`'s (its update is given `global_step=state.step`).
      schedules: `make_schedules`'s, per global step.
      cfg: `config.server`: view sizes, temperatures, centre momentum. The student runs with
        stochastic depth (`deterministic=False`, the rate is the network's), a fresh key each
        step and different keys for the global and the local views; the teacher without.
      views_fn: `views_fn(key, samples) -> Views`, given the batch cast to float32 and a key
        fresh at each step. Default: SMSD's masked sampling (`make_views` with the view sizes
        of `cfg`) of samples `[batch, M, K, D]`.
    """
    if views_fn is None:
        views_fn = functools.partial(make_views, global_keep=cfg.global_keep,
                                     local_keep=cfg.local_keep, num_local=cfg.num_local)

    def step(state: DistillState, samples: jax.Array, key: jax.Array,
             sites: jax.Array | None = None):
        samples = samples.astype(jnp.float32)  # payloads arrive as float16
        view_key, global_key, local_key = jax.random.split(jax.random.fold_in(key, state.step), 3)
        views = views_fn(view_key, samples)
        teacher_temp = schedules.teacher_temp(state.step)
        # No drop path in the teacher.
        teacher_logits = _logits(net, state.teacher, views.global_views, sites=sites)
        center = state.center if sites is None else state.center[sites]  # [out] or [B, out]
        new_center = (ops.update_center(state.center, teacher_logits, cfg.center_momentum)
                      if sites is None else ops.update_site_centers(
                          state.center, teacher_logits, sites, cfg.center_momentum))

        def loss_fn(params):
            student_logits = _logits(net, params, views.global_views, deterministic=False,
                                     key=global_key, sites=sites)
            if views.local_views is not None:
                local_logits = _logits(net, params, views.local_views, deterministic=False,
                                       key=local_key, sites=sites)
                student_logits = jnp.concatenate([student_logits, local_logits], axis=0)
            return ops.dino_loss(student_logits, teacher_logits, center, cfg.student_temp,
                                 teacher_temp)

        loss, grads = jax.value_and_grad(loss_fn)(state.student)
        updates, opt_state = optax.with_extra_args_support(tx).update(
            grads, state.opt_state, state.student, global_step=state.step)
        student = optax.apply_updates(state.student, updates)
        momentum = schedules.teacher_momentum(state.step)
        new_state = DistillState(
            step=state.step + 1, student=student,
            teacher=ops.ema(state.teacher, student, momentum), opt_state=opt_state,
            center=new_center)
        frozen = schedules.last_layer_frozen(state.step)
        metrics = dict(
            loss=loss, grad_norm=optax.tree.norm(_without_frozen(grads, frozen)),
            teacher_entropy=ops.teacher_entropy(teacher_logits, center, teacher_temp),
            lr=schedules.learning_rate(state.step), teacher_temp=teacher_temp,
            teacher_momentum=momentum)
        return new_state, metrics

    return step
