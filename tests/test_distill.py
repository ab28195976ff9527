"""The server's distillation step: views, learning signal, and 8 devices equal to 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_single_sample_gives_two_masked_views_of_it():
    samples = jax.random.normal(jax.random.key(0), (4, 1, 20, 8))
    views = distill.make_views(jax.random.key(1), samples, global_keep=0.5, local_keep=0.25,
                               num_local=0)
    assert views.local_views is None
    assert views.global_views.shape == (4, 2, 10, 8)


def _setup(config, steps, tx=None):
    net = models.dino_net_from_config(config)
    schedules = distill.make_schedules(config.server, total_steps=steps, steps_per_epoch=steps)
    tx = distill.make_optimizer(config.server, schedules) if tx is None else tx
    k = ops.num_kept(49, config.site.keep)
    state = distill.init_state(jax.random.key(0), net, tx, (k, net.body.input_dim))
    return state, distill.make_distill_step(net, tx, schedules, config.server)


@functools.lru_cache(maxsize=None)
def _run(num_devices, fsdp, optimizer="dino", steps=3):
    """The state after `steps` steps on `num_devices` devices, with DINO's AdamW or plain SGD
    (whose parameter change is the learning rate times the summed gradients)."""
    config = _config()
    config.server.fsdp = fsdp
    samples = np.asarray(_real_samples(config))
    state, step = _setup(config, steps, tx=optax.sgd(0.1) if optimizer == "sgd" else None)
    initial = jax.device_get(state)
    mesh = sharding.make_mesh(num_devices)
    state_sh = sharding.state_sharding(state, mesh, fsdp)
    state = jax.device_put(state, state_sh)
    jitted = jax.jit(step, out_shardings=(state_sh, sharding.replicated(mesh)),
                     donate_argnums=0)
    losses = []
    for _ in range(steps):
        state, metrics = jitted(state, sharding.put_batch(samples, mesh), jax.random.key(3))
        losses.append(float(metrics["loss"]))
    return initial, state, losses


def _assert_moved_alike(initial, one, eight):
    """Each tensor moved by the same amount on 8 devices as on 1, up to float32 rounding of
    the reductions, relative to how far that tensor moved (its update's scale)."""
    for p0, a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(one), jax.tree.leaves(eight)):
        moved1, moved8 = np.asarray(a, np.float64) - p0, np.asarray(b, np.float64) - p0
        scale = np.max(np.abs(moved1))
        # Summation order changes a float32 sum of n terms by about sqrt(n) ulps of its
        # largest terms, and three steps compound it (1.5e-5 of the largest move at most,
        # measured); a wrong reduction (a missing shard, a mean over the wrong axis) is off
        # by a factor. 1e-3 of the largest move lies between the two.
        np.testing.assert_allclose(moved8, moved1, rtol=0, atol=1e-3 * scale + 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_eight_devices_equal_one(fsdp):
    assert jax.device_count() == 8
    # With SGD the parameters move by the gradients themselves: every gradient, the EMA
    # teacher and the centre must agree. (Adam would turn a gradient that is zero but for
    # rounding into a full step whose sign depends on the order of the reduction, so its
    # parameters cannot be compared elementwise: its losses are compared below.)
    initial, one, _ = _run(1, fsdp=False, optimizer="sgd")
    _, eight, _ = _run(8, fsdp=fsdp, optimizer="sgd")
    _assert_moved_alike((initial.student, initial.teacher, initial.center),
                        (one.student, one.teacher, one.center),
                        (eight.student, eight.teacher, eight.center))
    # DINO's optimizer: the same losses step after step (each loss depends on the previous
    # updates), and under FSDP the parameters and Adam's moments stay sharded.
    _, _, losses1 = _run(1, fsdp=False)
    _, state8, losses8 = _run(8, fsdp=fsdp)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
    if fsdp:
        kernel = state8.student["body"]["block0"]["fc1"]["kernel"]  # [32, 128]
        assert not kernel.sharding.is_fully_replicated
        assert kernel.addressable_shards[0].data.size == kernel.size // 8
        moments = [x for x in jax.tree.leaves(state8.opt_state) if x.shape == kernel.shape]
        assert moments and all(not m.sharding.is_fully_replicated for m in moments)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_last_layer_frozen_while_asked():
    config = _config()
    config.server.freeze_last_layer_epochs = 0.5  # 2 of the 4 steps (steps_per_epoch=4)
    state, step = _setup(config, steps=4)
    samples = _real_samples(config)
    v0 = np.asarray(state.student["dino_head"]["last_layer_v"])
    for i in range(3):
        state, _ = jax.jit(step)(state, samples, jax.random.key(0))
        v = np.asarray(state.student["dino_head"]["last_layer_v"])
        if i < 2:
            np.testing.assert_array_equal(v, v0)
    assert not np.array_equal(v, v0)


# ---------------------------------------------------------------- DINO's training recipe


def _dino_params(config, norm_last_layer=False):
    """A real DINONet parameter tree (tiny), with `last_layer_g` unless norm_last_layer."""
    config.server.norm_last_layer = norm_last_layer
    net = models.dino_net_from_config(config)
    k = ops.num_kept(49, config.site.keep)
    return net.init(jax.random.key(0), jnp.zeros((1, k, net.body.input_dim)))["params"]


def _paths(tree):
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_clip_by_tensor_norm_is_dinos_per_parameter_clipping():
    # DINO's utils.clip_gradients: coef = clip / (||g|| + 1e-6), applied where coef < 1.
    rng = np.random.default_rng(0)
    grads = {"big": rng.normal(size=(8, 5)).astype(np.float32) * 10,       # norm ~ 63
             "small": rng.normal(size=(7,)).astype(np.float32) * 0.1,      # norm ~ 0.26
             "nested": {"edge": np.full((4,), 1.5, np.float32),            # norm 3.0
                        "mid": rng.normal(size=(3, 3)).astype(np.float32)}}  # norm ~ 3
    clip = 3.0
    out, _ = distill.clip_by_tensor_norm(clip).update(jax.tree.map(jnp.asarray, grads),
                                                      optax.EmptyState())

    def reference(g):
        g = g.astype(np.float64)
        coef = clip / (np.sqrt(np.sum(g * g)) + 1e-6)
        return g * coef if coef < 1 else g

    want = _paths(jax.tree.map(reference, grads))
    for name, got in _paths(out).items():
        np.testing.assert_allclose(np.asarray(got), want[name], rtol=1e-6, err_msg=name)
    assert np.linalg.norm(np.asarray(out["big"])) == pytest.approx(clip, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(out["small"]), grads["small"])  # below: untouched


@pytest.mark.slow
def test_weight_decay_mask_is_dinos_on_a_real_dino_net():
    # DINO's get_params_groups: not biases, not 1-D parameters; the class token is decayed.
    # last_layer_g is [out_dim] here but [out_dim, 1] in PyTorch's weight_norm: decayed.
    params = _dino_params(_config())
    mask = _paths(distill.weight_decay_mask(params))
    shapes = {name: leaf.shape for name, leaf in _paths(params).items()}
    assert mask["['body']['cls_token']"]
    assert mask["['body']['block0']['fc1']['kernel']"]
    assert mask["['body']['block0']['attn']['qkv']['kernel']"]
    assert mask["['dino_head']['last_layer_v']"] and mask["['dino_head']['last_layer_g']"]
    assert not mask["['body']['block0']['fc1']['bias']"]
    assert not mask["['body']['norm']['scale']"] and not mask["['body']['norm']['bias']"]
    for name, decayed in mask.items():
        want = (not name.endswith("['bias']") and len(shapes[name]) >= 2) or "last_layer_g" in name
        assert decayed == want, name
    # Image DINO's network: the head's position embedding and patch kernel are decayed too.
    config = _config()
    net = models.image_dino_net_from_config(config)
    image_params = net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    image_mask = _paths(distill.weight_decay_mask(image_params))
    assert image_mask["['head']['pos_embed']"] and image_mask["['head']['patch_embed']['kernel']"]
    assert not image_mask["['head']['patch_embed']['bias']"]


@pytest.mark.parametrize("batch_size", [16, 512])
def test_learning_rate_is_scaled_linearly_from_batch_256(batch_size):
    cfg = _config().server
    cfg.update(batch_size=batch_size, lr=5e-4, min_lr=1e-6, warmup_epochs=2.0)
    schedules = distill.make_schedules(cfg, total_steps=100, steps_per_epoch=10)
    lr = np.asarray(jax.vmap(schedules.learning_rate)(jnp.arange(101)))
    peak = 5e-4 * batch_size / 256
    assert lr[20] == pytest.approx(peak, rel=1e-6)  # end of the 20-step warm-up
    assert lr.max() == pytest.approx(peak, rel=1e-6)
    assert lr[0] == 0.0
    assert lr[100] == pytest.approx(1e-6, rel=1e-5)  # min_lr is not scaled (DINO)


def test_last_layer_frozen_for_its_epochs():
    cfg = _config().server
    cfg.freeze_last_layer_epochs = 1.5
    frozen = distill.make_schedules(cfg, total_steps=50, steps_per_epoch=10).last_layer_frozen
    assert [bool(frozen(s)) for s in (0, 14, 15, 16)] == [True, True, False, False]
    cfg.freeze_last_layer_epochs = 0.0
    frozen = distill.make_schedules(cfg, total_steps=50, steps_per_epoch=10).last_layer_frozen
    assert not bool(frozen(0))


def _adamw_reference(params, grads_seq, lr, wd, frozen, decay, last, clip,
                     b1=0.9, b2=0.999, eps=1e-8):
    """DINO's step in NumPy (float64): clip_gradients, cancel_gradients_last_layer, then
    torch.optim.AdamW, which skips a parameter without a gradient (no decay, no moments, no
    step). Returns the parameters after each step."""
    p = {n: np.asarray(x, np.float64) for n, x in params.items()}
    m = {n: np.zeros_like(x) for n, x in p.items()}
    v = {n: np.zeros_like(x) for n, x in p.items()}
    count = {n: 0 for n in p}
    history = []
    for t, grads in enumerate(grads_seq):
        for n in p:
            g = np.asarray(grads[n], np.float64)
            coef = clip / (np.sqrt(np.sum(g * g)) + 1e-6)
            g = g * coef if coef < 1 else g
            if last[n] and frozen[t]:
                continue  # p.grad = None: AdamW skips it
            count[n] += 1
            if decay[n]:
                p[n] = p[n] * (1 - lr[t] * wd[t])
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            denom = np.sqrt(v[n]) / np.sqrt(1 - b2 ** count[n]) + eps
            p[n] = p[n] - lr[t] / (1 - b1 ** count[n]) * m[n] / denom
        history.append({n: x.copy() for n, x in p.items()})
    return history


def _last_layer_state(opt_state):
    """The DINO head's last layer's own Adam state (moments and count) in the optimizer's."""
    part = next(s for s in opt_state if isinstance(s, optax.transforms.PartitionState))
    return part.inner_states["last_layer"].inner_state  # a ScaleByAdamState


@pytest.mark.slow
def test_optimizer_is_dinos_adamw_with_the_last_layer_frozen():
    # 4 steps, the first 2 frozen; gradients above and below the clip threshold.
    config = _config()
    cfg = config.server
    cfg.update(freeze_last_layer_epochs=0.5, lr=0.05, min_lr=1e-3, warmup_epochs=0.0,
               clip_grad=3.0)
    params = _dino_params(config)
    schedules = distill.make_schedules(cfg, total_steps=4, steps_per_epoch=4)
    tx = distill.make_optimizer(cfg, schedules)
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(params)
    grads_seq = [jax.tree.unflatten(treedef, [
        (rng.normal(size=x.shape) * (1.0 if i % 2 else 0.01)).astype(np.float32)
        for i, x in enumerate(leaves)]) for _ in range(4)]

    state, p, traj, last_states = tx.init(params), params, [], [None]
    last_states[0] = _last_layer_state(state)
    update = jax.jit(lambda g, s, p, t: tx.update(g, s, p, global_step=t))
    for t, grads in enumerate(grads_seq):
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, p, jnp.int32(t))
        if t == 2:  # the first step after the freeze: a fresh Adam step, by hand
            for name in ("last_layer_v", "last_layer_g"):
                g = np.asarray(grads["dino_head"][name], np.float64)
                g = g * min(1.0, 3.0 / (np.linalg.norm(g) + 1e-6))
                lr, wd = float(schedules.learning_rate(2)), float(schedules.weight_decay(2))
                want = -lr * (g / (np.abs(g) + 1e-8) + wd * np.asarray(p["dino_head"][name]))
                np.testing.assert_allclose(np.asarray(updates["dino_head"][name]), want,
                                           rtol=1e-5, atol=1e-8)
        p = optax.apply_updates(p, updates)
        traj.append(p)
        last_states.append(_last_layer_state(state))

    # Frozen: the last layer does not move, and its Adam state (moments, count) stays put.
    for t in (0, 1):
        for name in ("last_layer_v", "last_layer_g"):
            np.testing.assert_array_equal(np.asarray(traj[t]["dino_head"][name]),
                                          np.asarray(params["dino_head"][name]))
        for a, b in zip(jax.tree.leaves(last_states[t + 1]), jax.tree.leaves(last_states[0])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(last_states[3].count) == 1 and int(last_states[4].count) == 2
    assert not np.array_equal(traj[2]["dino_head"]["last_layer_v"],
                              params["dino_head"]["last_layer_v"])

    # Every parameter at every step, against DINO's recipe in NumPy.
    names = list(_paths(params))
    flat = lambda tree: dict(zip(names, jax.tree.leaves(tree)))
    steps = np.arange(4)
    reference = _adamw_reference(
        flat(params), [flat(g) for g in grads_seq],
        lr=[float(schedules.learning_rate(t)) for t in steps],
        wd=[float(schedules.weight_decay(t)) for t in steps],
        frozen=[bool(schedules.last_layer_frozen(t)) for t in steps],
        decay=flat(distill.weight_decay_mask(params)), last=flat(distill.last_layer_mask(params)),
        clip=3.0)
    for t in steps:
        for name, got in flat(traj[t]).items():
            np.testing.assert_allclose(np.asarray(got), reference[t][name], rtol=1e-5,
                                       atol=1e-6, err_msg=f"step {t} {name}")
    # The body trained from the first step.
    assert not np.array_equal(traj[0]["body"]["block0"]["fc1"]["kernel"],
                              params["body"]["block0"]["fc1"]["kernel"])


def test_clip_grad_zero_disables_clipping():
    cfg = _config().server
    cfg.clip_grad = 0.0
    schedules = distill.make_schedules(cfg, total_steps=4, steps_per_epoch=4)
    assert len(distill.make_optimizer(cfg, schedules).init({"w": jnp.ones(3)})) == 4
    cfg.clip_grad = 3.0
    assert len(distill.make_optimizer(cfg, schedules).init({"w": jnp.ones(3)})) == 5


@pytest.mark.slow
def test_step_freezes_the_last_layers_adam_state_and_trains_the_rest():
    config = _config()
    config.server.freeze_last_layer_epochs = 0.5  # 2 of the 4 steps
    state, step = _setup(config, steps=4)
    samples, step = _real_samples(config), jax.jit(step)
    last0 = _last_layer_state(state.opt_state)
    kernel = lambda s: np.asarray(s.student["body"]["block0"]["fc1"]["kernel"])
    for i in range(3):
        before = kernel(state)
        state, _ = step(state, samples, jax.random.key(0))
        assert not np.array_equal(kernel(state), before)  # the body trains at every step
        if i < 2:
            for a, b in zip(jax.tree.leaves(_last_layer_state(state.opt_state)),
                            jax.tree.leaves(last0)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(_last_layer_state(state.opt_state).count) == 1


class _RecordingNet:
    """Wraps a network; records how the step calls it: at trace time the batch and the
    deterministic flag of each call, at run time (a debug callback, so the step can be
    jitted) the drop-path key each call gets, tagged with the call's number."""

    def __init__(self, net):
        self.net, self.calls, self.keys = net, [], []

    def apply(self, variables, x, deterministic=True, rngs=None):
        call = len(self.calls)
        self.calls.append((x.shape[0], deterministic, rngs is not None))
        if rngs is not None:
            jax.debug.callback(functools.partial(self._record_key, call),
                               jax.random.key_data(rngs["drop_path"]))
        return self.net.apply(variables, x, deterministic=deterministic, rngs=rngs)

    def _record_key(self, call, key):
        self.keys.append((call, np.asarray(key)))


@pytest.mark.slow
def test_student_runs_with_drop_path_teacher_without():
    config = _config()
    net = models.dino_net_from_config(config)
    assert net.body.drop_path == config.server.drop_path == 0.1
    recorder = _RecordingNet(net)
    schedules = distill.make_schedules(config.server, total_steps=4, steps_per_epoch=4)
    tx = distill.make_optimizer(config.server, schedules)
    k = ops.num_kept(49, config.site.keep)
    state = distill.init_state(jax.random.key(0), net, tx, (k, net.body.input_dim))
    step = jax.jit(distill.make_distill_step(recorder, tx, schedules, config.server))
    samples = _real_samples(config, n=8)
    for _ in range(2):
        state, _ = step(state, samples, jax.random.key(3))
    jax.effects_barrier()
    teacher, student_global, student_local = recorder.calls  # traced once
    assert teacher[1:] == (True, False)                    # teacher: no drop path
    assert student_global[1:] == student_local[1:] == (False, True)
    assert student_global[0] == 8 * 2 and student_local[0] == 8 * config.server.num_local
    keys = {call: [key for c, key in recorder.keys if c == call] for call in (1, 2)}
    assert len(keys[1]) == len(keys[2]) == 2               # one key per call per step
    for step_keys in zip(keys[1], keys[2]):                # global and local views differ
        assert not np.array_equal(*step_keys)
    for call_keys in keys.values():                        # and every step draws anew
        assert not np.array_equal(*call_keys)


@pytest.mark.slow
def test_drop_path_changes_the_student_not_the_teacher():
    # Same state and key: the teacher's logits (hence the new centre and its entropy) do not
    # depend on the rate; the student's loss does.
    out = {}
    for rate in (0.0, 0.5):
        config = _config()
        config.server.drop_path = rate
        state, step = _setup(config, steps=4)
        out[rate] = jax.jit(step)(state, _real_samples(config), jax.random.key(0))
    (s0, m0), (s5, m5) = out[0.0], out[0.5]
    np.testing.assert_allclose(np.asarray(s0.center), np.asarray(s5.center), rtol=1e-6)
    assert float(m0["teacher_entropy"]) == pytest.approx(float(m5["teacher_entropy"]), rel=1e-6)
    assert float(m0["loss"]) != float(m5["loss"])


def test_server_checks_of_the_recipe_keys():
    from smsd_jax import validate
    from smsd_jax.errors import SMSDError
    validate.check_config(_config())
    for key, bad in (("drop_path", 1.0), ("drop_path", -0.1), ("freeze_last_layer_epochs", -1.0),
                     ("clip_grad", -1.0)):
        config = _config()
        config.server[key] = bad
        with pytest.raises(SMSDError, match=f"server.{key}"):
            validate.check_config(config)
