"""Masked sampling and permutation: what a site does to its tokens before sending them.

All functions act on the last two axes `[..., tokens, dim]`, so any leading batch axes
(images, samples) work, and they stay correct under `jax.jit` and `jax.vmap`. The number of
kept tokens is a static Python int computed from the static shape and `keep`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smsd_jax.errors import SMSDError, check_rank


def num_kept(num_tokens: int, keep: float, name: str = "keep", of: str = "tokens") -> int:
    """`K = round(keep * N)`, the number of tokens masked sampling keeps.

    Raises:
        SMSDError: `keep` is outside (0, 1] or rounds to no token at all (the message calls
          it `name`, e.g. the config key, and the tokens `of`).
    """
    if not 0.0 < keep <= 1.0:
        raise SMSDError(f"{name}={keep!r}: must be a fraction in (0, 1] (of the tokens kept)")
    k = int(round(keep * num_tokens))
    if k < 1:
        raise SMSDError(f"{name}={keep!r}: keeps no token of the {num_tokens} {of} "
                        f"(round({keep} * {num_tokens}) = 0); raise it or use more tokens")
    return k


def _gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """tokens `[..., N, D]`, indices `[..., K]` -> `[..., K, D]`."""
    return jnp.take_along_axis(tokens, indices[..., None], axis=-2)


def mask_sample(key: jax.Array, tokens: jax.Array, keep: float) -> tuple[jax.Array, jax.Array]:
    """Keeps a uniformly random subset of `K = round(keep * N)` tokens of each example.

    Each example (every index of the leading axes) gets its own subset. The kept tokens stay
    in their input order; `permute` is what hides the order.

    Args:
        key: a `jax.random` key.
        tokens: `[..., N, D]`.
        keep: fraction of tokens kept, in (0, 1].

    Returns:
        `(kept, indices)`: `kept` `[..., K, D]`, and `indices` `[..., K]` (int32, increasing)
        with `kept[..., i, :] == tokens[..., indices[..., i], :]`.
    """
    check_rank("tokens", tokens, {2, 3, 4, 5})
    k = num_kept(tokens.shape[-2], keep)
    # The top-K of i.i.d. uniform noise is a uniformly random K-subset.
    noise = jax.random.uniform(key, tokens.shape[:-1])
    _, indices = jax.lax.top_k(noise, k)
    indices = jnp.sort(indices, axis=-1).astype(jnp.int32)
    return _gather_tokens(tokens, indices), indices


def permute(key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shuffles the tokens of each example with its own fresh random permutation.

    Args:
        key: a `jax.random` key.
        tokens: `[..., K, D]`.

    Returns:
        `(shuffled, perm)`: `shuffled` `[..., K, D]` and `perm` `[..., K]` (int32) with
        `shuffled[..., i, :] == tokens[..., perm[..., i], :]`.
    """
    check_rank("tokens", tokens, {2, 3, 4, 5})
    # argsort of i.i.d. noise is a uniformly random permutation, independently per example.
    perm = jnp.argsort(jax.random.uniform(key, tokens.shape[:-1]), axis=-1).astype(jnp.int32)
    return _gather_tokens(tokens, perm), perm


def unpermute(tokens: jax.Array, perm: jax.Array) -> jax.Array:
    """Inverts `permute`: `unpermute(*permute(key, x)) == x`.

    Args:
        tokens: shuffled tokens `[..., K, D]`.
        perm: the permutation `permute` returned, `[..., K]`.

    Returns:
        `[..., K, D]`, the tokens in their order before `permute`.
    """
    if tokens.shape[:perm.ndim] != perm.shape:
        raise ValueError(f"perm {perm.shape} is not the leading shape of tokens {tokens.shape}")
    return _gather_tokens(tokens, jnp.argsort(perm, axis=-1))


def encrypt(key: jax.Array, tokens: jax.Array, keep: float,
            shuffle: bool = True) -> tuple[jax.Array, jax.Array]:
    """What a site sends: masked sampling (keep `K` of `N` tokens), then a random permutation.

    Use a fresh key for every transmitted sample: a permutation reused across images leaks
    (docs/method.md).

    Args:
        key: a `jax.random` key.
        tokens: head output `[..., N, D]` (patch embedding plus position embedding).
        keep: fraction of tokens kept, in (0, 1].
        shuffle: False skips the permutation (kept tokens stay in grid order): only for the
          ablation that measures what the permutation costs; it hides nothing.

    Returns:
        `(sent, positions)`: `sent` `[..., K, D]` is the payload; `positions` `[..., K]` (int32)
        gives the patch index each sent token came from (`sent[..., i, :] ==
        tokens[..., positions[..., i], :]`). `positions` is the secret: it never leaves the
        site; it exists for tests, attention maps and privacy studies.
    """
    mask_key, perm_key = jax.random.split(key)
    kept, indices = mask_sample(mask_key, tokens, keep)
    if not shuffle:
        return kept, indices
    sent, perm = permute(perm_key, kept)
    return sent, jnp.take_along_axis(indices, perm, axis=-1)
