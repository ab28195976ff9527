"""The split ViT: the body's permutation contract, and head + body equal to a plain ViT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from smsd_jax import models
from smsd_jax.data import fashion_mnist
from smsd_jax.models import vit as vit_lib
from tests.reference_vit import vit_forward

DIM, DEPTH, HEADS = 32, 2, 4


def _body():
    return models.ViTBody(DIM, DEPTH, HEADS)


class PositionalBody(nn.Module):
    """A body that (wrongly) adds a learned position embedding inside: order now matters."""

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.5), tokens.shape[1:])
        return _body()(tokens + pos)


def _max_permutation_error(body, params, tokens, key):
    """Largest deviation from invariance (class) and equivariance (tokens) under a shuffle."""
    perm = jax.random.permutation(key, tokens.shape[1])
    cls, out = body.apply(params, tokens)
    cls_p, out_p = body.apply(params, tokens[:, perm])
    return max(float(jnp.abs(cls - cls_p).max()), float(jnp.abs(out[:, perm] - out_p).max()))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 7, 24, 49])
def test_body_is_permutation_equivariant(k):
    # Random inputs on purpose: the property must hold for any tokens.
    tokens = jax.random.normal(jax.random.key(k), (3, k, DIM))
    body = _body()
    params = body.init(jax.random.key(0), tokens)
    assert _max_permutation_error(body, params, tokens, jax.random.key(1)) < 1e-5


@pytest.mark.slow
def test_positional_body_fails_the_same_check():
    tokens = jax.random.normal(jax.random.key(0), (3, 24, DIM))
    body = PositionalBody()
    params = body.init(jax.random.key(0), tokens)
    assert _max_permutation_error(body, params, tokens, jax.random.key(1)) > 1e-2


@pytest.mark.slow
def test_body_accepts_any_number_of_tokens():
    body = _body()
    params = body.init(jax.random.key(0), jnp.zeros((1, 49, DIM)))
    for k in (1, 12, 49, 100):
        cls, out = body.apply(params, jnp.ones((2, k, DIM)))
        assert cls.shape == (2, DIM) and out.shape == (2, k, DIM)


@pytest.mark.slow
def test_head_then_body_equals_plain_vit_on_real_images():
    images = fashion_mnist("test").images[:4].astype(np.float32) / 255.0
    head = models.ViTHead(image_size=28, patch_size=4, dim=DIM)
    body = _body()
    hp = head.init(jax.random.key(0), images)["params"]
    bp = body.init(jax.random.key(1), jnp.zeros((1, 49, DIM)))["params"]
    cls, out = body.apply({"params": bp}, head.apply({"params": hp}, images))
    to_np = lambda t: jax.tree.map(np.asarray, t)
    ref_cls, ref_out = vit_forward(images, to_np(hp), to_np(bp), patch_size=4, heads=HEADS)
    np.testing.assert_allclose(cls, ref_cls, atol=2e-5)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)



def test_unplaced_head_sends_constant_patches_without_their_position():
    """On real images: a blank (constant) patch's token is `W x` alone, the same at every
    position; every other patch keeps `W x + P`; without constant patches both rules agree."""
    images = fashion_mnist("test").images[:8].astype(np.float32) / 255.0
    placed = models.ViTHead(image_size=28, patch_size=4, dim=DIM)
    unplaced = placed.clone(constant_patches="unplaced")
    params = placed.init(jax.random.key(0), images)["params"]
    a, b = (np.asarray(h.apply({"params": params}, images)) for h in (placed, unplaced))
    patches = np.asarray(models.patchify(jnp.asarray(images), 4))
    constant = patches.max(-1) == patches.min(-1)
    assert 0.1 < constant.mean() < 0.9  # real images: blank borders and a garment
    pos = np.asarray(params["pos_embed"])
    np.testing.assert_allclose(b[~constant], a[~constant], atol=1e-6)
    np.testing.assert_allclose(b[constant], (a - pos)[constant], atol=1e-5)
    blank = b[constant & (patches.max(-1) == 0)]
    np.testing.assert_allclose(blank, np.broadcast_to(blank[0], blank.shape), atol=1e-6)
    placed_blank = a[constant & (patches.max(-1) == 0)]
    assert len(np.unique(placed_blank.round(4), axis=0)) > 10  # one per blank position
    noisy = images + np.random.default_rng(0).uniform(0, 1e-3, images.shape).astype(np.float32)
    np.testing.assert_allclose(unplaced.apply({"params": params}, noisy),
                               placed.apply({"params": params}, noisy), atol=1e-6)


def test_a_blank_range_unplaces_almost_blank_patches_too():
    """On real images: with `blank_range` every patch whose values span at most that much is
    sent as `W x` alone (a faint edge as much as blank background); wider ones keep `W x + P`."""
    images = fashion_mnist("test").images[:8].astype(np.float32) / 255.0
    head = models.ViTHead(image_size=28, patch_size=4, dim=DIM, constant_patches="unplaced")
    params = head.init(jax.random.key(0), images)["params"]
    placed = np.asarray(head.clone(constant_patches="placed").apply({"params": params}, images))
    patches = np.asarray(models.patchify(jnp.asarray(images), 4))
    span = patches.max(-1) - patches.min(-1)
    pos = np.asarray(params["pos_embed"])
    for blank_range in (0.0, 0.3):
        tokens = np.asarray(head.clone(blank_range=blank_range).apply({"params": params},
                                                                      images))
        blank = np.asarray(models.blank_patches(jnp.asarray(patches), blank_range))
        np.testing.assert_array_equal(blank, span <= blank_range)
        np.testing.assert_allclose(tokens[~blank], placed[~blank], atol=1e-6)
        np.testing.assert_allclose(tokens[blank], (placed - pos)[blank], atol=1e-5)
    # Real images have faint patches between blank and content: the range unplaces them.
    faint = (span > 0) & (span <= 0.3)
    assert faint.sum() > 10 and (span > 0.3).sum() > 10


def test_unknown_constant_patches_rule_is_refused():
    head = models.ViTHead(image_size=28, patch_size=4, dim=DIM, constant_patches="hidden")
    with pytest.raises(Exception, match="constant_patches='hidden'; use one of"):
        head.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

# ------------------------------------------------- the stem (config.model.head_dim > 0)

TOKEN_DIM = 8  # a head narrower than the body (DIM): tokens of 8 values, a stem to DIM


def _stem_body():
    return models.ViTBody(DIM, DEPTH, HEADS, token_dim=TOKEN_DIM)


def _perturbed(params, key):
    """`params` with every leaf moved off its init (zero biases would hide a wrong bias)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 7, 24])
def test_body_with_a_stem_is_permutation_equivariant(k):
    tokens = jax.random.normal(jax.random.key(k), (3, k, TOKEN_DIM))
    body = _stem_body()
    params = body.init(jax.random.key(0), tokens)
    assert params["params"]["stem"]["kernel"].shape == (TOKEN_DIM, DIM)
    params = {"params": _perturbed(params["params"], jax.random.key(2))}
    cls, out = body.apply(params, tokens)
    assert cls.shape == (3, DIM) and out.shape == (3, k, DIM)
    assert _max_permutation_error(body, params, tokens, jax.random.key(1)) < 1e-5


def test_body_with_a_stem_takes_only_its_token_width():
    body = _stem_body()
    assert body.input_dim == TOKEN_DIM and _body().input_dim == DIM
    with pytest.raises(ValueError, match=rf"expected \[batch, tokens, {TOKEN_DIM}\]"):
        body.init(jax.random.key(0), jnp.zeros((1, 5, DIM)))


@pytest.mark.slow
def test_stem_init_keeps_the_token_scale():
    # lecun_normal (variance 1 / token_dim), zero bias: the stem's output has the scale of
    # its input tokens, as the blocks see tokens without a stem.
    body = models.ViTBody(64, 1, 4, token_dim=64)
    tokens = jax.random.normal(jax.random.key(0), (8, 49, 64))
    params = body.init(jax.random.key(1), tokens)["params"]
    kernel = np.asarray(params["stem"]["kernel"], np.float64)
    np.testing.assert_array_equal(params["stem"]["bias"], 0.0)
    assert abs(kernel.std() - 1 / 8) < 5 * (1 / 8) / np.sqrt(2 * kernel.size)
    assert 0.8 < float(jnp.std(tokens @ kernel)) / float(jnp.std(tokens)) < 1.25


# ------------------------------------------------- per-site stems (per-site heads)

SITES = 3


def _site_stem_body():
    return models.ViTBody(DIM, DEPTH, HEADS, token_dim=TOKEN_DIM, site_stems=SITES)


def _site_stem_params(tokens, sites):
    params = _site_stem_body().init(jax.random.key(0), tokens, sites=sites)["params"]
    return _perturbed(params, jax.random.key(5))


@pytest.mark.slow
def test_per_site_stems_keep_the_body_blind_to_order():
    tokens = jax.random.normal(jax.random.key(3), (4, 11, TOKEN_DIM))
    sites = jnp.array([0, 2, 1, 2])
    body, params = _site_stem_body(), _site_stem_params(tokens, sites)
    assert params["stem"]["kernel"].shape == (SITES, TOKEN_DIM, DIM)
    assert params["stem"]["bias"].shape == (SITES, DIM)
    perm = jax.random.permutation(jax.random.key(4), 11)
    cls, out = body.apply({"params": params}, tokens, sites=sites)
    cls_p, out_p = body.apply({"params": params}, tokens[:, perm], sites=sites)
    np.testing.assert_allclose(cls_p, cls, atol=1e-5)
    np.testing.assert_allclose(out_p, out[:, perm], atol=1e-5)


@pytest.mark.slow
def test_a_sites_body_is_the_per_site_body_on_its_tokens():
    # site_body cuts out one stem: the plain body a site fine-tunes gives, on its tokens, what
    # the server's body gives them through that site's stem; another site's stem differs.
    tokens = jax.random.normal(jax.random.key(6), (SITES, 9, TOKEN_DIM))
    sites = jnp.arange(SITES)
    body, params = _site_stem_body(), _site_stem_params(tokens, sites)
    cls, _ = body.apply({"params": params}, tokens, sites=sites)
    for k in range(SITES):
        plain, plain_params = models.site_body(body, params, k)
        assert plain.site_stems == 0 and plain_params["stem"]["kernel"].shape == (TOKEN_DIM, DIM)
        own, _ = plain.apply({"params": plain_params}, tokens[k:k + 1])
        np.testing.assert_allclose(own, cls[k:k + 1], atol=1e-5)
        other, _ = body.apply({"params": params}, tokens[k:k + 1],
                              sites=jnp.array([(k + 1) % SITES]))
        assert float(jnp.abs(other - own).max()) > 1e-2
    with pytest.raises(ValueError, match="site 3 has no stem"):
        models.site_body(body, params, SITES)


def test_per_site_stems_need_the_sites_and_only_they_take_them():
    tokens = jnp.zeros((2, 5, TOKEN_DIM))
    with pytest.raises(ValueError, match="called without sites"):
        _site_stem_body().init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="called with sites"):
        _stem_body().init(jax.random.key(0), tokens, sites=jnp.zeros((2,), jnp.int32))


def test_head_stem_body_equals_the_folded_plain_vit():
    # Head at the token width + stem + body, against a head at the body's width holding the
    # folded embeddings (W S, b S + c, P S) and the same body without its stem.
    images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    narrow = models.ViTHead(image_size=28, patch_size=4, dim=TOKEN_DIM)
    body = _stem_body()
    hp = _perturbed(narrow.init(jax.random.key(1), images)["params"], jax.random.key(3))
    bp = _perturbed(body.init(jax.random.key(2), jnp.zeros((1, 49, TOKEN_DIM)))["params"],
                    jax.random.key(4))
    cls, out = body.apply({"params": bp}, narrow.apply({"params": hp}, images))
    s, c = bp["stem"]["kernel"], bp["stem"]["bias"]
    folded = {"patch_embed": {"kernel": hp["patch_embed"]["kernel"] @ s,
                              "bias": hp["patch_embed"]["bias"] @ s + c},
              "pos_embed": hp["pos_embed"] @ s}
    plain_params = {k: v for k, v in bp.items() if k != "stem"}
    wide = models.ViTHead(image_size=28, patch_size=4, dim=DIM)
    ref_cls, ref_out = _body().apply({"params": plain_params},
                                     wide.apply({"params": folded}, images))
    np.testing.assert_allclose(cls, ref_cls, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    assert float(jnp.abs(cls).max()) > 0.1  # a real signal, not agreement on zeros


@pytest.mark.slow
def test_head_dim_sets_the_token_width_and_the_stem():
    config = base.get_config("tiny")
    width = models.preset(config.model.size)["dim"]
    # The default: tokens no wider than a patch's 16 values (the privacy default).
    assert config.model.head_dim == 16 and models.token_width(config) == 16
    # 0: the head at the body's width, no stem, the same parameters as a plain body.
    config.model.head_dim = 0
    assert models.token_width(config) == width
    head, body = models.head_from_config(config), models.body_from_config(config)
    assert head.dim == width and body.token_dim == 0
    tokens = jnp.zeros((1, 5, width))
    jax.tree.map(np.testing.assert_array_equal, body.init(jax.random.key(0), tokens),
                 models.ViTBody(**models.preset(config.model.size)).init(jax.random.key(0),
                                                                          tokens))
    # > 0: the head at head_dim, and a stem in every body, even at the body's own width.
    for head_dim in (TOKEN_DIM, width):
        config.model.head_dim = head_dim
        assert models.head_from_config(config).dim == head_dim
        for net in (models.body_from_config(config), models.dino_net_from_config(config).body,
                    models.image_dino_net_from_config(config).body):
            assert (net.dim, net.token_dim) == (width, head_dim)
        params = models.body_from_config(config).init(jax.random.key(0),
                                                      jnp.zeros((1, 5, head_dim)))["params"]
        assert params["stem"]["kernel"].shape == (head_dim, width)


@pytest.mark.slow
def test_attention_maps_come_from_the_same_model():
    tokens = jax.random.normal(jax.random.key(0), (2, 10, DIM))
    body = _body()
    params = body.init(jax.random.key(0), tokens)
    fused, _ = body.apply(params, tokens)
    (explicit, _), state = body.apply(params, tokens, mutable=["intermediates"])
    np.testing.assert_allclose(fused, explicit, atol=1e-5)
    attn = state["intermediates"]["block1"]["attn"]["attention"][0]
    assert attn.shape == (2, HEADS, 11, 11)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters():
    body = models.ViTBody(DIM, DEPTH, HEADS, dtype=jnp.bfloat16)
    tokens = jax.random.normal(jax.random.key(0), (2, 10, DIM))
    params = body.init(jax.random.key(0), tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    cls, _ = body.apply(params, tokens)
    assert cls.dtype == jnp.bfloat16
    ref, _ = _body().apply(params, tokens)
    np.testing.assert_allclose(cls.astype(np.float32), ref, atol=0.1)


@pytest.mark.slow
def test_dino_head_output_and_last_layer_norm():
    x = jax.random.normal(jax.random.key(0), (3, DIM))
    fixed = models.DINOHead(out_dim=50, hidden_dim=64, bottleneck_dim=16)
    params = fixed.init(jax.random.key(0), x)["params"]
    assert "last_layer_g" not in params
    logits = fixed.apply({"params": params}, x)
    assert logits.shape == (3, 50) and logits.dtype == jnp.float32
    # L2-normalised input times unit-norm columns: every logit is a cosine, in [-1, 1].
    assert float(jnp.abs(logits).max()) <= 1.0 + 1e-5
    free = models.DINOHead(out_dim=50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.init(jax.random.key(0), x)["params"]["last_layer_g"].shape == (50,)


@pytest.mark.slow
def test_classifier_joins_head_body_tail():
    images = fashion_mnist("test").images[:2].astype(np.float32) / 255.0
    model = models.ViTClassifier(models.ViTHead(28, 4, DIM), _body(), num_classes=10)
    params = model.init(jax.random.key(0), images)["params"]
    assert set(params) == {"head", "body", "tail"}
    assert model.apply({"params": params}, images).shape == (2, 10)


def test_head_rejects_wrong_image_size():
    head = models.ViTHead(image_size=28, patch_size=4, dim=DIM)
    with pytest.raises(ValueError, match="do not match the head"):
        head.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_presets():
    assert models.preset("S") == {"dim": 384, "depth": 12, "heads": 6}
    with pytest.raises(ValueError, match="unknown ViT size"):
        models.preset("XXL")


# ------------------------------------------------- DINO's init, head and stochastic depth
# References: facebookresearch/dino vision_transformer.py (`_init_weights`, `DINOHead`,
# `drop_path`, `torch.linspace(0, drop_path_rate, depth)`) and utils.trunc_normal_.


def _dense_layers(params, prefix=""):
    """`{path: {"kernel", "bias"}}` of every Dense layer in a parameter tree."""
    found = {}
    for name, sub in params.items():
        if isinstance(sub, dict) and "kernel" in sub:
            found[prefix + name] = sub
        elif isinstance(sub, dict):
            found.update(_dense_layers(sub, prefix + name + "/"))
    return found


def _assert_dino_trunc_normal(values, std=0.02, bound=2.0):
    """N(0, std^2) cut at +-bound (absolute), as timm's trunc_normal_(std, a=-bound, b=bound).

    At std 0.02 the cut is 100 std away: the sample is a plain normal of std 0.02, not
    Flax's truncated_normal(0.02) (cut at +-2 std = 0.04, std 0.88 * 0.02).
    """
    v = np.asarray(values, np.float64).ravel()
    n = v.size
    assert abs(v.mean()) < 5 * std / np.sqrt(n)
    # The standard error of a normal sample's std is std / sqrt(2n).
    assert abs(v.std() - std) < 5 * std / np.sqrt(2 * n)
    assert np.abs(v).max() <= bound
    # Beyond 2 std lies 4.55% of a normal; Flax's truncation would leave none there.
    beyond = np.mean(np.abs(v) > 2 * std)
    assert abs(beyond - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / n)


def test_trunc_normal_matches_timm_truncation():
    # DINO's setting: bounds +-2 at std 0.02, a plain normal (the statistics above).
    _assert_dino_trunc_normal(vit_lib.trunc_normal(0.02)(jax.random.key(0), (200_000,)))
    # Bounds within reach (std 1, +-2): truncated at the absolute bounds, with the std of a
    # normal truncated at +-2: sqrt(1 - 2 * 2 * phi(2) / (2 * Phi(2) - 1)) = 0.8796.
    v = np.asarray(vit_lib.trunc_normal(1.0)(jax.random.key(1), (200_000,)), np.float64)
    assert np.abs(v).max() <= 2.0 and np.abs(v).max() > 1.99
    assert abs(v.std() - 0.87962566) < 5 * 0.88 / np.sqrt(2 * v.size)
    # Asymmetric absolute bounds: [-0.5, 3] at std 1.
    v = np.asarray(vit_lib.trunc_normal(1.0, -0.5, 3.0)(jax.random.key(2), (10_000,)))
    assert v.min() >= -0.5 and v.max() <= 3.0


@pytest.mark.slow
def test_body_init_is_dinos():
    body = models.ViTBody(64, 2, 4)
    params = body.init(jax.random.key(0), jnp.zeros((1, 5, 64)))["params"]
    dense = _dense_layers(params)
    assert sorted(dense) == sorted(f"block{i}/{n}" for i in range(2)
                                   for n in ("attn/qkv", "attn/proj", "fc1", "fc2"))
    for name, layer in dense.items():
        _assert_dino_trunc_normal(layer["kernel"])
        np.testing.assert_array_equal(layer["bias"], 0.0)
    # All kernels together: one sample of 98k values, a tight check of the std.
    _assert_dino_trunc_normal(np.concatenate([np.ravel(d["kernel"]) for d in dense.values()]))
    for norm in [params["norm"]] + [params[f"block{i}"][n] for i in range(2)
                                    for n in ("norm1", "norm2")]:
        np.testing.assert_array_equal(norm["scale"], 1.0)
        np.testing.assert_array_equal(norm["bias"], 0.0)
    cls = np.asarray(params["cls_token"]).ravel()
    assert cls.shape == (64,) and np.abs(cls).max() <= 2.0
    assert 0.01 < cls.std() < 0.03  # 64 values: std within ~ +-0.5 std of 0.02


@pytest.mark.slow
def test_dino_head_init_is_dinos():
    x = jnp.zeros((1, DIM))
    head = models.DINOHead(out_dim=4096, hidden_dim=256, bottleneck_dim=64, norm_last_layer=False)
    params = head.init(jax.random.key(0), x)["params"]
    dense = _dense_layers(params)
    assert sorted(dense) == ["mlp0", "mlp1", "mlp2"]
    for layer in dense.values():
        _assert_dino_trunc_normal(layer["kernel"])
        np.testing.assert_array_equal(layer["bias"], 0.0)
    # weight_v: torch's default Linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
    # fan_in = bottleneck_dim; weight_g filled with 1.
    v = np.asarray(params["last_layer_v"], np.float64)
    bound = 1.0 / np.sqrt(64)
    assert v.shape == (64, 4096) and np.abs(v).max() <= bound
    assert np.abs(v).max() > 0.999 * bound  # fills the range (262k draws)
    n = v.size
    assert abs(v.mean()) < 5 * bound / np.sqrt(3 * n)
    # A uniform on [-b, b] has std b / sqrt(3); its sample variance has std ~ 0.9 var / sqrt(n).
    assert abs(v.var() - bound ** 2 / 3) < 5 * 0.9 * bound ** 2 / 3 / np.sqrt(n)
    # Flat, not bell-shaped: each quarter of the range holds a quarter of the values.
    counts = np.histogram(v, bins=4, range=(-bound, bound))[0] / n
    np.testing.assert_allclose(counts, 0.25, atol=5 * np.sqrt(0.25 * 0.75 / n))
    np.testing.assert_array_equal(params["last_layer_g"], 1.0)


@pytest.mark.slow
def test_dino_head_last_layer_is_float32_under_bfloat16():
    x = jax.random.normal(jax.random.key(0), (6, DIM))
    kw = dict(out_dim=300, hidden_dim=64, bottleneck_dim=32, norm_last_layer=False)
    head = models.DINOHead(**kw, dtype=jnp.bfloat16)
    params = head.init(jax.random.key(1), x)["params"]
    params["last_layer_g"] = jax.random.uniform(jax.random.key(2), (300,), minval=0.5,
                                                maxval=2.0)
    logits, state = head.apply({"params": params}, x, capture_intermediates=True)
    bottleneck = state["intermediates"]["mlp2"]["__call__"][0]
    assert bottleneck.dtype == jnp.bfloat16  # the MLP does run in bfloat16
    assert logits.dtype == jnp.float32
    # The last layer in float64 from the same (bfloat16) bottleneck and float32 params.
    z = np.asarray(bottleneck.astype(jnp.float32), np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    v = np.asarray(params["last_layer_v"], np.float64)
    w = v / np.linalg.norm(v, axis=0, keepdims=True) * np.asarray(params["last_layer_g"])
    expected = z @ w
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # And the float32 head on the same bottleneck: equal to float32 precision.
    f32 = models.DINOHead(**kw)
    ref = f32.apply({"params": params}, x)
    assert float(jnp.abs(ref - logits).max()) < 0.05  # only the bf16 MLP differs


def _block_and_params(rate, dim=DIM, batch=1, tokens=5, key=0):
    block = vit_lib.Block(dim, HEADS, drop_path=rate)
    x = jax.random.normal(jax.random.key(key), (batch, tokens, dim))
    return block, block.init(jax.random.key(key + 1), x)["params"], x


def _scaled(params, attn_scale, mlp_scale):
    """The block's params with the attention branch's (proj) and the MLP branch's (fc2)
    output layer scaled: the deterministic block then computes x + s_a a + s_m f(...)."""
    p = jax.tree.map(lambda t: t, params)
    p["attn"] = dict(p["attn"], proj=jax.tree.map(lambda t: t * attn_scale, p["attn"]["proj"]))
    p["fc2"] = jax.tree.map(lambda t: t * mlp_scale, p["fc2"])
    return p


def test_drop_path_is_unbiased_per_example():
    rate, n = 0.3, 20_000
    x = jax.random.normal(jax.random.key(0), (1, 4, 3))
    batch = jnp.broadcast_to(x, (n, 4, 3))
    out = np.asarray(vit_lib.drop_path(batch, rate, jax.random.key(1)))
    kept = np.abs(out).sum(axis=(1, 2)) > 0
    # Each example whole: zeros, or x / (1 - rate) in every token and channel.
    np.testing.assert_allclose(out[kept], np.broadcast_to(x / (1 - rate), out[kept].shape),
                               rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    # Expectation: x, within sampling error (std of the mean: |x| sqrt(rate / (1-rate) / n)).
    err = np.abs(np.asarray(x[0]) * np.sqrt(rate / (1 - rate) / n))
    mean = out.astype(np.float64).mean(0)
    assert np.all(np.abs(mean - np.asarray(x[0], np.float64)) < 5 * err + 1e-7)
    assert vit_lib.drop_path(batch, 0.0, jax.random.key(1)) is batch


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_drop_path_block_mean_equals_deterministic_output(branch):
    # One residual branch at a time (the other's output layer zeroed): the block's mean output
    # over many draws is its deterministic output. (With both branches on, the MLP branch
    # reads the attention branch's dropped output, so only each branch is unbiased.)
    rate, n = 0.25, 8_000
    block, params, x = _block_and_params(rate)
    params = _scaled(params, 1.0 if branch == "attn" else 0.0, 1.0 if branch == "mlp" else 0.0)
    det = block.apply({"params": params}, x)
    many = jnp.broadcast_to(x, (n, *x.shape[1:]))
    out = block.apply({"params": params}, many, deterministic=False,
                      rngs={"drop_path": jax.random.key(3)})
    branch_out = np.asarray(det - x, np.float64)[0]
    # One draw per example: the mean's error is branch * (kept fraction / (1-rate) - 1).
    err = np.abs(branch_out) * np.sqrt(rate / (1 - rate) / n)
    mean = np.asarray(out, np.float64).mean(0)  # float64: a float32 sum of 8k values drifts
    np.testing.assert_array_less(np.abs(mean - np.asarray(det, np.float64)[0]), 5 * err + 1e-6)
    # It is random: some examples dropped, some kept.
    assert 0 < float(jnp.mean(jnp.all(jnp.abs(out - x) < 1e-7, axis=(1, 2)))) < 1


@pytest.mark.slow
def test_block_drops_each_branch_per_example_independently():
    # Every example's output is one of the four deterministic combinations x + s_a a +
    # s_m f(x + s_a a), s in {0, 1/(1-rate)}, and the two branches' draws are independent.
    rate, n = 0.3, 2_000
    block, params, x = _block_and_params(rate, batch=n, key=5)
    out = np.asarray(block.apply({"params": params}, x, deterministic=False,
                                 rngs={"drop_path": jax.random.key(7)}))
    s = 1.0 / (1.0 - rate)
    combos = {(a, m): np.asarray(block.apply({"params": _scaled(params, sa, sm)}, x))
              for a, sa in ((0, 0.0), (1, s)) for m, sm in ((0, 0.0), (1, s))}
    err = {c: np.abs(out - y).max(axis=(1, 2)) for c, y in combos.items()}
    match = np.stack([err[c] for c in sorted(err)], 1)  # [n, 4]
    assert np.all(match.min(1) < 1e-5)  # each example is one combination
    which = np.array(sorted(err))[match.argmin(1)]  # [n, 2]: (attention kept, MLP kept)
    tol = 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(which[:, 0].mean() - (1 - rate)) < tol
    assert abs(which[:, 1].mean() - (1 - rate)) < tol
    both = (which[:, 0] & which[:, 1]).mean()
    assert abs(both - (1 - rate) ** 2) < 5 * np.sqrt((1 - rate) ** 2 * (1 - (1 - rate) ** 2) / n)


@pytest.mark.slow
def test_body_drop_path_rates_follow_linspace():
    depth, rate = 5, 0.1
    body = models.ViTBody(DIM, depth, HEADS, drop_path=rate)
    # torch.linspace(0, 0.1, 5) = [0, 0.025, 0.05, 0.075, 0.1]
    np.testing.assert_allclose(body.drop_path_rates, [0.0, 0.025, 0.05, 0.075, 0.1], rtol=1e-7)
    np.testing.assert_allclose(body.drop_path_rates, np.linspace(0, rate, depth))
    assert models.ViTBody(DIM, 1, HEADS, drop_path=rate).drop_path_rates == [0.0]
    # The blocks the body builds do get those rates, and the deterministic flag.
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, vit_lib.Block) and context.method_name == "__call__":
            seen[context.module.name] = (context.module.drop_path, args[1])
        return next_fun(*args, **kwargs)

    tokens = jnp.ones((2, 3, DIM))
    params = body.init(jax.random.key(0), tokens)
    with nn.intercept_methods(record):
        body.apply(params, tokens, deterministic=False, rngs={"drop_path": jax.random.key(1)})
    assert seen == {f"block{i}": (r, False) for i, r in enumerate(np.linspace(0, rate, depth))}


@pytest.mark.slow
def test_body_drop_path_deterministic_is_the_plain_body():
    tokens = jax.random.normal(jax.random.key(0), (4, 9, DIM))
    plain, dropping = _body(), models.ViTBody(DIM, DEPTH, HEADS, drop_path=0.1)
    params = plain.init(jax.random.key(0), tokens)
    # No parameters: the same tree, the same init.
    jax.tree.map(np.testing.assert_array_equal, params, dropping.init(jax.random.key(0), tokens))
    cls, out = plain.apply(params, tokens)
    for c, o in (dropping.apply(params, tokens), dropping.apply(params, tokens, True),
                 plain.apply(params, tokens, deterministic=False)):  # rate 0: needs no rng
        np.testing.assert_array_equal(c, cls)
        np.testing.assert_array_equal(o, out)
    # Training mode differs (and needs the rng).
    c, _ = dropping.apply(params, tokens, deterministic=False,
                          rngs={"drop_path": jax.random.key(1)})
    assert float(jnp.abs(c - cls).max()) > 1e-4
    with pytest.raises(Exception, match="drop_path"):
        dropping.apply(params, tokens, deterministic=False)
    with pytest.raises(ValueError, match="drop_path must be in"):
        models.ViTBody(DIM, DEPTH, HEADS, drop_path=1.0).init(jax.random.key(0), tokens)


@pytest.mark.parametrize("deterministic", [True, False])
def test_drop_path_body_is_permutation_equivariant(deterministic):
    # The drop is per example, not per token: even one stochastic draw keeps the contract.
    tokens = jax.random.normal(jax.random.key(3), (3, 24, DIM))
    body = models.ViTBody(DIM, DEPTH, HEADS, drop_path=0.5)
    params = body.init(jax.random.key(0), tokens)
    perm = jax.random.permutation(jax.random.key(1), 24)
    run = lambda t: body.apply(params, t, deterministic=deterministic,
                               rngs={"drop_path": jax.random.key(2)})
    (cls, out), (cls_p, out_p) = run(tokens), run(tokens[:, perm])
    assert float(jnp.abs(cls - cls_p).max()) < 1e-5
    assert float(jnp.abs(out[:, perm] - out_p).max()) < 1e-5


@pytest.mark.slow
def test_dino_nets_take_drop_path_from_the_server_config():
    config = base.get_config("tiny")
    assert models.dino_net_from_config(config).body.drop_path == config.server.get(
        "drop_path", 0.0)
    config.server.drop_path = 0.1
    assert models.dino_net_from_config(config).body.drop_path == 0.1
    assert models.image_dino_net_from_config(config).body.drop_path == 0.1
    assert models.body_from_config(config).drop_path == 0.0
    # The student's call, and the teacher's (no rng), on the same parameters.
    net = models.dino_net_from_config(config)
    tokens = jax.random.normal(jax.random.key(0), (4, 6, models.token_width(config)))
    params = net.init(jax.random.key(0), tokens)["params"]
    teacher, _ = net.apply({"params": params}, tokens)
    student, _ = net.apply({"params": params}, tokens, deterministic=False,
                           rngs={"drop_path": jax.random.key(1)})
    assert teacher.shape == student.shape == (4, config.server.out_dim)
    assert float(jnp.abs(teacher - student).max()) > 0
    image_net = models.image_dino_net_from_config(config)
    size, ch = config.data.image_size, config.data.channels
    images = jnp.zeros((2, size, size, ch))
    ip = image_net.init(jax.random.key(0), images)["params"]
    assert set(ip) == {"head", "body", "dino_head"}
    logits, _ = image_net.apply({"params": ip}, images, deterministic=False,
                                rngs={"drop_path": jax.random.key(1)})
    assert logits.shape == (2, config.server.out_dim)


# ---------------------------------------------------------------- init and probe features


@pytest.mark.slow
def test_dino_init_starts_every_attention_map_uniform_and_lecun_does_not():
    tokens = jax.random.normal(jax.random.key(0), (2, 24, 16))
    entropies = {}
    for init in models.INITS:
        body = models.ViTBody(128, 2, 4, token_dim=16, weight_init=init)
        params = body.init(jax.random.key(1), tokens)
        _, state = body.apply(params, tokens, mutable=["intermediates"])
        w = np.asarray(state["intermediates"]["block0"]["attn"]["attention"][0])
        entropies[init] = float(-(w * np.log(w)).sum(-1).mean())
    uniform = np.log(25)  # 24 tokens and the class token
    assert entropies["dino"] == pytest.approx(uniform, abs=0.01)
    assert entropies["lecun"] < uniform - 0.2
    with pytest.raises(ValueError, match="init='xavier'"):
        models.ViTBody(32, 1, 2, weight_init="xavier").init(jax.random.key(0), tokens[..., :1]
                                                            .repeat(32, -1))


@pytest.mark.slow
def test_probe_features_follow_dino_by_body_size():
    images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    head = models.ViTHead(28, 4, 32)
    for depth in (2, 5):
        body = models.ViTBody(32, depth, 2)
        kinds = {}
        for kind in ("cls", "last4", "cls_avgpool", "dino"):
            net = models.ViTClassifier(head, body, 10, linear_features=kind)
            params = net.init(jax.random.key(1), images)
            kinds[kind] = net.apply(params, images, method=net.probe_features)
        cls = np.asarray(kinds["cls"]["knn"])
        for kind, feats in kinds.items():
            np.testing.assert_array_equal(feats["knn"], cls)  # k-NN reads the class token
        np.testing.assert_array_equal(kinds["cls"]["linear"], cls)
        last4 = np.asarray(kinds["last4"]["linear"])
        assert last4.shape == (3, 32 * min(4, depth))
        # The last of the last blocks, through the final norm, is the class feature itself.
        np.testing.assert_allclose(last4[:, -32:], cls, rtol=1e-6, atol=1e-6)
        assert not np.allclose(last4[:, :32], cls)
        _, tokens = body.apply({"params": params["params"]["body"]},
                               head.apply({"params": params["params"]["head"]}, images))
        avgpool = np.asarray(kinds["cls_avgpool"]["linear"])
        np.testing.assert_allclose(avgpool, np.concatenate([cls, tokens.mean(1)], -1),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(kinds["dino"]["linear"], kinds["last4"]["linear"])
    assert models.linear_probe_features("dino", models.ViTBody(768, 1, 12)) == "cls_avgpool"
    with pytest.raises(ValueError, match="linear features 'mean'"):
        models.linear_probe_features("mean", models.ViTBody(32, 1, 2))

