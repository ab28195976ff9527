"""The payload format: what one site uploads, once.

    <payload>/manifest.json     format, site id, counts, shapes, dtype, head fingerprint,
                                the token noise if any (with differential privacy: its
                                epsilon per image), per-shard checksums, and whether the
                                upload is complete
    <payload>/shard_00000/      an artifact (Orbax + meta.json) holding tokens [n, M, K, D]

Token sets only: no pixels, labels, positions, permutation keys or head weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from smsd_jax import artifacts, files
from smsd_jax.errors import SMSDError

FORMAT = "smsd-payload/1"
MANIFEST = "manifest.json"
# Fields every payload of one training run must agree on.
AGREE = ("head_fingerprint", "num_samples", "tokens", "dim", "dtype")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def new_manifest(site_id: int, num_images: int, num_samples: int, tokens: int, dim: int,
                 dtype: str, head_fingerprint: str, keep: float, num_patches: int,
                 noise: dict | None = None) -> dict:
    """A payload's manifest before its first shard. `noise`: the site's token noise settings
    (`site.noise_settings`); None (no noise) leaves the field out."""
    extra = {} if noise is None else {"noise": noise}
    return dict(format=FORMAT, site_id=site_id, num_images=num_images, num_samples=num_samples,
                tokens=tokens, dim=dim, dtype=dtype, head_fingerprint=head_fingerprint,
                keep=keep, num_patches=num_patches, **extra, shards=[], complete=False)


def write_shard(path: str | Path, manifest: dict, tokens: np.ndarray) -> dict:
    """Writes the next shard, then the manifest that lists it (so a crash loses one shard)."""
    path = Path(path)
    name = shard_name(len(manifest["shards"]))
    artifacts.save_artifact(path / name, {"tokens": tokens}, {"format": FORMAT})
    entry = dict(name=name, num_images=int(tokens.shape[0]),
                 checksum=artifacts.load_meta(path / name)["checksum"])
    manifest = {**manifest, "shards": [*manifest["shards"], entry]}
    written = sum(s["num_images"] for s in manifest["shards"])
    manifest["complete"] = written == manifest["num_images"]
    files.write_json(path / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest = files.read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
    if manifest is None or manifest.get("format") != FORMAT:
        raise SMSDError(f"{path} is not a payload of this project (no {MANIFEST} of format "
                        f"{FORMAT}); point to a folder written by --mode=site")
    return manifest


def check_agree(manifests: dict[str, dict]) -> None:
    """All payloads complete and made with the same head and shapes, or a ValueError naming
    the site that differs."""
    first_name, first = next(iter(manifests.items()))
    for name, m in manifests.items():
        if not m["complete"]:
            raise SMSDError(f"payload {name} (site {m['site_id']}) is incomplete: "
                            f"{sum(s['num_images'] for s in m['shards'])} of {m['num_images']}"
                            " images; run that site's --mode=site again to finish it")
        for field in AGREE:
            if m[field] != first[field]:
                raise SMSDError(
                    f"payload {name} (site {m['site_id']}) has {field}={m[field]!r} but "
                    f"{first_name} (site {first['site_id']}) has {first[field]!r}; every site "
                    "must encode with the consortium's head and the same site settings")


def read_tokens(path: str | Path) -> np.ndarray:
    """All token sets of one payload, `[images, M, K, D]`, each shard checked on read."""
    path = Path(path)
    manifest = read_manifest(path)
    parts = []
    for shard in manifest["shards"]:
        try:
            tree, meta = artifacts.load_artifact(path / shard["name"])
        except Exception as e:  # Orbax / tensorstore errors on damaged files vary by version.
            raise SMSDError(f"payload {path} (site {manifest['site_id']}): {shard['name']} "
                            f"cannot be read ({type(e).__name__}: {str(e)[:300]}); ask the "
                            "site to send its payload again") from e
        if meta["checksum"] != shard["checksum"]:
            raise SMSDError(f"{path / shard['name']}: shard does not match the checksum in "
                            f"{MANIFEST}; ask site {manifest['site_id']} to send it again")
        parts.append(tree["tokens"])
    return np.concatenate(parts)


def read_payloads(payload_dirs, skip_bad_sites: bool = False) -> tuple[dict[str, dict], np.ndarray]:
    """Every site's payload for training: `({folder: manifest}, tokens [images, M, K, D])`.

    Each payload must be complete and agree with the others (`check_agree`); each shard is
    checked against its checksum. A payload that fails stops the run naming its site, or,
    with `skip_bad_sites`, is left out with a warning.
    """
    if not payload_dirs:
        raise SMSDError("no payloads given: pass the folders written by --mode=site")
    manifests, site_tokens = {}, []
    for d in map(str, payload_dirs):
        try:
            manifest = read_manifest(d)
            check_agree({**manifests, d: manifest})
            site_tokens.append(read_tokens(d))
            manifests[d] = manifest
        except SMSDError as e:
            if not skip_bad_sites:
                raise
            warnings.warn(f"skipping payload {d}: {e}")
    if not manifests:
        raise SMSDError(f"none of the {len(payload_dirs)} payloads could be used")
    return manifests, np.concatenate(site_tokens)
