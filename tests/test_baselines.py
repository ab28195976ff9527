"""The baselines: image multi-crop, the head at other sizes, FedAvg-DINO and centralized DINO
on real Fashion-MNIST images, and what they cost."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from smsd_jax import cost, baselines, data, distill, models, validate
from smsd_jax.baselines import image_dino, multicrop

BATCH = 16  # the tiny config's server batch size
# The tiny config's multi-crop (test_image_views_are_normalised_crops checks that it is).
CROPS = dict(global_size=28, local_size=16, num_local=2, global_scale=(0.4, 1.0),
             local_scale=(0.05, 0.4), flip=True, contrast=0.2)


def _config(**baseline_overrides):
    """The tiny config, with 2 FedAvg rounds matching 2 epochs of centralized DINO."""
    config = base.get_config("tiny")
    config.server.epochs = 2.0
    config.baselines.update(rounds=2, local_epochs=1.0)
    config.baselines.update(baseline_overrides)
    return config


@pytest.fixture(scope="module")
def source():
    return data.load_source(_config().data, "train")


@pytest.fixture(scope="module")
def images(source):
    return source.images[:8].astype(np.float32) / 255.0  # [8, 28, 28, 1] in [0, 1]


# ---------------------------------------------------------------- multi-crop


_jitted_multicrop = jax.jit(multicrop.multicrop, static_argnames=list(CROPS))


def _multicrop(key, images, **overrides):
    return _jitted_multicrop(key, images, **{**CROPS, **overrides})


@pytest.mark.slow
def test_multicrop_shapes_values_and_keys(images):
    views = _multicrop(jax.random.key(0), images)
    assert views.global_views.shape == (8, 2, 28, 28, 1)
    assert views.local_views.shape == (8, 2, 16, 16, 1)
    for v in views:
        assert np.all(np.isfinite(v)) and v.min() >= 0.0 and v.max() <= 1.0 + 1e-6
    # Every crop is drawn on its own: the two global crops of an image differ.
    assert not np.allclose(views.global_views[:, 0], views.global_views[:, 1])
    again = _multicrop(jax.random.key(0), images)
    other = _multicrop(jax.random.key(1), images)
    for a, b, c in zip(views, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)
    assert _multicrop(jax.random.key(0), images, num_local=0).local_views is None


@pytest.mark.slow
def test_crop_of_the_whole_area_is_the_image(images):
    crop = multicrop.random_resized_crop(jax.random.key(3), images[0], 28, scale=(1.0, 1.0))
    np.testing.assert_allclose(crop, images[0], atol=1e-6)


@pytest.mark.slow
def test_image_views_are_normalised_crops(images):
    config = _config()
    b = config.baselines
    assert CROPS == dict(global_size=28, local_size=b.local_size,
                         num_local=config.server.num_local, global_scale=b.global_scale,
                         local_scale=b.local_scale, flip=b.flip, contrast=b.contrast)
    views = jax.jit(baselines.views_fn_from_config(config))(jax.random.key(0), images)
    crops = _multicrop(jax.random.key(0), images)
    for v, c in zip(views, crops):
        np.testing.assert_allclose(v, (c - config.data.mean) / config.data.std, atol=1e-5)


# ---------------------------------------------------------------- head at other sizes


def test_head_with_resized_position_grid(images):
    plain = models.ViTHead(28, 4, 32)
    any_size = plain.clone(interpolate_pos=True)
    params = plain.init(jax.random.key(0), images)
    np.testing.assert_array_equal(any_size.apply(params, images), plain.apply(params, images))
    assert any_size.apply(params, images[:, :16, :16]).shape == (8, 16, 32)
    assert any_size.apply(params, images[:, :20, :12]).shape == (8, 15, 32)
    with pytest.raises(ValueError, match="do not match the head"):
        plain.apply(params, images[:, :16, :16])
    with pytest.raises(ValueError, match="not divisible"):
        any_size.apply(params, images[:, :18, :18])


def test_resized_constant_position_grid_stays_constant():
    pos = jnp.broadcast_to(jnp.arange(8.0), (49, 8))
    np.testing.assert_allclose(models.resize_pos_embed(pos, 7, (4, 5)),
                               jnp.broadcast_to(jnp.arange(8.0), (20, 8)), atol=1e-5)


# ---------------------------------------------------------------- averaging and clock


def test_weighted_average_by_image_count():
    a = {"w": jnp.array([1.0, 2.0]), "c": jnp.array(4.0)}
    b = {"w": jnp.array([5.0, -2.0]), "c": jnp.array(0.0)}
    mean = baselines.weighted_average([a, b], jnp.array([300.0, 100.0]))
    np.testing.assert_allclose(mean["w"], [(3 * 1 + 5) / 4, (3 * 2 - 2) / 4], rtol=1e-6)
    np.testing.assert_allclose(mean["c"], 3.0, rtol=1e-6)


def test_at_clock_moves_the_schedules_not_adams_count():
    config = _config()
    tx = distill.make_optimizer(config.server, distill.make_schedules(config.server, 20, 10))
    params = {"w": jnp.ones((2, 3))}
    state = distill.DistillState(step=jnp.array(2), student=params, teacher=params,
                                 opt_state=tx.init(params), center=jnp.zeros(4))
    moved = baselines.at_clock(state, 7)
    counts = {path[-1].tuple_name: int(v) for path, v in
              optax.tree_utils.tree_get_all_with_path(moved.opt_state, "count")}
    assert counts == {"ScaleByAdamState": 0, "WeightDecaySchedule": 7,
                      "ScaleByScheduleState": 7}
    assert int(moved.step) == 7


# ---------------------------------------------------------------- pre-training runs

# Every run below has 5 steps per epoch or round (the largest site's) and 10 steps of
# schedule: they share one compiled step.
POOLED = np.arange(80)
SITES = [np.arange(80, 128), np.arange(128, 208)]  # 48 and 80 images: 3 and 5 steps


@functools.partial(jax.jit, static_argnums=0)
def _classify(model, params, images):
    return model.apply({"params": params}, images)


@pytest.fixture(scope="module")
def centralized(source):
    return baselines.pretrain_centralized(_config(), source, POOLED, seed=0,
                                          site_indices=[POOLED[:24], POOLED[24:]])


def _stem_config():
    """`_config()` with a head of width 8 and a stem to the body's width 32
    (`config.model.head_dim`): FedAvg runs with it, centralized DINO without."""
    config = _config()
    config.model.head_dim = 8
    return config


@pytest.fixture(scope="module")
def fedavg(source):
    return baselines.pretrain_fedavg(_stem_config(), source, SITES, seed=0)


def _initial_body(config):
    """The body a run of `config` starts from (seed 0)."""
    net = models.image_dino_net_from_config(config)
    return jax.jit(net.init)(image_dino.init_key(0), jnp.zeros((1, 28, 28, 1)))["params"]["body"]


@pytest.fixture(scope="module")
def initial_body():
    return _initial_body(_config())


@pytest.mark.slow
def test_fedavg_with_one_site_is_centralized_dino(source, centralized):
    # Kept optimizer state and one schedule clock make R rounds of one site one DINO run of
    # R x E epochs; averaging one site multiplies by exactly 1.
    central = centralized
    fed = baselines.pretrain_fedavg(_config(), source, [POOLED], seed=0)
    for a, b in ((fed.head_params, central.head_params), (fed.body_params, central.body_params)):
        assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert [r["loss"] for r in fed.history] == [r["loss"] for r in central.history]
    assert fed.steps == central.steps == 10 and fed.images_seen == central.images_seen


def _downstream_logits(pre, source):
    model = models.ViTClassifier(pre.head, pre.body, 10)
    images = (source.images[:32].astype(np.float32) / 255.0 - 0.286) / 0.353
    tail = nn.Dense(10).init(jax.random.key(1), jnp.zeros((1, pre.body.dim)))["params"]
    return _classify(model, {"head": pre.head_params, "body": pre.body_params, "tail": tail},
                     images)


def _check_trained(pre, source, initial_body, history_len):
    assert len(pre.history) == history_len
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["teacher_entropy"]) for r in pre.history)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), pre.body_params, initial_body)
    assert all(jax.tree.leaves(changed))
    assert pre.head.image_size == 28 and not pre.head.interpolate_pos
    logits = _downstream_logits(pre, source)
    assert logits.shape == (32, 10) and np.all(np.isfinite(logits))
    assert pre.wall_s > 0


@pytest.mark.slow
def test_centralized_run_and_its_cost(source, centralized, initial_body):
    pre = centralized
    _check_trained(pre, source, initial_body, history_len=2)
    assert pre.steps == 10 and pre.images_seen == 10 * BATCH
    assert pre.server_flops > 0 and pre.client_flops_per_site == [0.0, 0.0]
    assert pre.upload_bytes_per_site == [24 * 784, 56 * 784]  # raw uint8 images, once
    model_bytes = cost.tree_bytes({"head": pre.head_params, "body": pre.body_params})
    assert pre.download_bytes_per_site == [model_bytes] * 2


@pytest.mark.slow
def test_fedavg_run_and_its_cost(source, fedavg):
    # With a stem: image DINO runs head (width 8) -> stem -> body (width 32) as one network;
    # the stem is in the body's parameters, trained and averaged with them (_check_trained).
    pre, config = fedavg, _stem_config()
    _check_trained(pre, source, _initial_body(config), history_len=2)
    assert pre.head_params["pos_embed"].shape == (49, 8) and pre.body.token_dim == 8
    assert pre.body_params["stem"]["kernel"].shape == (8, pre.body.dim)
    assert pre.steps == 2 * (3 + 5) and pre.images_seen == 2 * (3 + 5) * BATCH
    assert len(pre.history[0]["site_loss"]) == 2
    net = models.image_dino_net_from_config(config)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    shared = 2 * cost.tree_bytes(params) + 4 * config.server.out_dim  # + float32 centre
    assert pre.upload_bytes_per_site == pre.download_bytes_per_site == [2 * shared] * 2
    flops_small, flops_large = pre.client_flops_per_site
    assert flops_small > 0 and flops_large == pytest.approx(flops_small * 5 / 3)
    num_values = shared // 4
    assert pre.server_flops == 2 * 2 * 2 * num_values  # rounds x (mul + add) x sites x values


# ---------------------------------------------------------------- bad input


def test_site_smaller_than_a_batch_is_named(source):
    with pytest.raises(ValueError, match="site 1 has 10 images, fewer than one batch"):
        baselines.pretrain_fedavg(_config(), source, [np.arange(32), np.arange(32, 42)],
                                  seed=0)
    with pytest.raises(ValueError, match="pooled data has 8 images"):
        baselines.pretrain_centralized(_config(), source, np.arange(8), seed=0)
    with pytest.raises(ValueError, match="site_indices hold 10 images"):
        baselines.pretrain_centralized(_config(), source, np.arange(32), seed=0,
                                       site_indices=[np.arange(10)])


@pytest.mark.parametrize("key, value", [("local_size", 18), ("local_scale", (0.5, 0.2)),
                                        ("rounds", 0), ("num_local", -2)])
def test_config_checks_name_the_bad_baseline_value(key, value):
    validate.check_config(_config())
    with pytest.raises(ValueError, match=f"config.baselines.{key}="):
        validate.check_config(_config(**{key: value}))
