"""Consortium set-up: the frozen head that every site shares and the server never sees, the
split of a simulation's data into sites, and each site's secret permutation key.

    consortium.set_up(config, layout)        # --mode=init: head + partition.json
    seed = consortium.site_secret(layout, k)  # site k's key, drawn once, kept at the site
    head_dir = consortium.site_head(config, layout, k)  # the head site k encodes with

The head's weights come from a secret seed. Its fingerprint (a hash of the weights) goes into
every payload so the server can check that all sites used the same head without learning it.
With `config.model.per_site_heads` there is no shared head: each site draws its own, kept
at the site, and the server learns one stem per site.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax import artifacts, data, files, keys, models
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout

FORMAT = "smsd-head/1"


def head_fingerprint(params, constant_patches: str = "placed", blank_range: float = 0.0) -> str:
    """A short hash that identifies the head (its weights, and its rule for blank patches
    where that is not the default) and does not reveal it."""
    rules = {}
    if constant_patches != "placed":
        rules["constant_patches"] = np.frombuffer(constant_patches.encode(), np.uint8)
    if blank_range:
        rules["blank_range"] = np.float64(blank_range)
    return artifacts.tree_checksum(dict(params, **rules) if rules else params)[:16]


def init_head(config, path: str | Path, secret_seed: int | None = None,
              site: int | None = None) -> str:
    """Draws the head of `config` from `secret_seed` and writes it to `path`.

    Args:
      secret_seed: the consortium key; None draws 128 bits from the OS (`keys.draw`). Keep
        the head folder from the server. A key given here is one its caller knows: the head's
        metadata says `"keys": "public demo keys"`.
      site: a site's own head (per-site heads): the key is `secret_seed` folded with the site,
        so that one seed gives every site a different head.

    Returns:
      The head's fingerprint.
    """
    seed = keys.draw() if secret_seed is None else int(secret_seed)
    key = keys.prng_key(seed)
    if site is not None:
        key = jax.random.fold_in(key, site)
    head = models.head_from_config(config)
    images = jnp.zeros((1, head.image_size, head.image_size, config.data.channels))
    params = head.init(key, images)["params"]
    fingerprint = head_fingerprint(params, head.constant_patches, head.blank_range)
    artifacts.save_artifact(path, params, dict(
        format=FORMAT, fingerprint=fingerprint, image_size=head.image_size,
        patch_size=head.patch_size, dim=head.dim, pos_std=head.pos_std,
        constant_patches=head.constant_patches, blank_range=head.blank_range,
        channels=config.data.channels,
        keys=keys.label(public=secret_seed is not None)))
    return fingerprint


def image_shape(head: models.ViTHead, meta: dict) -> tuple[int, int, int]:
    """`(H, W, C)` of the images the head of `load_head` takes."""
    return head.image_size, head.image_size, meta["channels"]


def load_head(path: str | Path, expected_fingerprint: str | None = None):
    """Reads a head written by `init_head`.

    Returns:
      `(head module, params, meta)`.

    Raises:
      ValueError: the folder is not a head, or its fingerprint is not the expected one.
    """
    params, meta = artifacts.load_artifact(path)
    if meta.get("format") != FORMAT:
        raise SMSDError(f"{path} is not a head written by init (format {meta.get('format')!r},"
                        f" expected {FORMAT!r})")
    # Heads written before the options have neither.
    constant_patches = meta.get("constant_patches", "placed")
    blank_range = float(meta.get("blank_range", 0.0))
    if head_fingerprint(params, constant_patches, blank_range) != meta["fingerprint"]:
        raise SMSDError(f"{path}: the head's weights do not match its fingerprint")
    if expected_fingerprint and meta["fingerprint"] != expected_fingerprint:
        raise SMSDError(f"{path}: head fingerprint {meta['fingerprint']} is not the "
                        f"consortium's {expected_fingerprint}; get the head from the consortium")
    head = models.ViTHead(image_size=meta["image_size"], patch_size=meta["patch_size"],
                          dim=meta["dim"], pos_std=meta["pos_std"],
                          constant_patches=constant_patches, blank_range=blank_range)
    return head, params, meta


def set_up(config, layout: Layout) -> None:
    """The consortium's head (from `config.consortium_seed`, -1: the OS) and the sites' split
    of the data (`data.split_sites`); each is kept if it exists already. With per-site heads
    there is no consortium head: each site draws its own (`site_head`)."""
    keys.warn_if_demo(config, "init")
    if config.model.per_site_heads:
        print("init: per-site heads: each site draws its own head at --mode=site")
    elif layout.head.exists():
        print(f"init: head exists at {layout.head}, kept")
    else:
        seed = config.consortium_seed if config.consortium_seed >= 0 else None
        fingerprint = init_head(config, layout.head, secret_seed=seed)
        print(f"init: head {fingerprint} written to {layout.head}")
    if not layout.partition.exists():
        labels = data.load_source(config.data, "train").labels
        parts = data.split_sites(labels, config.data, config.seed)
        labels = labels[:sum(map(len, parts))]
        # Per site: images of each class, or known positives of each finding (multi-label).
        width = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
        data.save_partition(layout.partition, parts, dict(
            kind=config.data.partition, alpha=config.data.alpha, seed=config.seed,
            source=config.data.source,
            histogram=data.label_histogram(labels, parts, width).tolist()))
    data.load_partition(layout.partition)  # fail early on a damaged file


def site_secret(layout: Layout, site: int) -> int:
    """Site `site`'s permutation key: 128 bits drawn once from the OS, kept at the site (mode
    600), reused when the site runs again."""
    path = layout.secret(site)
    if not path.exists():
        files.write_json(path, {"key": keys.to_text(keys.draw())})
        if files.is_local(path):  # an object store's access is its bucket's, not a mode
            path.chmod(0o600)
    stored = files.read_json(path)
    if "key" not in stored:
        raise SMSDError(f"{path} holds no 128-bit key (an older smsd_jax wrote it); move it "
                        "and that site's payload away, and run the site again")
    return keys.from_text(stored["key"])


def site_head(config, layout: Layout, site: int, draw: bool = True) -> Path:
    """The folder of the head site `site` encodes and fine-tunes with: the consortium's, or
    with `config.model.per_site_heads` the site's own (`Layout.site_head`), drawn the first
    time (`draw`: stage 1) from `config.consortium_seed` folded with the site (-1: from the
    OS, at the site). Without `draw` a missing head is an error: a new one would not be the
    one the site encoded with."""
    if not config.model.per_site_heads:
        return layout.head
    path = layout.site_head(site)
    if not path.exists() and not draw:
        raise SMSDError(f"site {site} has no head at {path}: with per-site heads a site keeps "
                        "the head it encoded with; run that site's --mode=site first, or point "
                        "--workdir at the run that did")
    if not path.exists():
        seed = config.consortium_seed if config.consortium_seed >= 0 else None
        fingerprint = init_head(config, path, secret_seed=seed, site=site)
        print(f"site {site}: its own head {fingerprint} written to {path}")
    return path
