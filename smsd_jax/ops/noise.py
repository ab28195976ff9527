"""Token noise: what a site may add to its tokens after masking and permutation.

Two kinds (`smsd_jax/site.py` applies them, `config.site`): plain Gaussian noise of a chosen
std (`add_token_noise`, no formal guarantee), and the Gaussian mechanism of differential
privacy (`gaussian_dp`: each token clipped to an L2 norm, then noise scaled to that norm;
`smsd_jax/privacy/dp_accountant.py` gives its (epsilon, delta)). The functions act on the last
axis `[..., D]`, are pure and stay correct under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_scale(head_params) -> jax.Array:
    """The RMS value of the head's tokens, from the head's parameters alone (no data).

    A token is `t_i = W^T x_i + b + P_i` (kernel `W` `[p, D]`, bias `b`, position row `P_i`).
    Assume the `p` values of a patch `x_i` have mean 0, variance 1 and no correlation (pixels
    standardised by `config.data.mean`, `std`). Then `E x_i = 0` removes the cross term and
    `E ||W^T x_i||^2 = ||W||_F^2`, so over all `N` positions and `D` values

        RMS^2 = E mean_{i, d} t_{i, d}^2 = ||W||_F^2 / D + mean_{i, d} (b_d + P_{i, d})^2.

    For the head's init (`W` variance 1 / p, `b` = 0, `P` std `model.pos_std`) this is about
    `1 + pos_std^2`, whatever `p`. Correlated pixels change the first term to
    `tr(W^T C W) / D` for their covariance `C`; its mean over random heads is the same.

    Args:
      head_params: the head's parameters (`consortium.load_head`): `patch_embed` (`kernel`,
        `bias`) and `pos_embed`.

    Returns:
      A float32 scalar.
    """
    kernel = head_params["patch_embed"]["kernel"].astype(jnp.float32)
    offsets = head_params["pos_embed"] + head_params["patch_embed"]["bias"]
    content = jnp.sum(jnp.square(kernel)) / kernel.shape[-1]
    return jnp.sqrt(content + jnp.mean(jnp.square(offsets.astype(jnp.float32))))


def add_token_noise(key: jax.Array, tokens: jax.Array, std) -> jax.Array:
    """`tokens + N(0, std^2)`, fresh and independent for every value of every token.

    Args:
      key: a `jax.random` key; use a fresh one for every release.
      tokens: `[..., D]`.
      std: the noise's standard deviation, in the tokens' own units (not relative).
    """
    noise = jax.random.normal(key, tokens.shape, jnp.float32)
    return (tokens.astype(jnp.float32) + std * noise).astype(tokens.dtype)


def clip_tokens(tokens: jax.Array, clip) -> jax.Array:
    """Each token `[..., D]` scaled down to L2 norm `clip` if it is longer; shorter tokens
    are returned unchanged (bit for bit)."""
    norms = jnp.linalg.norm(tokens.astype(jnp.float32), axis=-1, keepdims=True)
    scaled = tokens * (clip / jnp.maximum(norms, clip)).astype(tokens.dtype)
    return jnp.where(norms > clip, scaled, tokens)


def gaussian_dp(key: jax.Array, tokens: jax.Array, clip, noise_multiplier) -> jax.Array:
    """The Gaussian mechanism on tokens: `clip_tokens`, then `N(0, (noise_multiplier *
    clip)^2)` added to every value (`add_token_noise`).

    One image's release (its `K` tokens of each of its `M` samples) then has the (epsilon,
    delta) of `smsd_jax.privacy.dp_accountant.image_epsilon`.
    """
    return add_token_noise(key, clip_tokens(tokens, clip), noise_multiplier * clip)
