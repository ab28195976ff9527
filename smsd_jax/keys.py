"""The consortium's and the sites' secret keys: 128 bits from the operating system, or public
demo keys for reproducible simulations.

    secret = keys.draw()            # 128 bits from the OS (`secrets`)
    key = keys.prng_key(secret)     # a jax key that holds all 128 bits

The head is drawn from the consortium's key and every image's mask and permutation from its
site's key. Keys are `jax.random` keys of the "rbg" implementation (four 32-bit words), so all
128 bits count: a threefry key holds 64. A key that anyone can read (a seed written in a
config, `config.consortium_seed` or `config.site.secret_seed` >= 0, only through a config's
`demo_keys` variant) is a *public demo key*: the head and every position can be rebuilt from
it. Runs with one say so: a warning at each stage, `"keys": "public demo keys"` in the head's
and every payload's metadata, and a line in the server's log and the results.
"""

from __future__ import annotations

import secrets

import jax
import numpy as np

from smsd_jax.errors import SMSDError

BITS = 128
DEMO = "public demo keys"
SECRET = "secret keys from the OS"

_WARNING = ("WARNING: {where} uses public demo keys ({what}): anyone can rebuild the head and "
            "every token's position from the code. Fine for a simulation on public data; a "
            "real consortium leaves config.consortium_seed and config.site.secret_seed at -1 "
            "(drawn from the OS).")


def draw() -> int:
    """A fresh secret: 128 random bits from the operating system."""
    return secrets.randbits(BITS)


def prng_key(secret: int) -> jax.Array:
    """The `jax.random` key ("rbg", four uint32 words) holding all bits of `secret`, an integer
    in [0, 2**128)."""
    secret = int(secret)
    if not 0 <= secret < 2**BITS:
        raise SMSDError(f"key {secret} is outside [0, 2**{BITS}); draw one with keys.draw()")
    words = np.array([(secret >> (32 * i)) & 0xFFFFFFFF for i in range(BITS // 32)], np.uint32)
    return jax.random.wrap_key_data(words, impl="rbg")


def to_text(secret: int) -> str:
    """A key as 32 hexadecimal digits (JSON numbers lose bits past 2**53 in many readers)."""
    return f"{int(secret):0{BITS // 4}x}"


def from_text(text: str) -> int:
    """The key `to_text` wrote."""
    try:
        return int(text, 16)
    except (TypeError, ValueError):
        raise SMSDError(f"{text!r} is not a key written by smsd_jax (32 hexadecimal digits)")


def label(public: bool) -> str:
    """What the metadata records of a key: `DEMO` or `SECRET`."""
    return DEMO if public else SECRET


def is_demo(config) -> bool:
    """Whether `config` fixes a public key: the consortium's or the sites'."""
    return config.consortium_seed >= 0 or config.site.secret_seed >= 0


def warn_if_demo(config, where: str) -> None:
    """Prints the public-key warning for stage `where` when `config` fixes a key."""
    if is_demo(config):
        what = ", ".join(f"{name}={value}" for name, value in (
            ("config.consortium_seed", config.consortium_seed),
            ("config.site.secret_seed", config.site.secret_seed)) if value >= 0)
        print(_WARNING.format(where=where, what=what))


def warn_if_demo_payloads(manifests, where: str) -> bool:
    """Prints the warning when any payload of `manifests` was made with public demo keys;
    returns whether one was."""
    public = sorted(m["site_id"] for m in manifests if m.get("keys") == DEMO)
    if public:
        print(_WARNING.format(where=where, what=f"the payloads of sites {public}"))
    return bool(public)
