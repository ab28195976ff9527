"""DINO self-distillation math: loss, centering, EMA teacher, and the schedules that drive them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax.errors import SMSDError, check_rank


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temp: float | jax.Array, teacher_temp: float | jax.Array) -> jax.Array:
    """Cross-entropy from each teacher view to every other student view (DINO).

    The teacher is centred and sharpened (`softmax((t - center) / teacher_temp)`), the student
    softened by `student_temp`. Teacher view `i` and student view `i` are the same view and are
    not paired; every other (teacher, student) pair is, and the loss is their mean. No
    gradient flows into the teacher.

    Args:
      student_logits: `[S, batch, out_dim]`; the first `T` views are the teacher's views.
      teacher_logits: `[T, batch, out_dim]`, `T <= S`.
      center: `[out_dim]`, or `[batch, out_dim]`: each image's own (its site's centre with
        per-site heads, `update_site_centers`).
      student_temp, teacher_temp: scalars.

    Returns:
      A float32 scalar.
    """
    check_rank("student_logits", student_logits, 3)
    check_rank("teacher_logits", teacher_logits, 3)
    check_rank("center", center, {1, 2})
    if student_logits.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(f"student_logits {student_logits.shape} and teacher_logits "
                         f"{teacher_logits.shape} differ past their first axis")
    num_teacher, num_student = teacher_logits.shape[0], student_logits.shape[0]
    if num_student < 2 or num_teacher > num_student:
        raise SMSDError(f"need 2 <= student views ({num_student}) and teacher views "
                        f"({num_teacher}) <= student views")
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) - center)
    targets = jax.nn.softmax(teacher / teacher_temp, axis=-1)
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    # cross[t, s] = mean over the batch of H(target_t, student_s).
    cross = -jnp.einsum("tbo,sbo->ts", targets, log_probs) / student_logits.shape[1]
    not_same = 1.0 - jnp.eye(num_teacher, num_student)
    return jnp.sum(cross * not_same) / jnp.sum(not_same)


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """EMA of the teacher's mean logit over all views and the whole (global) batch.

    Args:
      center: `[out_dim]`.
      teacher_logits: `[T, batch, out_dim]`. Under `jit` with a sharded batch the mean is
        over the global batch, across devices and hosts.
      momentum: the centre's EMA momentum (0.9 in DINO).

    Returns:
      The new centre, `[out_dim]` float32.
    """
    check_rank("center", center, 1)
    check_rank("teacher_logits", teacher_logits, 3)
    batch_mean = jnp.mean(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=(0, 1))
    return momentum * center + (1.0 - momentum) * batch_mean


def update_site_centers(centers: jax.Array, teacher_logits: jax.Array, sites: jax.Array,
                        momentum: float) -> jax.Array:
    """`update_center` for each site apart: site s's centre follows the teacher's mean logit
    over its own images of the batch (all views), and stays as it is when it has none.

    With a head and a stem per site, a teacher whose output says only which site an image
    came from is a solution that one centre cannot remove (it is not constant over the
    batch) and that the student matches from the stem alone, a collapse onto the sites. A
    centre per site removes every per-site constant, as DINO's centre removes a constant.

    Args:
      centers: `[num_sites, out_dim]`.
      teacher_logits: `[T, batch, out_dim]` (a sharded batch: means over the global batch).
      sites: `[batch]` int, each image's site.
      momentum: the EMA momentum (`update_center`'s).

    Returns:
      The new centres, `[num_sites, out_dim]` float32.
    """
    check_rank("centers", centers, 2)
    check_rank("teacher_logits", teacher_logits, 3)
    check_rank("sites", sites, 1)
    per_image = jnp.mean(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=0)
    member = jax.nn.one_hot(sites, centers.shape[0], dtype=jnp.float32)  # [batch, sites]
    counts = member.sum(0)[:, None]
    means = (member.T @ per_image) / jnp.maximum(counts, 1.0)
    updated = momentum * centers + (1.0 - momentum) * means
    return jnp.where(counts > 0, updated, centers)


def ema(teacher, student, momentum: float | jax.Array):
    """`teacher <- momentum * teacher + (1 - momentum) * student`, leaf by leaf."""
    return jax.tree.map(
        lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype), teacher, student)


def teacher_entropy(teacher_logits: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """Mean entropy (nats) of the teacher's centred, sharpened targets (`center` as
    `dino_loss` takes it).

    Near `ln(out_dim)`: uniform collapse; near 0: one-hot collapse.
    """
    targets = jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / teacher_temp, -1)
    return -jnp.mean(jnp.sum(targets * jnp.log(targets + 1e-12), axis=-1))


# Schedules: functions of the (integer) step, usable as optax schedules inside `jit`.

def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  start: float = 0.0):
    """Linear warm-up from `start` to `base` over `warmup_steps`, then cosine to `final`.

    Returns:
      `schedule(step) -> float32` for `step` in `[0, total_steps]`; constant after.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise SMSDError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                        f"total_steps={total_steps}, warmup_steps={warmup_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = start + (base - start) * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(np.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def linear_warmup(start: float, end: float, warmup_steps: int):
    """Linear from `start` to `end` over `warmup_steps`, then `end` (teacher temperature)."""
    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
        return start + (end - start) * frac

    return schedule
