"""The split Vision Transformer: a site's head, the server's order-blind body, and tails.

`ViTHead` turns images into tokens (patch embedding + position embedding); it is the only
part that knows where a token came from. `ViTBody` takes any set of tokens `[batch, K, dim]`
and has no position-dependent part, so it is permutation-equivariant (docs/method.md).

The body and `DINOHead` are initialised, and the body regularised (stochastic depth), as
facebookresearch/dino's `vision_transformer.py` builds them: every linear weight
`trunc_normal_(std=0.02)` (bounds +-2, absolute), biases 0, LayerNorms (1, 0), the class
token `trunc_normal_(std=0.02)`, and the head's weight-normalised last layer from PyTorch's
default `Linear` init. The head (`ViTHead`) keeps its own, deliberate init, and so does the
body's optional stem (`ViTBody.token_dim`: the map from a narrower token width to the body's).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smsd_jax.errors import SMSDError

# dim, depth, heads. "tiny" is for tests; "small4" is the built-in data's model (docs/method.md).
PRESETS = {
    "tiny": dict(dim=32, depth=2, heads=2),
    "small4": dict(dim=128, depth=4, heads=4),
    "Ti": dict(dim=192, depth=12, heads=3),
    "S": dict(dim=384, depth=12, heads=6),
    "B": dict(dim=768, depth=12, heads=12),
}


def preset(name: str) -> dict:
    """`{"dim", "depth", "heads"}` of a named ViT size."""
    if name not in PRESETS:
        raise SMSDError(f"unknown ViT size {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def trunc_normal(std: float = 0.02, a: float = -2.0, b: float = 2.0) -> nn.initializers.Initializer:
    """timm's / DINO's `trunc_normal_(std=std, a=a, b=b)`: N(0, std^2) truncated to [a, b].

    The bounds are absolute values, not multiples of `std` (Flax's `truncated_normal(std)`
    cuts at +-2 std and so has std 0.88 std; DINO's at std 0.02 cuts at +-100 std, i.e. it is
    a plain normal). Where both bounds lie beyond 6 std, past anything a float32 normal
    sampler draws (about 5.4 std), the exact distribution is a normal, clipped only as a
    guard; otherwise `jax.random.truncated_normal` between the bounds in std units. (That
    sampler is avoided far out: its uniform's end point maps to the bound itself when
    erf(bound) rounds to +-1, an atom at +-2 of about 1e-7 per weight.)
    """
    if not std > 0 or not a < b:
        raise SMSDError(f"trunc_normal needs std > 0 and a < b, got std={std}, a={a}, b={b}")

    def init(key, shape, dtype=jnp.float32):
        if -a >= 6 * std and b >= 6 * std:
            return jnp.clip(std * jax.random.normal(key, shape, dtype), a, b)
        return std * jax.random.truncated_normal(key, a / std, b / std, shape, dtype)
    return init


def torch_linear_uniform(fan_in_axis: int = 0) -> nn.initializers.Initializer:
    """PyTorch's default `nn.Linear` weight init, `kaiming_uniform_(a=sqrt(5))`.

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in).
    `fan_in_axis` is the input axis of the weight (0 for a Flax `[in, out]` kernel).
    """
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(shape[fan_in_axis])
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# DINO's `_init_weights` for every linear layer of the body and the DINO head's MLP.
_dense_init = dict(kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros)

# The body's weight matrices at init (`ViTBody.weight_init`, `config.model.init`): DINO's trunc_normal(0.02), or Flax's
# default lecun_normal (variance 1 / fan_in). At 0.02 the attention logits of a small body
# are ~0, so every attention map starts uniform and the untrained body is a mean pool.
INITS = {"dino": _dense_init,
         "lecun": dict(kernel_init=nn.initializers.lecun_normal(),
                       bias_init=nn.initializers.zeros)}


def dense_init(init: str) -> dict:
    """The kernel and bias initialisers of the body's linear layers for `init` (`INITS`)."""
    if init not in INITS:
        raise SMSDError(f"init={init!r}: use one of {tuple(INITS)} (config.model.init)")
    return INITS[init]


def stochastic_depth_rates(rate: float, depth: int) -> list[float]:
    """DINO's stochastic depth decay rule: block i of `depth` gets `linspace(0, rate)[i]`."""
    return [float(r) for r in np.linspace(0.0, rate, depth)]


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch `x [B, ...]`, as DINO's `drop_path`.

    Each example's branch is zeroed with probability `rate` (one draw per example, shared by
    all its tokens, so the body stays permutation-equivariant); a kept one is scaled by
    `1 / (1 - rate)`, so the expectation is `x`. The scale is applied in float32.
    """
    if rate == 0.0:
        return x
    keep = 1.0 - rate
    kept = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = jnp.where(kept, jnp.float32(1.0 / keep), jnp.float32(0.0))
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, (H/p)*(W/p), p*p*C]`, patches in row-major grid order.

    Each patch is flattened in (row, column, channel) order, the order of a `[p, p, C, D]`
    convolution kernel, so a `Dense` over patches equals a stride-`p` convolution.
    """
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise SMSDError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


CONSTANT_PATCHES = ("placed", "unplaced")  # ViTHead.constant_patches


def blank_patches(patches: jax.Array, blank_range: float = 0.0) -> jax.Array:
    """patches `[..., N, P]` -> `[..., N]` bool: the patch is blank, its values span at most
    `blank_range` (0: all equal, such as blank background or a saturated area)."""
    return jnp.max(patches, axis=-1) - jnp.min(patches, axis=-1) <= blank_range


class ViTHead(nn.Module):
    """A site's head: tokens `t_i = W x_i + P_i` for all `N` patches of an image.

    Attributes:
      image_size: height = width of the images.
      patch_size: side of a square patch.
      dim: token width `D`.
      pos_std: standard deviation of the position embedding at init. ViT's usual 0.02 is
        drowned by patch content; 0.5 keeps position visible on normalised pixels.
      interpolate_pos: False (sites, downstream): only `image_size` images are accepted.
        True (image DINO's multi-crop): any height and width that are multiples of
        `patch_size`; the position grid is resized to the image's patch grid (bicubic, as
        DINO). The parameters are the same either way, so one set serves both heads.
      constant_patches: "placed" (every token is `W x_i + P_i`) or "unplaced": a blank patch
        (`blank_patches`: values all equal, blank background, a saturated area, or within
        `blank_range`) gets `W x_i` alone, no position. Placed, every blank patch at position
        i gives the same token, so the payload shows which positions of each image are blank,
        whatever the head (docs/threat_model.md).
      blank_range: the widest span of a patch's values (in the units of the head's input,
        normalised pixels) that still counts as blank; 0: only patches of equal values. Above
        0, almost blank patches (a faint edge) are blank too, so no token sent with a position
        sits next to its position's offset.
    """
    image_size: int
    patch_size: int
    dim: int
    pos_std: float = 0.5
    dtype: jnp.dtype = jnp.float32
    interpolate_pos: bool = False
    constant_patches: str = "placed"
    blank_range: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, H, W, C]` (C = 1 or 3) -> tokens `[B, (H/p)*(W/p), D]`."""
        native = (self.image_size, self.image_size)
        if images.ndim != 4 or (images.shape[1:3] != native and not self.interpolate_pos):
            raise SMSDError(f"images of shape {images.shape} do not match the head: expected "
                            f"[batch, {self.image_size}, {self.image_size}, channels]")
        if self.constant_patches not in CONSTANT_PATCHES:
            raise SMSDError(f"constant_patches={self.constant_patches!r}; use one of "
                            f"{CONSTANT_PATCHES}")
        patches = patchify(images.astype(self.dtype), self.patch_size)
        tokens = nn.Dense(self.dim, dtype=self.dtype, name="patch_embed")(patches)
        pos = self.param("pos_embed", nn.initializers.normal(self.pos_std),
                         (self.num_patches, self.dim))
        side = self.image_size // self.patch_size
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        pos = resize_pos_embed(pos, side, grid).astype(self.dtype)
        if self.constant_patches == "unplaced":
            blank = blank_patches(patches, self.blank_range)  # [B, N]
            return tokens + jnp.where(blank[..., None], 0, pos)
        return tokens + pos


def resize_pos_embed(pos: jax.Array, side: int, grid: tuple[int, int]) -> jax.Array:
    """Position embedding `[side*side, D]` of a square patch grid -> `[grid_h*grid_w, D]`.

    Bicubic interpolation of the grid (half-pixel centres, no antialiasing: DINO's
    `interpolate_pos_encoding`); the embedding itself, unchanged, when the grid is the same.
    """
    if grid == (side, side):
        return pos
    dim = pos.shape[-1]
    grid_pos = jax.image.resize(pos.reshape(side, side, dim), (*grid, dim), "bicubic",
                                antialias=False)
    return grid_pos.reshape(grid[0] * grid[1], dim)


class Attention(nn.Module):
    """Multi-head self-attention over a set of tokens; no position bias of any kind."""
    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None  # jax.nn.dot_product_attention's: None, "xla", "cudnn".
    weight_init: str = "dino"  # INITS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv",
                       **dense_init(self.weight_init))(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, self.dim // self.heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, heads, head_dim]
        if self.is_mutable_collection("intermediates"):
            # Asked for attention maps: the explicit form, which exposes the weights.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            self.sow("intermediates", "attention", weights)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj",
                        **dense_init(self.weight_init))(out.reshape(b, t, self.dim))


class Block(nn.Module):
    """Pre-norm transformer block: every op but attention acts on each token alone.

    `drop_path`: stochastic depth rate of both residual branches (attention, MLP), each
    dropped per example independently, when called with `deterministic=False` (rng stream
    "drop_path").
    """
    dim: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None
    drop_path: float = 0.0
    weight_init: str = "dino"  # INITS

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        def residual(branch):
            if deterministic or self.drop_path == 0.0:
                return branch
            return drop_path(branch, self.drop_path, self.make_rng("drop_path"))

        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.dim, self.heads, self.dtype, self.attention, self.weight_init,
                      name="attn")(y)
        x = x + residual(y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = nn.Dense(int(self.mlp_ratio * self.dim), dtype=self.dtype, name="fc1",
                     **dense_init(self.weight_init))(y)
        y = nn.Dense(self.dim, dtype=self.dtype, name="fc2",
                     **dense_init(self.weight_init))(nn.gelu(y, approximate=False))
        return x + residual(y)


class ViTBody(nn.Module):
    """The server's body: class token + transformer blocks + final norm, blind to token order.

    Takes any number `K` of tokens. With no position embedding, grid or order-dependent op,
    the class feature is invariant and the token features are equivariant under any
    permutation of the input tokens. Attention maps: `apply(..., mutable=["intermediates"])`.

    Attributes:
      drop_path: stochastic depth rate (DINO's `drop_path_rate`, 0.1 for its student): block
        i gets `linspace(0, drop_path, depth)[i]` (`stochastic_depth_rates`). It acts only when
        called with `deterministic=False`, with an rng stream "drop_path"; it has no
        parameters, so a body of any rate reads the same parameters.
      token_dim: 0: the tokens come at the body's width `dim`, and there is no stem. > 0: the
        tokens come at width `token_dim` (the head's, `config.model.head_dim`) and a learned
        per-token linear "stem" `Dense(dim)` maps them to `dim` before the class token goes
        in front (it acts on each token alone, so the body stays blind to order). Its kernel
        is Flax's default `lecun_normal` (variance 1 / token_dim) with a zero bias, not
        DINO's `trunc_normal_(0.02)`: it keeps the scale of the tokens the blocks see (the
        head's, about 1 per value) what it is without a stem, where 0.02 would shrink them
        to 0.02 sqrt(token_dim) of it; DINO's own input map, its patch embedding (a Conv2d),
        is not under the 0.02 rule either.
      site_stems: 0: one stem for every site (one head). S > 0 (per-site heads,
        `config.model.per_site_heads`): S stems, kernel `[S, token_dim, dim]` and bias
        `[S, dim]`, and each example goes through the stem of its site (`sites` at call).
        `site_body` cuts out one site's stem: that site's plain body.
      weight_init: the blocks' weight matrices at init, "dino" (trunc_normal 0.02, DINO's)
        or "lecun" (Flax's lecun_normal); `INITS` (`config.model.init`).
    """
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None
    drop_path: float = 0.0
    token_dim: int = 0
    site_stems: int = 0
    weight_init: str = "dino"

    @property
    def drop_path_rates(self) -> list[float]:
        """The stochastic depth rate of each block."""
        return stochastic_depth_rates(self.drop_path, self.depth)

    @property
    def input_dim(self) -> int:
        """The width of the tokens the body takes: `token_dim`, or `dim` without a stem."""
        return self.token_dim or self.dim

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True,
                 sites: jax.Array | None = None, last_blocks: int = 0) -> tuple:
        """tokens `[B, K, input_dim]` -> (class feature `[B, D]`, token features `[B, K, D]`).

        `deterministic=False` (the student's training forward) applies stochastic depth and
        needs `rngs={"drop_path": key}` when `drop_path > 0`. `sites` `[B]` (int): the site of
        each example, with `site_stems` only. `last_blocks` n > 0 adds a third output, DINO's
        `get_intermediate_layers`: the outputs of the last n blocks through the final norm,
        `[n, B, 1 + K, D]` (the linear probe's features).
        """
        width = self.input_dim
        if tokens.ndim != 3 or tokens.shape[-1] != width:
            stem = f" with a stem from width {width}" if self.token_dim else ""
            raise SMSDError(f"tokens of shape {tokens.shape} do not fit a body of width "
                            f"{self.dim}{stem}: expected [batch, tokens, {width}]")
        if not 0.0 <= self.drop_path < 1.0:
            raise SMSDError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if (sites is not None) != bool(self.site_stems) or (self.site_stems
                                                             and not self.token_dim):
            given = "without" if sites is None else "with"
            raise SMSDError(f"a body with site_stems={self.site_stems} and token_dim="
                            f"{self.token_dim} was called {given} sites: per-site stems need a "
                            "token_dim > 0 and the site of every example, and only they do")
        if self.site_stems:
            tokens = SiteStems(self.site_stems, self.dim, self.dtype, name="stem")(tokens, sites)
        elif self.token_dim:
            tokens = nn.Dense(self.dim, dtype=self.dtype, name="stem",
                              kernel_init=nn.initializers.lecun_normal(),
                              bias_init=nn.initializers.zeros)(tokens)
        cls = self.param("cls_token", trunc_normal(0.02), (1, 1, self.dim))
        cls = jnp.broadcast_to(cls, (tokens.shape[0], 1, self.dim))
        x = jnp.concatenate([cls, tokens], axis=1).astype(self.dtype)
        outputs = []
        for i, rate in enumerate(self.drop_path_rates):
            x = Block(self.dim, self.heads, self.mlp_ratio, self.dtype, self.attention,
                      drop_path=rate, weight_init=self.weight_init,
                      name=f"block{i}")(x, deterministic)
            outputs.append(x)
        norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
        x = norm(x)
        if not last_blocks:
            return x[:, 0], x[:, 1:]
        if not 0 < last_blocks <= self.depth:
            raise SMSDError(f"last_blocks={last_blocks} of a body of depth {self.depth}")
        return x[:, 0], x[:, 1:], jnp.stack([norm(o) for o in outputs[-last_blocks:]])


class SiteStems(nn.Module):
    """One per-token linear stem per site: token `t` of site `s` -> `t @ kernel[s] + bias[s]`.

    Each stem is initialised as `ViTBody`'s single stem (`lecun_normal` over the token width,
    zero bias), each from its own part of the key.
    """
    num_sites: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, sites: jax.Array) -> jax.Array:
        """tokens `[B, K, token_dim]`, sites `[B]` -> `[B, K, dim]`."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                            (self.num_sites, tokens.shape[-1], self.dim))
        bias = self.param("bias", nn.initializers.zeros, (self.num_sites, self.dim))
        kernel, bias = jnp.asarray(kernel, self.dtype), jnp.asarray(bias, self.dtype)
        return jnp.einsum("bkt,btd->bkd", tokens.astype(self.dtype), kernel[sites]
                          ) + bias[sites][:, None]


def site_body(body: ViTBody, params, site: int) -> tuple[ViTBody, dict]:
    """Site `site`'s body out of one with per-site stems: the blocks as they are and that
    site's stem alone, as a plain `ViTBody` with one stem (what the site fine-tunes); a body
    without per-site stems is returned as it is."""
    if not body.site_stems:
        return body, params
    if not 0 <= site < body.site_stems:
        raise SMSDError(f"site {site} has no stem in this body: it holds stems of sites 0 to "
                        f"{body.site_stems - 1}; only sites whose payloads the server trained "
                        "on have one")
    stem = {name: value[site] for name, value in params["stem"].items()}
    return body.clone(site_stems=0), {**params, "stem": stem}


class DINOHead(nn.Module):
    """DINO projection head: MLP, L2-normalise, weight-normalised last linear layer.

    As DINO's `DINOHead` (no batch norm): the MLP's linear layers `trunc_normal_(std=0.02)`
    with zero biases; the last layer `weight_norm(Linear(bottleneck_dim, out_dim,
    bias=False))` with `v` from PyTorch's default Linear init, U(+-1/sqrt(bottleneck_dim)),
    and `g` filled with 1. The MLP computes in `dtype`; the normalisation and the last layer
    always in float32 (full precision), so the logits, sharpened by the teacher temperature,
    carry no bfloat16 rounding.

    Attributes:
      out_dim: number of prototypes (65,536 in DINO).
      norm_last_layer: if True the last layer's norm is fixed at 1 (no `last_layer_g`).
    """
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """features `[B, D]` -> logits `[B, out_dim]` (float32)."""
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name, **_dense_init)
        for i in range(self.num_layers - 1):
            x = nn.gelu(dense(self.hidden_dim, f"mlp{i}")(x), approximate=False)
        x = dense(self.bottleneck_dim, f"mlp{self.num_layers - 1}")(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        # v [in, out]: the transpose of torch's weight_v [out, in]; fan_in = bottleneck_dim.
        v = self.param("last_layer_v", torch_linear_uniform(fan_in_axis=0),
                       (self.bottleneck_dim, self.out_dim)).astype(jnp.float32)
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.norm_last_layer:
            w = w * self.param("last_layer_g", nn.initializers.ones, (self.out_dim,))
        return jnp.dot(x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)


class DINONet(nn.Module):
    """What the server trains (student) and averages (teacher): body + DINO head."""
    body: ViTBody
    dino_head: DINOHead

    def __call__(self, tokens: jax.Array, deterministic: bool = True,
                 sites: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens `[B, K, D]` -> (logits `[B, out_dim]`, class feature `[B, D]`).

        The student trains with `deterministic=False, rngs={"drop_path": key}` (stochastic
        depth); the teacher and everything downstream use the default. `sites` `[B]`: each
        example's site, for a body with per-site stems.
        """
        feature, _ = self.body(tokens, deterministic, sites)
        return self.dino_head(feature), feature


class ImageDINONet(nn.Module):
    """Standard (image) DINO's student / teacher: head + body + DINO head, all trained.

    For the baselines that train on raw images (FedAvg-DINO, centralized DINO). The head
    should have `interpolate_pos=True` so that local crops smaller than `image_size` fit.
    Parameters `{"head", "body", "dino_head"}`: the distillation step treats them as
    `DINONet`'s, with the head trained, decayed and averaged like the body.
    """
    head: ViTHead
    body: ViTBody
    dino_head: DINOHead

    def __call__(self, images: jax.Array,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """images `[B, h, w, C]` -> (logits `[B, out_dim]`, class feature `[B, D]`).

        `deterministic` as `DINONet`'s.
        """
        feature, _ = self.body(self.head(images), deterministic)
        return self.dino_head(feature), feature


# What the linear probe reads of a frozen body (`ViTClassifier.probe_features`), after DINO's
# `eval_linear.py`: "cls", the final class token (what k-NN reads); "last4", the class tokens
# of the last 4 blocks through the final norm, concatenated (DINO's rule for ViT-S and
# smaller); "cls_avgpool", the final class token and the mean of the final patch tokens
# (DINO's rule for ViT-B); "dino": DINO's rule by the body's width (`linear_probe_features`).
LINEAR_FEATURES = ("dino", "cls", "last4", "cls_avgpool")


def linear_probe_features(kind: str, body: "ViTBody") -> str:
    """`kind` of `LINEAR_FEATURES`, with "dino" resolved by body size: "cls_avgpool" from
    ViT-B's width (768) up, "last4" below it (all blocks of a body of fewer than 4)."""
    if kind not in LINEAR_FEATURES:
        raise SMSDError(f"linear features {kind!r}: use one of {LINEAR_FEATURES} "
                        "(config.downstream.linear_features)")
    if kind != "dino":
        return kind
    return "cls_avgpool" if body.dim >= 768 else "last4"


class ViTClassifier(nn.Module):
    """A site's full model for its task: own head + trained body + classification tail.

    It takes images in [0, 1] and normalises them as the sites did before their head,
    `(x - mean) / std` (`config.data.mean`, `config.data.std`). `linear_features`: what the
    linear probe reads (`LINEAR_FEATURES`; `probe_features`).
    """
    head: ViTHead
    body: ViTBody
    num_classes: int
    mean: float = 0.0
    std: float = 1.0
    linear_features: str = "cls"

    def setup(self):
        self.tail = nn.Dense(self.num_classes)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[B, H, W, C]` -> logits `[B, num_classes]` (float32)."""
        return self.tail(self.features(images))

    def _tokens(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.body(self.head((images - self.mean) / self.std))

    def features(self, images: jax.Array) -> jax.Array:
        """images `[B, H, W, C]` -> class features `[B, D]` (the tail's input; k-NN's)."""
        feature, _ = self._tokens(images)
        return feature.astype(jnp.float32)

    def probe_features(self, images: jax.Array) -> dict[str, jax.Array]:
        """images `[B, H, W, C]` -> {"knn": the class feature `[B, D]`, "linear": the linear
        probe's features (`linear_features`, resolved by `linear_probe_features`)}."""
        kind = linear_probe_features(self.linear_features, self.body)
        n = min(4, self.body.depth) if kind == "last4" else 1
        cls, tokens, last = self.body(self.head((images - self.mean) / self.std), last_blocks=n)
        linear = {"cls": lambda: cls,
                  "last4": lambda: jnp.concatenate(list(last[:, :, 0]), axis=-1),
                  "cls_avgpool": lambda: jnp.concatenate([cls, tokens.mean(1)], axis=-1)}[kind]()
        return {"knn": cls.astype(jnp.float32), "linear": linear.astype(jnp.float32)}

    def token_features(self, images: jax.Array) -> jax.Array:
        """images `[B, H, W, C]` -> token features `[B, N, D]` of all N patches in grid order
        (the body is order-equivariant: the site's own order comes back); for dense tails."""
        _, tokens = self._tokens(images)
        return tokens.astype(jnp.float32)


def token_width(config) -> int:
    """The width of the tokens a site sends: `config.model.head_dim`, or the body's width
    (`config.model.size`'s) when it is 0."""
    return config.model.head_dim or preset(config.model.size)["dim"]


def head_from_config(config) -> ViTHead:
    """The consortium's head for `config.data` images and `config.model`, making tokens of
    width `token_width(config)`; `config.model.blank_range` is in [0, 1] pixels, the head's
    in normalised ones (divided by `config.data.std`)."""
    return ViTHead(image_size=config.data.image_size, patch_size=config.model.patch_size,
                   dim=token_width(config), pos_std=config.model.pos_std,
                   constant_patches=config.model.constant_patches,
                   blank_range=config.model.blank_range / config.data.std)


def body_from_config(config) -> ViTBody:
    """The body of `config.model`, computing in `config.model.dtype`; no stochastic depth
    (the body as sites and exports use it; the server's student gets its rate from
    `dino_net_from_config`). A `model.head_dim` > 0 gives it a stem from that width, even
    one equal to the body's."""
    return ViTBody(**preset(config.model.size), dtype=jnp.dtype(config.model.dtype),
                   attention=config.model.attention or None, token_dim=config.model.head_dim,
                   weight_init=config.model.init)


def dino_head_from_config(config) -> DINOHead:
    """The DINO projection head of `config.server`, computing in `config.model.dtype`."""
    s = config.server
    return DINOHead(out_dim=s.out_dim, hidden_dim=s.hidden_dim, bottleneck_dim=s.bottleneck_dim,
                    norm_last_layer=s.norm_last_layer, dtype=jnp.dtype(config.model.dtype))


def _training_body(config) -> ViTBody:
    """`body_from_config` with the stochastic depth rate `config.server.drop_path` (0 if
    unset); it acts only in the student's `deterministic=False` forward."""
    return body_from_config(config).clone(drop_path=float(config.server.get("drop_path", 0.0)))


def dino_net_from_config(config) -> DINONet:
    """Student / teacher network of `config.server`: body (with `server.drop_path`) + DINO
    head."""
    return DINONet(body=_training_body(config), dino_head=dino_head_from_config(config))


def image_dino_net_from_config(config) -> ImageDINONet:
    """Image DINO's student / teacher: the config's head (accepting any crop size), body and
    DINO head, the same sizes as SMSD's so that the methods compare like for like."""
    head = head_from_config(config).clone(interpolate_pos=True)
    return ImageDINONet(head=head, body=_training_body(config),
                        dino_head=dino_head_from_config(config))
