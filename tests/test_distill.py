"""The server's distillation step: views, learning signal, and 8 devices equal to 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from smsd_jax import distill, models, ops, sharding
from smsd_jax.data import fashion_mnist


def _config():
    return base.get_config("tiny")


def _real_samples(config, n=32, m=2, seed=0):
    """Encrypted samples [n, M, K, D] of real Fashion-MNIST images through a random head."""
    images = fashion_mnist("train").images[:n].astype(np.float32) / 255.0
    head = models.head_from_config(config)
    params = head.init(jax.random.key(seed), images)
    tokens = head.apply(params, images)  # [n, N, D]
    tokens = jnp.broadcast_to(tokens[:, None], (n, m, *tokens.shape[1:]))
    sent, _ = ops.encrypt(jax.random.key(seed + 1), tokens, config.site.keep)
    return sent


def test_views_are_subsets_of_two_different_samples():
    # Distinct random samples make the origin of every view token identifiable.
    samples = jax.random.normal(jax.random.key(0), (6, 3, 20, 8))
    views = distill.make_views(jax.random.key(1), samples, global_keep=0.75, local_keep=0.25,
                               num_local=4)
    assert views.global_views.shape == (6, 2, 15, 8)
    assert views.local_views.shape == (6, 4, 5, 8)
    for b in range(6):
        origin = []
        for v in range(2):
            rows = np.asarray(views.global_views[b, v])
            match = [m for m in range(3) if all(
                np.any(np.all(np.asarray(samples[b, m]) == r, axis=-1)) for r in rows)]
            assert len(match) == 1
            origin.append(match[0])
        assert origin[0] != origin[1]


def test_single_sample_gives_two_masked_views_of_it():
    samples = jax.random.normal(jax.random.key(0), (4, 1, 20, 8))
    views = distill.make_views(jax.random.key(1), samples, global_keep=0.5, local_keep=0.25,
                               num_local=0)
    assert views.local_views is None
    assert views.global_views.shape == (4, 2, 10, 8)


def _setup(config, steps):
    net = models.dino_net_from_config(config)
    schedules = distill.make_schedules(config.server, total_steps=steps, steps_per_epoch=steps)
    tx = distill.make_optimizer(config.server, schedules)
    k = ops.num_kept(49, config.site.keep)
    state = distill.init_state(jax.random.key(0), net, tx, (k, net.body.dim))
    return state, distill.make_distill_step(net, tx, schedules, config.server)


def _run(num_devices, fsdp, steps=3):
    config = _config()
    config.server.fsdp = fsdp
    samples = np.asarray(_real_samples(config))
    state, step = _setup(config, steps)
    mesh = sharding.make_mesh(num_devices)
    state_sh = sharding.state_sharding(state, mesh, fsdp)
    state = jax.device_put(state, state_sh)
    jitted = jax.jit(step, out_shardings=(state_sh, sharding.replicated(mesh)),
                     donate_argnums=0)
    losses = []
    for _ in range(steps):
        state, metrics = jitted(state, sharding.put_batch(samples, mesh), jax.random.key(3))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("fsdp", [False, True])
def test_eight_devices_equal_one(fsdp):
    assert jax.device_count() == 8
    state1, losses1 = _run(1, fsdp=False)
    state8, losses8 = _run(8, fsdp=fsdp)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if fsdp:
        kernel = state8.student["body"]["block0"]["fc1"]["kernel"]  # [32, 128]
        assert not kernel.sharding.is_fully_replicated
        assert kernel.addressable_shards[0].data.size == kernel.size // 8


def test_student_learns_to_match_a_fixed_teacher():
    # Teacher, centre and temperature held fixed: the objective is then stationary, and the
    # student's loss on fresh views of the same images must fall.
    config = _config()
    config.server.update(teacher_momentum=1.0, center_momentum=1.0, lr=1e-3, warmup_epochs=0.0)
    config.server.teacher_temp_final = config.server.teacher_temp
    state, step = _setup(config, steps=30)
    samples, step = _real_samples(config), jax.jit(step)
    teacher0 = state.teacher
    losses = []
    for _ in range(30):
        state, metrics = step(state, samples, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    unchanged = jax.tree.map(np.array_equal, teacher0, state.teacher)
    assert all(jax.tree.leaves(unchanged))


def test_teacher_moves_by_exactly_the_ema():
    config = _config()
    state, step = _setup(config, steps=5)
    before = state
    state, metrics = jax.jit(step)(state, _real_samples(config), jax.random.key(0))
    m = float(metrics["teacher_momentum"])
    w = lambda s: np.asarray(s["body"]["block0"]["fc1"]["kernel"])
    np.testing.assert_allclose(w(state.teacher), m * w(before.teacher) + (1 - m) * w(state.student),
                               rtol=1e-5, atol=1e-7)
    assert not np.array_equal(w(state.student), w(before.student))
    assert int(state.step) == 1


def test_last_layer_frozen_while_asked():
    config = _config()
    config.server.freeze_last_layer_steps = 2
    state, step = _setup(config, steps=4)
    samples = _real_samples(config)
    v0 = np.asarray(state.student["dino_head"]["last_layer_v"])
    for i in range(3):
        state, _ = jax.jit(step)(state, samples, jax.random.key(0))
        v = np.asarray(state.student["dino_head"]["last_layer_v"])
        if i < 2:
            np.testing.assert_array_equal(v, v0)
    assert not np.array_equal(v, v0)
