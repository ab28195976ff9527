"""The split ViT: the body's permutation contract, and head + body equal to a plain ViT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsd_jax import models
from smsd_jax.data import fashion_mnist
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


@pytest.mark.parametrize("k", [1, 7, 24, 49])
def test_body_is_permutation_equivariant(k):
    # Random inputs on purpose: the property must hold for any tokens.
    tokens = jax.random.normal(jax.random.key(k), (3, k, DIM))
    body = _body()
    params = body.init(jax.random.key(0), tokens)
    assert _max_permutation_error(body, params, tokens, jax.random.key(1)) < 1e-5


def test_positional_body_fails_the_same_check():
    tokens = jax.random.normal(jax.random.key(0), (3, 24, DIM))
    body = PositionalBody()
    params = body.init(jax.random.key(0), tokens)
    assert _max_permutation_error(body, params, tokens, jax.random.key(1)) > 1e-2


def test_body_accepts_any_number_of_tokens():
    body = _body()
    params = body.init(jax.random.key(0), jnp.zeros((1, 49, DIM)))
    for k in (1, 12, 49, 100):
        cls, out = body.apply(params, jnp.ones((2, k, DIM)))
        assert cls.shape == (2, DIM) and out.shape == (2, k, DIM)


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


def test_bfloat16_compute_keeps_float32_parameters():
    body = models.ViTBody(DIM, DEPTH, HEADS, dtype=jnp.bfloat16)
    tokens = jax.random.normal(jax.random.key(0), (2, 10, DIM))
    params = body.init(jax.random.key(0), tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    cls, _ = body.apply(params, tokens)
    assert cls.dtype == jnp.bfloat16
    ref, _ = _body().apply(params, tokens)
    np.testing.assert_allclose(cls.astype(np.float32), ref, atol=0.1)


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
