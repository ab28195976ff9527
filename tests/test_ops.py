"""The functional ops: masked sampling, permutation encryption, DINO math, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsd_jax import ops


def _tokens(shape, seed=0):
    # Random inputs on purpose: these are properties of the ops, for any tokens.
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("keep,n", [(0.5, 49), (0.25, 49), (1.0, 16), (0.75, 196)])
def test_encrypt_sends_k_distinct_rows_of_its_input(keep, n):
    x = _tokens((3, n, 8))
    sent, positions = jax.jit(ops.encrypt, static_argnums=2)(jax.random.key(1), x, keep)
    k = int(round(keep * n))
    assert sent.shape == (3, k, 8) and positions.shape == (3, k)
    for b in range(3):
        assert len(set(np.asarray(positions[b]).tolist())) == k  # distinct
        np.testing.assert_array_equal(sent[b], x[b][positions[b]])  # exactly rows of x


def test_encrypt_shuffles_order():
    x = _tokens((4, 49, 8))
    _, positions = ops.encrypt(jax.random.key(3), x, 0.5)
    assert not all(np.all(np.diff(np.asarray(p)) > 0) for p in positions)


def test_encrypt_without_shuffle_keeps_grid_order():
    x = _tokens((4, 49, 8))
    shuffled, _ = ops.encrypt(jax.random.key(3), x, 0.5)
    sent, positions = ops.encrypt(jax.random.key(3), x, 0.5, shuffle=False)
    assert np.all(np.diff(np.asarray(positions), axis=-1) > 0)  # increasing: grid order
    np.testing.assert_array_equal(sent, jnp.take_along_axis(x, positions[..., None], axis=-2))
    # The same key keeps the same tokens; only their order differs.
    np.testing.assert_array_equal(np.sort(np.asarray(shuffled), axis=1),
                                  np.sort(np.asarray(sent), axis=1))


def test_mask_sample_keeps_order_and_indices():
    x = _tokens((2, 3, 20, 4))  # two leading axes
    kept, idx = ops.mask_sample(jax.random.key(0), x, 0.4)
    assert kept.shape == (2, 3, 8, 4)
    assert np.all(np.diff(np.asarray(idx), axis=-1) > 0)
    np.testing.assert_array_equal(kept, jnp.take_along_axis(x, idx[..., None], axis=-2))


def test_unpermute_inverts_permute():
    x = _tokens((5, 17, 6))
    shuffled, perm = ops.permute(jax.random.key(2), x)
    assert not np.array_equal(shuffled, x)
    np.testing.assert_array_equal(ops.unpermute(shuffled, perm), x)


def test_same_key_same_result_other_key_other_result():
    x = _tokens((2, 49, 8))
    a, pa = ops.encrypt(jax.random.key(7), x, 0.5)
    b, pb = ops.encrypt(jax.random.key(7), x, 0.5)
    c, pc = ops.encrypt(jax.random.key(8), x, 0.5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_encrypt_under_vmap_with_per_example_keys():
    x = _tokens((4, 49, 8))
    keys = jax.random.split(jax.random.key(0), 4)
    sent, positions = jax.vmap(lambda k, t: ops.encrypt(k, t, 0.5))(keys, x)
    np.testing.assert_array_equal(sent, jnp.take_along_axis(x, positions[..., None], axis=-2))


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_keep_outside_unit_interval_is_refused(keep):
    with pytest.raises(ValueError, match="keep"):
        ops.encrypt(jax.random.key(0), _tokens((1, 49, 4)), keep)


def test_keep_that_rounds_to_zero_tokens_is_refused():
    with pytest.raises(ValueError, match="keeps no token"):
        ops.mask_sample(jax.random.key(0), _tokens((1, 4, 4)), 0.1)


def _dino_loss_numpy(student, teacher, center, st, tt):
    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)
    total, pairs = 0.0, 0
    for t in range(teacher.shape[0]):
        q = softmax((teacher[t] - center) / tt)
        for s in range(student.shape[0]):
            if s == t:
                continue
            log_p = np.log(softmax(student[s] / st))
            total += np.mean(np.sum(-q * log_p, axis=-1))
            pairs += 1
    return total / pairs


def test_dino_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 5, 32)).astype(np.float32) * 3
    teacher = rng.normal(size=(2, 5, 32)).astype(np.float32) * 3
    center = rng.normal(size=(32,)).astype(np.float32)
    got = ops.dino_loss(student, teacher, center, 0.1, 0.04)
    want = _dino_loss_numpy(student.astype(np.float64), teacher.astype(np.float64),
                            center.astype(np.float64), 0.1, 0.04)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_no_gradient_reaches_the_teacher():
    student = _tokens((4, 3, 16), 1)
    teacher = _tokens((2, 3, 16), 2)
    center = jnp.zeros(16)
    g_student, g_teacher = jax.grad(ops.dino_loss, argnums=(0, 1))(student, teacher, center,
                                                                  0.1, 0.04)
    assert np.abs(g_student).sum() > 0
    np.testing.assert_array_equal(g_teacher, 0.0)


def test_update_center_and_ema():
    logits = _tokens((2, 8, 10))
    center = ops.update_center(jnp.ones(10), logits, 0.9)
    np.testing.assert_allclose(center, 0.9 + 0.1 * np.mean(np.asarray(logits), axis=(0, 1)),
                               rtol=1e-6)
    teacher = {"w": jnp.zeros(3)}
    out = ops.ema(teacher, {"w": jnp.ones(3)}, 0.75)
    np.testing.assert_allclose(out["w"], 0.25)


def test_schedules():
    lr = ops.warmup_cosine(1.0, 0.1, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100), lr(500)],
                               [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    temp = ops.linear_warmup(0.04, 0.07, 30)
    np.testing.assert_allclose([temp(0), temp(15), temp(30), temp(99)],
                               [0.04, 0.055, 0.07, 0.07], atol=1e-7)
    with pytest.raises(ValueError):
        ops.warmup_cosine(1.0, 0.0, total_steps=10, warmup_steps=11)


def test_teacher_entropy_bounds():
    out_dim = 64
    uniform = ops.teacher_entropy(jnp.zeros((2, 4, out_dim)), jnp.zeros(out_dim), 0.04)
    np.testing.assert_allclose(uniform, np.log(out_dim), rtol=1e-5)
    peaked = ops.teacher_entropy(jnp.eye(out_dim)[None, :4] * 100, jnp.zeros(out_dim), 0.04)
    assert peaked < 1e-3


@pytest.mark.slow
def test_a_centre_per_site_removes_an_output_that_only_names_the_site():
    # A teacher whose logits say only which of 3 sites an image came from: one centre leaves
    # its targets one-hot (the collapse onto the sites); a centre per site flattens them.
    out_dim, sites = 16, jnp.array([0, 1, 2, 0, 1, 2, 1, 1])
    per_site = 5.0 * jax.nn.one_hot(jnp.array([3, 7, 11]), out_dim)
    logits = jnp.broadcast_to(per_site[sites], (2, len(sites), out_dim))
    one, centres = jnp.zeros(out_dim), jnp.zeros((4, out_dim))  # site 3 sends nothing
    for _ in range(200):
        one = ops.update_center(one, logits, 0.9)
        centres = ops.update_site_centers(centres, logits, sites, 0.9)
    assert float(ops.teacher_entropy(logits, one, 0.04)) < 0.01
    assert float(ops.teacher_entropy(logits, centres[sites], 0.04)) > 0.99 * np.log(out_dim)
    np.testing.assert_allclose(centres[:3], per_site, atol=1e-4)
    np.testing.assert_array_equal(centres[3], 0.0)  # a site without images keeps its centre
    # The loss takes each image's centre the same way.
    loss = ops.dino_loss(logits, logits, centres[sites], 0.1, 0.04)
    assert np.isfinite(float(loss))
