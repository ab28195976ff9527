"""Consortium set-up: the frozen head that every site shares and the server never sees.

The head's weights come from a secret seed. Its fingerprint (a hash of the weights) goes into
every payload so the server can check that all sites used the same head without learning it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import jax
import jax.numpy as jnp

from smsd_jax import checkpoint, models

FORMAT = "smsd-head/1"


def head_fingerprint(params) -> str:
    """A short hash that identifies the head's weights and does not reveal them."""
    return checkpoint.tree_checksum(params)[:16]


def init_head(config, path: str | Path, secret_seed: int | None = None) -> str:
    """Draws the head of `config` from `secret_seed` and writes it to `path`.

    Args:
      secret_seed: the consortium key; None draws 63 random bits from the OS. Keep it, or the
        head folder, from the server.

    Returns:
      The head's fingerprint.
    """
    seed = secrets.randbits(63) if secret_seed is None else int(secret_seed)
    head = models.head_from_config(config)
    images = jnp.zeros((1, head.image_size, head.image_size, config.data.channels))
    params = head.init(jax.random.key(seed), images)["params"]
    fingerprint = head_fingerprint(params)
    checkpoint.save_artifact(path, params, dict(
        format=FORMAT, fingerprint=fingerprint, image_size=head.image_size,
        patch_size=head.patch_size, dim=head.dim, pos_std=head.pos_std,
        channels=config.data.channels))
    return fingerprint


def load_head(path: str | Path, expected_fingerprint: str | None = None):
    """Reads a head written by `init_head`.

    Returns:
      `(head module, params, meta)`.

    Raises:
      ValueError: the folder is not a head, or its fingerprint is not the expected one.
    """
    params, meta = checkpoint.load_artifact(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a head written by init (format {meta.get('format')!r},"
                         f" expected {FORMAT!r})")
    if head_fingerprint(params) != meta["fingerprint"]:
        raise ValueError(f"{path}: the head's weights do not match its fingerprint")
    if expected_fingerprint and meta["fingerprint"] != expected_fingerprint:
        raise ValueError(f"{path}: head fingerprint {meta['fingerprint']} is not the "
                         f"consortium's {expected_fingerprint}; get the head from the consortium")
    head = models.ViTHead(image_size=meta["image_size"], patch_size=meta["patch_size"],
                          dim=meta["dim"], pos_std=meta["pos_std"])
    return head, params, meta
