"""Token noise and differential privacy: the ops, the accountant's (epsilon, delta), the site
stage with noise on and off, and the config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smsd_jax import consortium, data, files, models, ops, payload, site, validate
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from smsd_jax.privacy import dp_accountant
from tests.test_pipeline import _config, _encode


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _hockey_stick(epsilon, mu):
    """delta(epsilon) of N(mu, 1) against N(0, 1) by quadrature of its definition,
    `integral of max(0, p(x) - e^epsilon q(x)) dx`: no closed form, no scipy."""
    x = np.linspace(-40.0, 40.0 + mu, 2_000_001)
    p = np.exp(-0.5 * (x - mu) ** 2) / math.sqrt(2 * math.pi)
    q = np.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(np.maximum(p - math.exp(epsilon) * q, 0.0), x))


# ---------------------------------------------------------------------------- accountant


def test_delta_at_mu_one_epsilon_one_is_the_reference_value():
    expected = _phi(-0.5) - math.e * _phi(-1.5)
    assert dp_accountant.delta(1.0, 1.0) == pytest.approx(expected, rel=1e-12)
    assert dp_accountant.delta(1.0, 1.0) == pytest.approx(0.1269367375, abs=1e-10)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.77, 8.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 3.0])
def test_delta_matches_quadrature_of_the_privacy_loss(mu, epsilon):
    reference = _hockey_stick(epsilon, mu)
    assert dp_accountant.delta(epsilon, mu) == pytest.approx(reference, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("mu", [0.2, 1.0, 5.0, 13.9])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_epsilon_inverts_delta(mu, delta):
    epsilon = dp_accountant.epsilon(delta, mu)
    assert epsilon > 0
    assert dp_accountant.delta(epsilon, mu) <= delta  # the safe side
    assert dp_accountant.delta(epsilon, mu) == pytest.approx(delta, rel=1e-6)
    assert dp_accountant.delta(epsilon * (1 - 1e-6), mu) > delta  # and the smallest such


def test_epsilon_is_zero_when_delta_alone_covers_the_mechanism():
    mu = 0.01  # delta(0) = 2 Phi(mu / 2) - 1, about 0.004
    assert dp_accountant.epsilon(0.01, mu) == 0.0
    assert dp_accountant.epsilon(1e-3, mu) > 0.0


def test_tight_epsilon_is_below_the_classical_bound():
    # Dwork and Roth (Theorem A.1): std Delta sqrt(2 ln(1.25 / delta)) / epsilon is
    # (epsilon, delta)-DP for epsilon < 1; the analytic mechanism needs less.
    for target in (0.1, 0.5, 0.9):
        mu = target / math.sqrt(2 * math.log(1.25 / 1e-5))
        assert dp_accountant.epsilon(1e-5, mu) < target


def test_image_epsilon_falls_with_noise_and_grows_with_tokens_sent():
    multipliers = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    epsilons = [dp_accountant.image_epsilon(1e-5, s, 24, 2) for s in multipliers]
    assert all(a > b for a, b in zip(epsilons, epsilons[1:]))
    sent = [(1, 1), (12, 1), (24, 2), (49, 4)]
    epsilons = [dp_accountant.image_epsilon(1e-5, 5.0, k, m) for k, m in sent]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))
    # Only K * M counts: mu = 2 sqrt(K M) / noise_multiplier.
    assert dp_accountant.image_mu(5.0, 24, 2) == pytest.approx(2 * math.sqrt(48) / 5)
    assert (dp_accountant.image_epsilon(1e-5, 5.0, 24, 2)
            == dp_accountant.image_epsilon(1e-5, 5.0, 48, 1))


@pytest.mark.parametrize("call,match", [
    (lambda: dp_accountant.image_mu(0.0, 24, 2), "noise_multiplier=0.0"),
    (lambda: dp_accountant.image_mu(1.0, 0, 2), "tokens=0"),
    (lambda: dp_accountant.epsilon(0.0, 1.0), "delta=0.0"),
    (lambda: dp_accountant.delta(-1.0, 1.0), "epsilon=-1.0"),
    (lambda: dp_accountant.delta(1.0, 0.0), "mu=0.0"),
])
def test_accountant_refuses_values_outside_its_domain(call, match):
    with pytest.raises(SMSDError, match=match):
        call()


# ----------------------------------------------------------------------------------- ops


def _head(dim, pos_std, bias=0.0):
    head = models.ViTHead(28, 4, dim, pos_std)
    params = head.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    embed = {**params["patch_embed"], "bias": jnp.full((dim,), bias)}
    return head, {**params, "patch_embed": embed}


@pytest.mark.parametrize("dim,pos_std,bias", [(32, 0.5, 0.0), (128, 0.5, 0.0), (8, 0.1, 0.3)])
def test_token_scale_is_the_rms_of_tokens_of_unit_variance_pixels(dim, pos_std, bias):
    head, params = _head(dim, pos_std, bias)
    pixels = jax.random.normal(jax.random.key(1), (256, 28, 28, 1))
    measured = float(jnp.sqrt(jnp.mean(head.apply({"params": params}, pixels) ** 2)))
    scale = float(jax.jit(ops.token_scale)(params))
    assert scale == pytest.approx(measured, rel=0.02)
    assert scale == pytest.approx(math.sqrt(1 + pos_std ** 2 + bias ** 2), rel=0.05)


def test_clip_tokens_bounds_norms_and_keeps_short_tokens():
    tokens = jax.random.normal(jax.random.key(0), (64, 16))
    tokens = tokens * jnp.linspace(0.05, 1.0, 64)[:, None]  # norms from about 0.2 to 4
    norms = np.linalg.norm(np.asarray(tokens), axis=-1)
    clip = 2.0
    assert 0 < np.sum(norms <= clip) < len(norms)
    clipped = np.asarray(jax.jit(ops.clip_tokens)(tokens, clip))
    assert np.all(np.linalg.norm(clipped, axis=-1) <= clip * (1 + 1e-6))
    short = norms <= clip
    np.testing.assert_array_equal(clipped[short], np.asarray(tokens)[short])
    np.testing.assert_allclose(np.linalg.norm(clipped[~short], axis=-1), clip, rtol=1e-6)
    direction = clipped[~short] * (norms[~short] / clip)[:, None]  # same direction
    np.testing.assert_allclose(direction, np.asarray(tokens)[~short], rtol=1e-5, atol=1e-6)


def test_gaussian_dp_noise_has_its_std_and_is_fresh_per_token():
    tokens = jnp.ones((4096, 32)) * 3.0  # every token the same, norm 17 before clipping
    clip, multiplier = 1.5, 0.8
    out = np.asarray(jax.jit(ops.gaussian_dp)(jax.random.key(0), tokens, clip, multiplier))
    noise = out - np.asarray(ops.clip_tokens(tokens, clip))
    assert np.std(noise) == pytest.approx(multiplier * clip, rel=0.02)
    assert abs(np.mean(noise)) < 0.01 * multiplier * clip
    assert not np.any(np.all(out[0] == out[1:], axis=-1))  # equal inputs, other outputs
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.05  # values independent


def test_add_token_noise_adds_its_std_and_nothing_at_zero():
    tokens = jax.random.normal(jax.random.key(0), (2048, 24))
    noisy = ops.add_token_noise(jax.random.key(1), tokens, 0.3)
    assert float(jnp.std(noisy - tokens)) == pytest.approx(0.3, rel=0.02)
    np.testing.assert_array_equal(ops.add_token_noise(jax.random.key(1), tokens, 0.0), tokens)


def test_noise_key_is_apart_from_the_mask_and_permutation_keys():
    key = site.image_keys(7, 3, 1)[0]
    used = [jax.random.key_data(k) for k in jax.random.split(key)]  # encrypt's two keys
    noise = jax.random.key_data(site.noise_key(key))
    assert all(not np.array_equal(noise, k) for k in used)


# ---------------------------------------------------------------------------- site stage


def _noise_free_tokens(config, head_dir, source, n):
    """The payload as the site made it before token noise existed: head, then `encrypt` with
    each image's key, stored as float16."""
    head, params, _ = consortium.load_head(head_dir)
    s, d = config.site, config.data
    images = data.site_dataset(source, np.arange(n), num_samples=s.num_samples,
                               augment=dict(s.augment), batch_size=s.batch_size,
                               seed=config.seed)[0]["images"]

    @jax.jit
    def encode(params, images, keys):
        flat = ((images - d.mean) / d.std).reshape(-1, *images.shape[2:])
        tokens = head.apply({"params": params}, flat).reshape(n, s.num_samples, -1, head.dim)
        return jax.vmap(lambda key, t: ops.encrypt(key, t, s.keep))(keys, tokens)[0]

    return np.asarray(encode(params, images, site.image_keys(7, 0, n))).astype(np.float16)


def test_default_payload_is_the_noise_free_pipeline_bit_for_bit(tmp_path):
    config = _config()
    out, head_dir, source = _encode(tmp_path, config, "default", n=32)
    np.testing.assert_array_equal(payload.read_tokens(out),
                                  _noise_free_tokens(config, head_dir, source, 32))
    assert "noise" not in payload.read_manifest(out)


def test_token_noise_adds_fresh_noise_of_its_std_to_the_same_tokens(tmp_path):
    clean, head_dir, _ = _encode(tmp_path, _config(), "clean", n=32)
    noisy, _, _ = _encode(tmp_path, _config(token_noise=0.5), "noisy", n=32)
    _, params, _ = consortium.load_head(head_dir)
    noise = (payload.read_tokens(noisy).astype(np.float32)
             - payload.read_tokens(clean).astype(np.float32))  # [n, M, K, D]
    std = 0.5 * float(ops.token_scale(params))
    assert np.std(noise) == pytest.approx(std, rel=0.03)
    assert abs(np.mean(noise)) < 0.02 * std
    # Fresh for every sample: the two samples' noise is unrelated.
    assert abs(np.corrcoef(noise[:, 0].ravel(), noise[:, 1].ravel())[0, 1]) < 0.05
    assert payload.read_manifest(noisy)["noise"] == {"token_noise": 0.5}
    # The server's reader takes noisy and noise-free payloads together.
    manifests, rows = payload.open_payloads([clean, noisy])
    assert len(manifests) == 2 and len(rows) == 64


def test_dp_payload_is_clipped_tokens_plus_noise_and_states_its_epsilon(tmp_path):
    clip, multiplier = 2.0, 0.5
    config = _config(dp_clip=clip, dp_noise_multiplier=multiplier)
    clean, _, _ = _encode(tmp_path, _config(), "clean", n=32)
    private, _, _ = _encode(tmp_path, config, "private", n=32)
    reference = np.asarray(ops.clip_tokens(payload.read_tokens(clean).astype(np.float32), clip))
    sent = payload.read_tokens(private).astype(np.float32)
    noise = sent - reference
    assert np.std(noise) == pytest.approx(multiplier * clip, rel=0.03)
    # Norms: a clipped token plus noise in each of D values.
    dim = sent.shape[-1]
    expected = np.mean(np.sum(reference ** 2, -1)) + dim * (multiplier * clip) ** 2
    assert np.mean(np.sum(sent ** 2, -1)) == pytest.approx(expected, rel=0.03)
    manifest = payload.read_manifest(private)
    k, m = manifest["tokens"], manifest["num_samples"]
    assert manifest["noise"] == dict(
        dp_clip=clip, dp_noise_multiplier=multiplier, dp_delta=1e-5,
        dp_epsilon=dp_accountant.image_epsilon(1e-5, multiplier, k, m))
    payload.open_payloads([private])  # the server's checks pass


def test_noisy_site_resumes_bit_for_bit_and_refuses_other_noise(tmp_path):
    config = _config(shard_size=32, batch_size=16, dp_clip=2.0, dp_noise_multiplier=1.0)
    full, _, _ = _encode(tmp_path, config, "full", n=64)
    part, _, _ = _encode(tmp_path, config, "part", n=64)
    manifest = payload.read_manifest(part)
    files.write_json(part / payload.MANIFEST,
                     {**manifest, "shards": manifest["shards"][:1], "complete": False})
    for shard in manifest["shards"][1:]:
        (part / shard["name"]).unlink()
    _encode(tmp_path, config, "part", n=64)
    np.testing.assert_array_equal(payload.read_tokens(part), payload.read_tokens(full))
    files.write_json(part / payload.MANIFEST,
                     {**manifest, "shards": manifest["shards"][:1], "complete": False})
    with pytest.raises(SMSDError, match="other settings"):  # noise off against a noisy start
        _encode(tmp_path, _config(shard_size=32, batch_size=16), "part", n=64)


def test_site_stage_prints_the_epsilon_of_its_payload(tmp_path, capsys):
    config = _config(dp_clip=2.0, dp_noise_multiplier=5.0)
    config.data.num_sites, config.data.partition, config.data.subset = 2, "iid", 64
    config.site.secret_seed = 3
    layout = Layout(tmp_path / "w")
    consortium.set_up(config, layout)
    manifest = site.site_stage(config, layout, 0)
    epsilon = dp_accountant.image_epsilon(1e-5, 5.0, manifest["tokens"], manifest["num_samples"])
    out = capsys.readouterr().out
    assert f"epsilon {epsilon:.4g} at delta 1e-05" in out
    assert out.count("epsilon") == 1


# -------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,match", [
    (dict(dp_clip=1.0, dp_noise_multiplier=0.0), r"config\.site\.dp_noise_multiplier=0\.0"),
    (dict(dp_clip=1.0, dp_noise_multiplier=-1.0), r"config\.site\.dp_noise_multiplier=-1\.0"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=0.0), r"config\.site\.dp_delta=0\.0"),
    (dict(dp_clip=1.0, dp_noise_multiplier=1.0, token_noise=0.1),
     r"config\.site\.token_noise=0\.1 with config\.site\.dp_clip=1\.0"),
    (dict(token_noise=-0.1), r"config\.site\.token_noise=-0\.1"),
    (dict(dp_clip=-1.0), r"config\.site\.dp_clip=-1\.0"),
])
def test_validate_refuses_bad_noise_settings_naming_the_key(overrides, match):
    with pytest.raises(SMSDError, match=match):
        validate.check_config(_config(**overrides))


def test_validate_accepts_each_kind_of_noise_alone():
    validate.check_config(_config(token_noise=0.1))
    validate.check_config(_config(dp_clip=1.0, dp_noise_multiplier=1.0))
