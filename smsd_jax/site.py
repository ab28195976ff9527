"""Stage 1, at a site, once: encode and encrypt the site's images into its payload.

For each image, M augmented copies go through the frozen head (`t_i = W x_i + P_i`), masked
sampling keeps K of the N tokens of each copy, and a fresh permutation shuffles them; noise on
the sent tokens is an option (`config.site.token_noise`, or differential privacy with
`dp_clip`). The payload holds those token sets and nothing else. Memory is bounded by one
shard.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from smsd_jax import consortium, data, files, keys, ops, payload
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from smsd_jax.privacy import dp_accountant

# `fold_in(key, i)` is `split(key)[i]`: an image's key gives `encrypt` indices 0 and 1 (its mask
# and permutation keys), so its noise key is index 2, a stream of its own. Noise-free payloads
# are as they were without the option, and noisy ones resume bit for bit.
NOISE_STREAM = 2


def encode_batch(head, params, images: jax.Array, keys: jax.Array, *, keep: float,
                 mean: float, std: float, shuffle: bool = True, token_noise: float = 0.0,
                 dp_clip: float = 0.0, dp_noise_multiplier: float = 0.0) -> jax.Array:
    """images `[b, M, H, W, C]` in [0, 1], one key per image `[b]` -> sent tokens `[b, M, K, D]`.

    Each of the M samples of an image gets its own mask and permutation from the image's key
    (`shuffle=False`: no permutation, an ablation only). Then, if asked, noise fresh for every
    value of every sent token, from the image's `noise_key`: std `token_noise` times the head's
    `ops.token_scale`, or, with `dp_clip > 0`, the Gaussian mechanism `ops.gaussian_dp` (at most
    one of the two: `check_noise`).
    """
    b, m = images.shape[:2]
    flat = ((images - mean) / std).reshape(b * m, *images.shape[2:])
    tokens = head.apply({"params": params}, flat)
    tokens = tokens.reshape(b, m, *tokens.shape[1:])
    sent, _ = jax.vmap(lambda key, t: ops.encrypt(key, t, keep, shuffle))(keys, tokens)
    if not (dp_clip > 0 or token_noise > 0):
        return sent
    if dp_clip > 0:
        noise = lambda key, t: ops.gaussian_dp(key, t, dp_clip, dp_noise_multiplier)
    else:
        noise_std = token_noise * ops.token_scale(params)
        noise = lambda key, t: ops.add_token_noise(key, t, noise_std)
    return jax.vmap(noise)(jax.vmap(noise_key)(keys), sent)


def noise_key(key: jax.Array) -> jax.Array:
    """The key of an image's token noise, drawn from its image key apart from the mask and
    permutation keys (`NOISE_STREAM`)."""
    return jax.random.fold_in(key, NOISE_STREAM)


# Compiled once per head and settings, not once per site (a simulation runs every site).
_encode_jit = jax.jit(encode_batch, static_argnums=0, static_argnames=(
    "keep", "mean", "std", "shuffle", "token_noise", "dp_clip", "dp_noise_multiplier"))


def image_keys(secret_seed: int, start: int, count: int) -> jax.Array:
    """Keys of images `start .. start+count-1` of a site: fresh per image, reproducible from
    the site's secret key alone (`keys.prng_key`: all its 128 bits)."""
    base = keys.prng_key(secret_seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def check_shard_size(cfg) -> None:
    """`config.site.shard_size` is a positive multiple of `config.site.batch_size`."""
    if cfg.shard_size < 1 or cfg.batch_size < 1 or cfg.shard_size % cfg.batch_size:
        raise SMSDError(f"config.site.shard_size={cfg.shard_size} must be a positive multiple "
                        f"of config.site.batch_size={cfg.batch_size}")


def check_noise(cfg) -> None:
    """`config.site`'s token noise: non-negative settings; with `dp_clip > 0` a positive
    `dp_noise_multiplier`, a `dp_delta` in (0, 1) and no `token_noise` besides."""
    for key in ("token_noise", "dp_clip", "dp_noise_multiplier"):
        if not cfg[key] >= 0:
            raise SMSDError(f"config.site.{key}={cfg[key]!r}: must be 0 (off) or positive")
    if not cfg.dp_clip > 0:
        return
    if not cfg.dp_noise_multiplier > 0:
        raise SMSDError(f"config.site.dp_noise_multiplier={cfg.dp_noise_multiplier!r}: must be "
                        f"positive with config.site.dp_clip={cfg.dp_clip!r} (the noise std in "
                        "units of the clip norm; docs/threat_model.md gives its epsilon)")
    if not 0 < cfg.dp_delta < 1:
        raise SMSDError(f"config.site.dp_delta={cfg.dp_delta!r}: must be in (0, 1), well below"
                        " 1 / the site's images (e.g. 1e-5)")
    if cfg.token_noise > 0:
        raise SMSDError(f"config.site.token_noise={cfg.token_noise!r} with config.site.dp_clip="
                        f"{cfg.dp_clip!r}: choose one kind of noise; set token_noise=0 (the "
                        "differential privacy noise is dp_noise_multiplier)")


def noise_settings(cfg, tokens: int) -> dict | None:
    """What the manifest records of `config.site`'s noise for `tokens` sent per sample: None
    without noise, the `token_noise`, or the DP settings with the per-image epsilon at
    `dp_delta` (`dp_accountant.image_epsilon`)."""
    if cfg.dp_clip > 0:
        epsilon = dp_accountant.image_epsilon(cfg.dp_delta, cfg.dp_noise_multiplier, tokens,
                                           cfg.num_samples)
        return dict(dp_clip=float(cfg.dp_clip), dp_noise_multiplier=float(cfg.dp_noise_multiplier),
                    dp_delta=float(cfg.dp_delta), dp_epsilon=epsilon)
    if cfg.token_noise > 0:
        return dict(token_noise=float(cfg.token_noise))
    return None


def run_site(config, site_id: int, source, indices: np.ndarray, head_dir: str | Path,
             out_dir: str | Path, secret_seed: int | None = None, expected_fingerprint=None,
             public_key: bool | None = None) -> dict:
    """Encodes `source[indices]` into the payload folder `out_dir`, shard by shard.

    Re-running continues after the last complete shard with identical results, if the
    settings are the same. `secret_seed` keys the masks and permutations (None: 128 bits from
    the OS; give one only to reproduce a payload, and keep it from the server).
    `public_key`: whether that key is public (default: whenever one is given); the manifest
    says `"keys": "public demo keys"` when it is, or when the head was drawn from one.

    Returns:
      The payload's manifest.
    """
    cfg = config.site
    check_shard_size(cfg)
    check_noise(cfg)
    head, params, head_meta = consortium.load_head(head_dir, expected_fingerprint)
    data.checks.head_fits(consortium.image_shape(head, head_meta), head_dir, source)
    seed = keys.draw() if secret_seed is None else int(secret_seed)
    public = (secret_seed is not None if public_key is None else public_key) \
        or head_meta.get("keys") != keys.SECRET
    k = ops.num_kept(head.num_patches, cfg.keep)
    manifest = payload.new_manifest(
        site_id=site_id, num_images=len(indices), num_samples=cfg.num_samples, tokens=k,
        dim=head.dim, dtype=cfg.payload_dtype, head_fingerprint=head_meta["fingerprint"],
        keep=cfg.keep, num_patches=head.num_patches, noise=noise_settings(cfg, k),
        per_site_head=config.model.per_site_heads, key_label=keys.label(public))
    manifest = _resume(files.as_path(out_dir), manifest)
    if manifest["complete"]:
        return manifest  # encoded before, with the same settings
    done = sum(s["num_images"] for s in manifest["shards"])

    dataset = data.site_dataset(source, indices, num_samples=cfg.num_samples,
                                augment=dict(cfg.augment), batch_size=cfg.batch_size,
                                seed=config.seed)
    encode = functools.partial(
        _encode_jit, head, keep=cfg.keep, mean=config.data.mean, std=config.data.std,
        shuffle=cfg.permute, token_noise=cfg.token_noise, dp_clip=cfg.dp_clip,
        dp_noise_multiplier=cfg.dp_noise_multiplier)
    start, shard = time.perf_counter(), []
    with tqdm(total=len(indices), initial=done, unit="img", desc=f"site {site_id}") as bar:
        for b in range(done // cfg.batch_size, len(dataset)):
            images = dataset[b]["images"]
            first = b * cfg.batch_size
            batch_keys = image_keys(seed, first, len(images))
            shard.append(np.asarray(encode(params, images, batch_keys)).astype(cfg.payload_dtype))
            bar.update(len(images))
            if sum(map(len, shard)) == cfg.shard_size or first + len(images) == len(indices):
                manifest = payload.write_shard(out_dir, manifest, np.concatenate(shard))
                shard = []
    manifest["seconds"] = time.perf_counter() - start
    return manifest


def site_stage(config, layout: Layout, site_id: int, head_dir: str | Path | None = None,
               head_fingerprint: str | None = None) -> dict:
    """Stage 1 for site `site_id` of the work directory `layout`: its images (from the
    partition), its key (`config.site.secret_seed + site_id`, or its own secret), its head
    (`head_dir`, default `consortium.site_head`), its payload into `layout.payload(site_id)`.
    Returns the payload's manifest."""
    parts, _ = data.load_partition(layout.partition)
    if not 0 <= site_id < len(parts):
        raise SMSDError(f"--site={site_id} but {layout.partition} has {len(parts)} sites")
    keys.warn_if_demo(config, f"site {site_id}")
    seed = secret_seed(config, layout, site_id)
    source = data.load_source(config.data, "train")
    head_dir = head_dir or consortium.site_head(config, layout, site_id)
    manifest = run_site(config, site_id, source, parts[site_id], head_dir,
                        layout.payload(site_id), secret_seed=seed,
                        expected_fingerprint=head_fingerprint,
                        public_key=config.site.secret_seed >= 0)
    print(f"site {site_id}: {manifest['num_images']} images -> {layout.payload(site_id)}")
    if "dp_epsilon" in manifest.get("noise", {}):
        n = manifest["noise"]
        print(f"site {site_id}: differential privacy per image (its {manifest['tokens']} tokens "
              f"of each of {manifest['num_samples']} samples; one image replaced): epsilon "
              f"{n['dp_epsilon']:.4g} at delta {n['dp_delta']:g} (clip {n['dp_clip']:g}, "
              f"noise multiplier {n['dp_noise_multiplier']:g})")
    return manifest


def secret_seed(config, layout: Layout, site_id: int) -> int:
    """Site `site_id`'s permutation key: with -1 the site's own, 128 bits from the OS
    (`consortium.site_secret`), or `config.site.secret_seed + site_id`, a public demo key (a
    reproducible simulation)."""
    if config.site.secret_seed >= 0:
        return config.site.secret_seed + site_id
    return consortium.site_secret(layout, site_id)


def _resume(out_dir: Path, manifest: dict) -> dict:
    """The manifest of an unfinished payload with the same settings, else a new one."""
    if not (out_dir / payload.MANIFEST).exists():
        return manifest
    old = payload.read_manifest(out_dir)
    fields = (set(old) | set(manifest)) - {"shards", "complete"}
    same = all(old.get(f) == manifest.get(f) for f in fields)
    if not same:
        raise SMSDError(f"{out_dir} already holds a payload made with other settings; move it "
                        "away or choose another output folder")
    return old
