"""Attacks of an honest-but-curious server on SMSD payloads (docs/method.md, "Why a secret head").

The server holds token sets `[samples, K, D]`, where a token at grid position n is
`t = x W + o_n` for a patch `x` `[P]` (normalised pixels, `P = p*p*C`), the patch embedding
`W` `[P, D]` and the offset `o_n` = position embedding + bias `[N, D]`, possibly masked
(`K < N`) and shuffled. It also holds public images of the same kind, never a site's own.
What it knows of the head decides the attack:

- head public (it knows `W`, `o`): content lies in the `P`-dimensional row space of `W`, so
  the part of a token outside it is `o_n`'s: `projection_scores` (exact for `D > P`), and a
  Gaussian model of public patches scores every position for any `D` and inverts the patch
  (`linear_gaussian`, `gaussian_scores`, `invert_patches`);
- head secret: it trains `TokenAttacker` on public images encoded with a head of its own
  (useless if heads differ; the same head is the "head leaked" upper bound), groups tokens by
  k-means on the raw tokens or on what is left after removing the top principal directions
  (`kmeans`, `remove_top_components`), names the groups by matching their covariance spectra
  to those of public patches at each position (`spectral_labels`), and estimates the head
  itself from the groups' moments (`estimate_head`: token covariance `W^T S_n W` against the
  public patch covariance `S_n`), then attacks as if the head were public. Blank patches
  anchor positions: one exact token per blank position (`repeated_tokens`) or, when blanks
  are sent without position, one tight cluster per position of the almost blank ones
  (`near_repeats`); the anchors are named by which are blank together in public images
  (`name_by_cooccurrence`) and every token joins its nearest anchor (`anchor_groups`).
  With blanks unplaced, each sample's blank token (on one line through the origin) gives
  its background, which is subtracted first (`blank_tokens`); then every placed token is
  grouped by position as a mixture of one content distribution shifted to each position
  (`shifted_mixture`), the strongest grouping here. In the manner of FORA (CVPR 2024), a
  substitute head is fitted on public patches so that its tokens match the payload's in
  distribution, then used as if it were the head (`substitute_head`).

`assign_positions` turns per-token scores into positions using what the server knows of the
order (shuffled, sorted, or one permutation reused by a site). `assemble_images` rebuilds an
image from recovered patches and positions; `linkage_scores` scores whether two token sets come
from the same image. Everything here is a pure function (NumPy / JAX), with no I/O.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize, spatial
from scipy.sparse import csgraph

from smsd_jax.errors import SMSDError

ORDERS = ("free", "sorted", "fixed")
_CHUNK = 8192  # tokens per block when scoring: bounds the [block, r * r] intermediate


# ------------------------------------------------------------------------- the head's algebra


def head_matrices(params) -> tuple[np.ndarray, np.ndarray]:
    """A `ViTHead`'s params -> (`W` `[P, D]`, offsets `o` `[N, D]`), float64.

    The offsets fold the patch embedding's bias into the position embedding: a token at
    position n is `x @ W + o[n]`.
    """
    kernel = np.asarray(params["patch_embed"]["kernel"], np.float64)
    bias = np.asarray(params["patch_embed"]["bias"], np.float64)
    return kernel, np.asarray(params["pos_embed"], np.float64) + bias


def content_basis(kernel: np.ndarray, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of the row space of `W` `[P, D]` and of its orthogonal complement.

    Returns:
      `(basis [D, r], complement [D, D - r])`, r = rank of `W` (<= min(P, D)). The complement
      is empty when `D <= P` and `W` has full rank: then content can produce any token.
    """
    _, s, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=True)
    rank = int(np.sum(s > rtol * s.max()))
    return vt[:rank].T, vt[rank:].T


def projection_scores(tokens, kernel: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Head public, no prior: minus the squared distance, off the row space of `W`, between
    each token and each offset.

    Content has no component off the row space of `W`, so the true position scores 0 up to
    rounding. Uninformative (all 0) when `D <= P`.

    Args:
      tokens: `[..., D]`.
      kernel: `W` `[P, D]`; offsets: `[N, D]` (see `head_matrices`).

    Returns:
      `[..., N]` scores, higher is more likely.
    """
    _, comp = content_basis(kernel)
    v = np.asarray(tokens, np.float64) @ comp
    w = offsets @ comp
    d2 = (v * v).sum(-1)[..., None] - 2 * v @ w.T + (w * w).sum(-1)
    return -np.maximum(d2, 0.0)


class PatchPrior(NamedTuple):
    """Moments of patches at each position, from public images (normalised pixels)."""
    mean: np.ndarray   # [N, P]
    cov: np.ndarray    # [N, P, P]
    third: np.ndarray  # [N, P], E[(x - mean)^3] per pixel: the skew second moments cannot see


def fit_patch_prior(patches) -> PatchPrior:
    """patches `[S, N, P]` (S public images) -> their moments at each position."""
    patches = np.asarray(patches, np.float64)
    if patches.ndim != 3 or len(patches) < 2:
        raise SMSDError(f"patches of shape {patches.shape}: expected [images >= 2, N, P]")
    mean = patches.mean(0)
    centred = patches - mean
    return PatchPrior(mean, np.einsum("snp,snq->npq", centred, centred) / len(patches),
                      np.mean(centred ** 3, axis=0))


class LinearGaussian(NamedTuple):
    """Tokens under a public head and a Gaussian patch prior, ready for scoring and inversion.

    With `u = t @ basis` (r values in the row space of `W`) and `v = t @ complement`:
    `u | n ~ N(mean_u[n], C[n])` and `v | n ~ N(comp_offsets[n], noise_var I)`.
    """
    basis: np.ndarray         # [D, r]
    complement: np.ndarray    # [D, D - r]
    comp_offsets: np.ndarray  # [N, D - r]
    mean_u: np.ndarray        # [N, r]
    precision: np.ndarray     # [N, r, r], C[n]^-1
    log_det: np.ndarray       # [N], log det C[n]
    gain: np.ndarray          # [N, r, P], C[n]^-1 G^T S[n]: from u - mean_u to the patch
    patch_mean: np.ndarray    # [N, P]
    noise_var: float


def linear_gaussian(kernel: np.ndarray, offsets: np.ndarray, prior: PatchPrior,
                    noise_std: float = 0.0, ridge: float = 1e-2,
                    min_var: float = 1e-6) -> LinearGaussian:
    """The head-public attacker's model of a token at each position.

    A token is `x W + o_n + e` with `x ~ N(prior.mean[n], S[n])`, `S[n] = prior.cov[n] +
    ridge I` (the ridge lets patches vary where public data never did), and `e ~ N(0,
    noise_std^2 I)` (a site's token noise; `min_var` keeps the model proper without noise).

    Args:
      kernel: `W` `[P, D]`; offsets: `[N, D]` (see `head_matrices`).
      prior: from `fit_patch_prior` on public patches.
    """
    basis, comp = content_basis(kernel)
    g = kernel @ basis                                             # [P, r]
    s = prior.cov + ridge * np.eye(prior.cov.shape[-1])
    var = noise_std ** 2 + min_var
    c = g.T @ s @ g + var * np.eye(g.shape[1])
    _, log_det = np.linalg.slogdet(c)
    gain = np.linalg.solve(c, g.T @ s)
    return LinearGaussian(basis, comp, offsets @ comp, prior.mean @ g + offsets @ basis,
                          np.linalg.inv(c), log_det, gain, prior.mean, var)


def gaussian_scores(model: LinearGaussian, tokens) -> np.ndarray:
    """Log-likelihood of each token at each position (up to a constant shared by positions).

    With `D > P` and no noise the term off the row space dominates and reproduces
    `projection_scores`; with `D <= P` the patch prior alone separates positions.

    Args:
      tokens: `[..., D]`.

    Returns:
      `[..., N]` float64.
    """
    tokens = np.asarray(tokens, np.float64)
    flat = tokens.reshape(-1, tokens.shape[-1])
    n, r = model.mean_u.shape
    # (u - m)^T C^-1 (u - m) expanded, so that every position is one matmul.
    precision_mean = np.einsum("nij,nj->ni", model.precision, model.mean_u)
    const = np.einsum("ni,ni->n", model.mean_u, precision_mean) + model.log_det
    out = np.empty((len(flat), n))
    for start in range(0, len(flat), _CHUNK):
        block = flat[start:start + _CHUNK]
        u = block @ model.basis
        quad = (u[:, :, None] * u[:, None]).reshape(-1, r * r) @ model.precision.reshape(n, -1).T
        score = -0.5 * (quad - 2 * u @ precision_mean.T + const)
        if model.complement.shape[1]:
            v, w = block @ model.complement, model.comp_offsets
            d2 = (v * v).sum(-1)[:, None] - 2 * v @ w.T + (w * w).sum(-1)
            score -= 0.5 * np.maximum(d2, 0.0) / model.noise_var
        out[start:start + len(block)] = score
    return out.reshape(*tokens.shape[:-1], -1)


def invert_patches(model: LinearGaussian, tokens, positions) -> np.ndarray:
    """Posterior mean of each token's patch at a given position (normalised pixels).

    With `D >= P`, a full-rank `W` and no noise this is `(t - o_n) W^+`, the pseudo-inverse:
    the patch exactly. With `D < P` it is the best linear estimate under the public prior.

    Args:
      tokens: `[..., D]`; positions: `[...]` ints in [0, N).

    Returns:
      `[..., P]`.
    """
    tokens = np.asarray(tokens, np.float64)
    positions = np.asarray(positions)
    u = tokens @ model.basis
    out = np.empty(positions.shape + (model.patch_mean.shape[1],))
    for n in np.unique(positions):
        at = positions == n
        out[at] = model.patch_mean[n] + (u[at] - model.mean_u[n]) @ model.gain[n]
    return out


# ----------------------------------------------------------------- from scores to positions


def _shifted_logcumsumexp(a: np.ndarray) -> np.ndarray:
    """`out[..., i] = log sum exp(a[..., :i])` (so `-inf` at i = 0)."""
    c = np.logaddexp.accumulate(a, axis=-1)
    return np.concatenate([np.full(a.shape[:-1] + (1,), -np.inf), c[..., :-1]], axis=-1)


def _sorted_marginals(scores: np.ndarray) -> np.ndarray:
    """Log posterior marginals (unnormalised) of slot j -> position n, over increasing position
    sequences with a uniform prior over kept subsets: forward-backward, `[S, K, N]`."""
    k = scores.shape[1]
    alpha, beta = np.empty_like(scores), np.zeros_like(scores)
    alpha[:, 0] = scores[:, 0]
    for j in range(1, k):
        alpha[:, j] = scores[:, j] + _shifted_logcumsumexp(alpha[:, j - 1])
    for j in range(k - 2, -1, -1):
        later = scores[:, j + 1] + beta[:, j + 1]
        beta[:, j] = _shifted_logcumsumexp(later[:, ::-1])[:, ::-1]
    return alpha + beta


def assign_positions(scores, order: str) -> np.ndarray:
    """Positions of each sample's tokens from per-token scores and what the server knows of order.

    Args:
      scores: `[S, K, N]` log-likelihoods (higher = more likely); all zeros uses the order
        alone.
      order: "free": tokens are shuffled, each sample's K tokens hold distinct positions (the
        most likely one-to-one matching, per sample); "sorted": tokens keep grid order (masking
        without permutation: for each token the position of largest posterior marginal over
        increasing sequences); "fixed": one mask and permutation for every sample (a reused
        permutation: one matching of slots to positions from the scores summed over samples).

    Returns:
      `[S, K]` int64 positions.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 3 or scores.shape[1] > scores.shape[2]:
        raise SMSDError(f"scores of shape {scores.shape}: expected [samples, K, N], K <= N")
    if order == "sorted":
        return _sorted_marginals(scores).argmax(-1)
    if order == "fixed":
        _, cols = optimize.linear_sum_assignment(scores.sum(0), maximize=True)
        return np.broadcast_to(cols, scores.shape[:2]).copy()
    if order == "free":
        return np.stack([optimize.linear_sum_assignment(s, maximize=True)[1] for s in scores])
    raise SMSDError(f"order={order!r} is unknown; use one of {ORDERS}")


# ------------------------------------------------------------------------ learned attackers


class TokenAttacker(nn.Module):
    """MLP from one token (or one patch) `[..., F]` to position logits `[..., N]` and the patch
    `[..., P]`. Per token on purpose: the set of tokens has no order to exploit."""
    num_positions: int
    patch_dim: int
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i in range(2):
            x = nn.gelu(nn.Dense(self.hidden, name=f"hidden{i}")(x))
        return (nn.Dense(self.num_positions, name="position")(x),
                nn.Dense(self.patch_dim, name="patch")(x))


def standardize(x) -> np.ndarray:
    """Zero mean, unit variance per feature over all leading axes: `[..., F]` -> `[..., F]`.

    Each collection is standardised by its own statistics, which the server can compute on a
    payload without knowing the head.
    """
    x = np.asarray(x, np.float32)
    axes = tuple(range(x.ndim - 1))
    return (x - x.mean(axes)) / (x.std(axes) + 1e-6)


@functools.partial(jax.jit, static_argnames=("num_positions", "hidden", "steps", "batch_size",
                                             "lr"))
def train_attacker(key: jax.Array, inputs: jax.Array, positions: jax.Array, patches: jax.Array,
                   *, num_positions: int, hidden: int = 256, steps: int = 1000,
                   batch_size: int = 512, lr: float = 1e-3) -> tuple[dict, jax.Array]:
    """Fits a `TokenAttacker` (cross-entropy on positions + MSE on patches, Adam, cosine lr).

    Args:
      inputs: `[T, F]` standardised tokens (or patches); positions: `[T]` ints;
      patches: `[T, P]` normalised pixels, the decoder's target.

    Returns:
      `(params, losses [steps])`.
    """
    module = TokenAttacker(num_positions, patches.shape[-1], hidden)
    init_key, key = jax.random.split(key)
    params = module.init(init_key, inputs[:1])["params"]
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

    def loss_fn(params, x, pos, patch):
        logits, pred = module.apply({"params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, pos).mean()
        return ce + jnp.mean((pred - patch) ** 2)

    def step(carry, k):
        params, opt_state = carry
        idx = jax.random.randint(k, (batch_size,), 0, inputs.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs[idx], positions[idx],
                                                  patches[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       jax.random.split(key, steps))
    return params, losses


@jax.jit
def attacker_predict(params: dict, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """inputs `[..., F]` -> (position log-probabilities `[..., N]`, patches `[..., P]`)."""
    module = TokenAttacker(params["position"]["kernel"].shape[1],
                           params["patch"]["kernel"].shape[1], params["hidden0"]["kernel"].shape[1])
    logits, patches = module.apply({"params": params}, inputs)
    return jax.nn.log_softmax(logits), patches


# -------------------------------------------------------------- head-agnostic grouping


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(key: jax.Array, x: jax.Array, *, k: int, iters: int = 30) -> jax.Array:
    """k-means (k-means++ seeding, then `iters` Lloyd steps): x `[T, F]` -> groups `[T]` int32."""
    x = x.astype(jnp.float32)
    sq = (x * x).sum(-1)

    def dist2(c):
        return sq[:, None] - 2 * x @ c.T + (c * c).sum(-1)[None]

    first_key, key = jax.random.split(key)
    first = x[jax.random.randint(first_key, (), 0, x.shape[0])]
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)

    def seed(i, carry):
        centres, d, key = carry
        key, sub = jax.random.split(key)
        pick = x[jax.random.categorical(sub, jnp.log(jnp.maximum(d, 1e-30)))]
        return centres.at[i].set(pick), jnp.minimum(d, ((x - pick) ** 2).sum(-1)), key

    centres, _, _ = jax.lax.fori_loop(1, k, seed, (centres, ((x - first) ** 2).sum(-1), key))

    def lloyd(_, centres):
        groups = jnp.argmin(dist2(centres), axis=-1)
        sums = jax.ops.segment_sum(x, groups, k)
        counts = jax.ops.segment_sum(jnp.ones_like(sq), groups, k)[:, None]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centres)  # empty: stays

    centres = jax.lax.fori_loop(0, iters, lloyd, centres)
    return jnp.argmin(dist2(centres), axis=-1).astype(jnp.int32)


def remove_top_components(tokens, num: int) -> np.ndarray:
    """tokens `[T, D]` -> coordinates `[T, D - num]` off their top `num` principal directions.

    With a secret head, content spans at most P directions; projecting out the top P principal
    directions (estimated from the payload itself) leaves mostly the position embedding.
    """
    tokens = np.asarray(tokens, np.float64)
    if not 0 <= num < tokens.shape[1]:
        raise SMSDError(f"cannot remove {num} of {tokens.shape[1]} directions: nothing would "
                        "be left; this attack needs D > values per patch")
    centred = tokens - tokens.mean(0)
    return centred @ remove_top_basis(centred, num)


class GroupMoments(NamedTuple):
    """Mean and covariance of each group of tokens (groups of at least 2 tokens)."""
    ids: np.ndarray    # [G'] group ids
    means: np.ndarray  # [G', D]
    covs: np.ndarray   # [G', D, D], the protocol's token noise removed


def _members(groups: np.ndarray) -> list[np.ndarray]:
    """groups `[T]` ids in [0, G) -> the token indices of each group, one array per id."""
    order = np.argsort(groups, kind="stable")
    return np.split(order, np.cumsum(np.bincount(groups))[:-1])


def group_moments(tokens, groups, noise_std: float = 0.0) -> GroupMoments:
    """Moments of each group of tokens: tokens `[T, D]`, groups `[T]` ids in [0, G)."""
    tokens, groups = np.asarray(tokens, np.float64), np.asarray(groups)
    members = [(g, tokens[idx]) for g, idx in enumerate(_members(groups)) if len(idx) > 1]
    means = np.stack([x.mean(0) for _, x in members])
    covs = np.stack([(x - mu).T @ (x - mu) / len(x) for (_, x), mu in zip(members, means)])
    return GroupMoments(np.asarray([g for g, _ in members]), means,
                        covs - noise_std ** 2 * np.eye(tokens.shape[1]))


def spectral_labels(moments: GroupMoments, num_groups: int, prior: PatchPrior,
                    num_eig: int = 8) -> np.ndarray:
    """Names groups of tokens (one position each, ideally) without the head.

    A group at position n has token covariance `W^T S_n W`. For a random `W` with `D >= P`,
    `W W^T` is close to a multiple of the identity, so its eigenvalues are those of the
    public patch covariance `S_n` times an unknown scale. Groups are matched one-to-one to
    positions by their log spectra (the scale from the total variance of all groups).

    Args:
      moments: `group_moments` of the groups; num_groups: G, the number of group ids.
      prior: public patch statistics.

    Returns:
      `[G]` the position of each group (-1 for groups left unmatched or too small); a token's
      position is `labels[groups]`.
    """
    r = min(num_eig, moments.covs.shape[1], prior.mean.shape[1])
    spectra = np.maximum(np.linalg.eigvalsh(moments.covs)[:, ::-1][:, :r], 0.0)
    public = np.linalg.eigvalsh(prior.cov)[:, ::-1][:, :r]
    scale = spectra.sum(1).mean() / public.sum(1).mean()
    floor = 1e-3 * public[:, 0].mean()
    f_group, f_public = np.log(spectra / scale + floor), np.log(public + floor)
    rows, cols = optimize.linear_sum_assignment(((f_group[:, None] - f_public[None]) ** 2).sum(-1))
    labels = np.full(num_groups, -1)
    labels[moments.ids[rows]] = cols
    return labels


@functools.partial(jax.jit, static_argnames=("steps", "lr"))
def fit_kernel(init: jax.Array, token_covs: jax.Array, patch_covs: jax.Array, *,
               steps: int = 1000, lr: float = 3e-2) -> tuple[jax.Array, jax.Array]:
    """Head secret: the `W` whose `W^T S_g W` best matches each group's token covariance.

    Args:
      init: `[P, D]` starting point.
      token_covs: `[G, D, D]` covariance of each group's tokens (noise removed).
      patch_covs: `[G, P, P]` public patch covariance at each group's position.

    Returns:
      `(W [P, D], final mean squared error relative to the mean squared token covariance)`,
      by Adam with a cosine learning rate. Second moments cannot tell `W` from `-W`.
    """
    scale = jnp.sqrt(jnp.mean(token_covs ** 2))
    target = token_covs / scale

    def loss(w):
        return jnp.mean((jnp.einsum("pd,gpq,qe->gde", w, patch_covs, w) - target) ** 2)

    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

    def step(carry, _):
        w, opt_state = carry
        value, grad = jax.value_and_grad(loss)(w)
        updates, opt_state = tx.update(grad, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state), value

    w0 = init / jnp.sqrt(scale)
    (w, _), losses = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps)
    return w * jnp.sqrt(scale), losses[-1]


def match_cost(kernel, token_covs, patch_covs) -> np.ndarray:
    """`||C_g - W^T S_n W||_F^2` for every group g and position n: `[G, N]`.

    Args:
      kernel: `W` `[P, D]`; token_covs: `[G, D, D]`; patch_covs: `[N, P, P]`.
    """
    w = np.asarray(kernel, np.float64)
    model = w.T @ patch_covs @ w
    seen = w @ token_covs @ w.T  # W C_g W^T, for the cross term
    return ((token_covs ** 2).sum((1, 2))[:, None] - 2 * np.einsum("gpq,npq->gn", seen, patch_covs)
            + (model ** 2).sum((1, 2))[None])


def estimate_head(key: jax.Array, tokens, groups, moments: GroupMoments, labels,
                  prior: PatchPrior, *, steps: int = 1000, refine_steps: int = 200,
                  rounds: int = 3, lr: float = 3e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head secret: estimates the head from the payload's own moments and public patches.

    Tokens grouped by position (exactly when the server knows positions: grid order, or the
    slots of a reused permutation) and the groups named (`labels`) give, per position, the
    token covariance `W^T S_n W` and mean `mu_n W + o_n`. `fit_kernel` finds `W`; with
    `rounds > 0` the groups are renamed by `match_cost` and `W` refitted, alternately. The
    sign of `W` is the one under which recovered patches skew like public ones; the offsets
    are `mean_g - mu_n W`. Feed the result to `linear_gaussian` as if the head were public.

    Args:
      key: draws the starting `W`.
      tokens: `[T, D]`; groups: `[T]` ids in [0, G); moments: their `group_moments`;
      labels: `[G]` starting positions of the groups (-1: unnamed, left out).

    Returns:
      `(W [P, D], offsets [N, D], labels [G])`. Positions no group is named after get offsets
      far from every token, so no token is ever placed there.
    """
    tokens, labels = np.asarray(tokens, np.float64), np.asarray(labels)
    named = labels[moments.ids] >= 0
    ids, means, covs = moments.ids[named], moments.means[named], moments.covs[named]
    names = labels[ids]
    w, _ = fit_kernel(0.1 * jax.random.normal(key, prior.mean.shape[1:] + tokens.shape[1:]),
                      covs, prior.cov[names], steps=steps, lr=lr)
    for _ in range(rounds):
        _, names = optimize.linear_sum_assignment(match_cost(w, covs, prior.cov))
        w, _ = fit_kernel(w, covs, prior.cov[names], steps=refine_steps, lr=lr / 3)
    w = np.asarray(w, np.float64)
    unmix, members = np.linalg.pinv(w), _members(np.asarray(groups))
    third = np.stack([np.mean(((tokens[members[g]] - m) @ unmix) ** 3, axis=0)
                      for g, m in zip(ids, means)])
    if np.sum(third * prior.third[names]) < 0:
        w = -w
    offsets = np.full((len(prior.mean), tokens.shape[1]), 1e6 * (np.abs(tokens).max() + 1.0))
    offsets[names] = means - prior.mean[names] @ w
    out = np.full(len(labels), -1)
    out[ids] = names
    return w, offsets, out


def slot_consistency(sent) -> float:
    """Share of the payload's token variance explained by the slot index, `[S, K, D]` -> float.

    About `K / S` for fresh permutations (slots are exchangeable); large when a site reuses one
    permutation (each slot then always holds the same position). The server can compute it.
    """
    sent = np.asarray(sent, np.float64)
    total = sent.var(axis=(0, 1)).sum()
    return float(sent.mean(0).var(0).sum() / total)


# ---------------------------------------------------------------- images and linkage


def unpatchify(patches, patch_size: int, channels: int) -> np.ndarray:
    """`[B, N, p*p*C]` -> `[B, H, W, C]`, the inverse of `models.patchify` (square grid)."""
    patches = np.asarray(patches)
    b, n, _ = patches.shape
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise SMSDError(f"{n} patches do not form a square grid")
    x = patches.reshape(b, side, side, patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, side * patch_size, side * patch_size,
                                                 channels)


def assemble_images(patches, positions, fill, patch_size: int, channels: int) -> np.ndarray:
    """Places recovered patches at recovered positions; other positions get `fill`.

    Args:
      patches: `[S, K, P]`; positions: `[S, K]` ints in [0, N) (a repeated position keeps the
        last patch; -1 drops the patch); fill: `[N, P]`, e.g. the public mean patch.

    Returns:
      `[S, H, W, C]` in the patches' units.
    """
    patches, positions = np.asarray(patches), np.asarray(positions)
    grid = np.repeat(np.asarray(fill, patches.dtype)[None], len(patches), axis=0)
    rows, slots = np.nonzero(positions >= 0)
    grid[rows, positions[rows, slots]] = patches[rows, slots]
    return unpatchify(grid, patch_size, channels)


@jax.jit
def linkage_scores(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
    """How alike two token sets are, per pair: a, b `[S, K, D]` -> `{name: [S]}`, higher = alike.

    "mean_token": minus the distance between the sets' mean tokens; "chamfer": minus the mean
    distance from each token to its nearest token in the other set (both ways). Both ignore
    order, so they work on shuffled, masked sets and need no head.
    """
    d2 = ((a * a).sum(-1)[:, :, None] - 2 * jnp.einsum("skd,sld->skl", a, b)
          + (b * b).sum(-1)[:, None])
    d = jnp.sqrt(jnp.maximum(d2, 0.0))  # [S, K, K]
    chamfer = 0.5 * (d.min(2).mean(1) + d.min(1).mean(1))
    return {"mean_token": -jnp.linalg.norm(a.mean(1) - b.mean(1), axis=-1), "chamfer": -chamfer}


# ------------------------------------------------------- blank-patch anchors (head secret)


def repeated_tokens(tokens, max_groups: int, min_count: int = 3) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """The payload's exact repeats: tokens `[T, D]` -> (values `[G, D]`, groups `[T]`).

    A patch whose pixels are all one value (blank background) gives the same token at the
    same position in every image: `x W + o_n` with `x` fixed, so one exact value per blank
    position, repeated across images whatever the head and its width. Returns the `G <=
    max_groups` values repeated most (at least `min_count` times), most frequent first, and
    each token's group (-1: not one of them).
    """
    tokens = np.ascontiguousarray(np.asarray(tokens))
    rows = tokens.view(np.dtype((np.void, tokens.dtype.itemsize * tokens.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(rows, return_index=True, return_inverse=True,
                                          return_counts=True)
    top = [g for g in np.argsort(-counts, kind="stable")[:max_groups] if counts[g] >= min_count]
    groups = np.full(len(tokens), -1)
    for rank, g in enumerate(top):
        groups[inverse.ravel() == g] = rank
    return tokens[first[top]].astype(np.float64), groups


def blank_patches(patches) -> np.ndarray:
    """Public patches `[S, N, P]` -> `[S, N]` bool: the patch is the data's most common constant
    patch (blank background), the one that `repeated_tokens` finds in a payload."""
    patches = np.asarray(patches)
    constant = patches.max(-1) == patches.min(-1)
    values, counts = np.unique(patches[..., 0][constant], return_counts=True)
    if not len(values):
        return np.zeros(patches.shape[:2], bool)
    return constant & (patches[..., 0] == values[counts.argmax()])


def near_repeats(tokens, samples, max_groups: int, radius: float = 0.05,
                 min_count: int = 3, max_links: int = 20_000_000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Near-blank anchors: tokens `[T, D]` of samples `[T]` -> (centres `[G, D]`, groups `[T]`).

    A patch that is almost blank (a few pixels off the background) gives `x W + o_n` with `x`
    close to the blank patch, so almost the same token at the same position in every image,
    even when exactly blank patches are sent without position: one tight cluster per position.
    Tokens with at least `min_count` others within `radius` (times the tokens' median distance
    from their mean) are linked when that close; each connected group that never holds two
    tokens of one sample (a position appears once per sample; unplaced blanks repeat within a
    sample) and holds at least `min_count` tokens is a group, largest first, at most
    `max_groups`; -1 for every other token. Exact repeats are handled once each (a blank
    value sent thousands of times is one point), so memory follows the distinct tokens; when
    positions barely move the tokens (a small position embedding), far more than `max_links`
    pairs are that close, and the radius is halved until they are not (tight clusters are
    what this looks for).
    """
    tokens, samples = np.asarray(tokens, np.float64), np.asarray(samples)
    values, which, counts = np.unique(tokens, axis=0, return_inverse=True, return_counts=True)
    which = which.ravel()
    scale = radius * np.median(np.linalg.norm(tokens - tokens.mean(0), axis=-1))
    tree = spatial.cKDTree(values)
    while tree.query_ball_point(values, scale, return_length=True).sum() > max_links:
        scale /= 2
    near = tree.sparse_distance_matrix(tree, scale, output_type="coo_matrix")
    near.data[:] = 1.0  # linked; the diagonal's zero distances are stored too
    dense = (near @ counts) - 1 >= min_count  # tokens within `scale`, itself left out
    link = near.tocsr()[dense][:, dense]
    _, component = csgraph.connected_components(link, directed=False)
    labels = np.full(len(values), -1)
    labels[dense] = component
    token_label = labels[which]
    sizes = np.bincount(token_label[token_label >= 0], minlength=component.max(initial=-1) + 1)
    groups, centres = np.full(len(tokens), -1), []
    for c in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(token_label == c)
        if len(centres) == max_groups or len(members) < min_count:
            break
        if len(np.unique(samples[members])) < len(members):  # twice in a sample: no position
            continue
        groups[members] = len(centres)
        centres.append(tokens[members].mean(0))
    return np.reshape(centres, (-1, tokens.shape[1])), groups


def presence(groups, samples, num_samples: int, num_groups: int) -> np.ndarray:
    """Tokens' groups `[T]` (-1: none) and samples `[T]` -> `[num_samples, num_groups]` bool:
    group g among sample s's tokens (what `name_by_cooccurrence` reads)."""
    groups, samples = np.asarray(groups), np.asarray(samples)
    present = np.zeros((num_samples, num_groups), bool)
    present[samples[groups >= 0], groups[groups >= 0]] = True
    return present


def name_by_cooccurrence(present, public_blank, kept: int, seed: int = 0,
                         restarts: int = 8) -> np.ndarray:
    """Names groups of repeated tokens (one blank position each) from which groups appear
    together in a sample, against which positions are blank together in public images.

    Masking keeps each position with probability `K/N` and each pair with `K(K-1)/(N(N-1))`,
    whatever the content, so the payload's rates of each group and each pair, divided by those,
    estimate the public rates of blank at each position and pair. Neighbouring positions are
    blank together far more often than distant ones, so matching the two weighted graphs
    (`scipy.optimize.quadratic_assignment`, FAQ, best of `restarts`) names the groups.

    Args:
      present: `[S, G]` bool, group g among sample s's tokens.
      public_blank: `[n, N]` bool (`blank_patches`); kept: K, the tokens per sample.

    Returns:
      `[G]` the position of each group.
    """
    present, public = np.asarray(present, np.float64), np.asarray(public_blank, np.float64)
    g, n = present.shape[1], public.shape[1]
    if g > n:
        raise SMSDError(f"{g} groups for {n} positions: give at most one group per position")
    pair, single = kept * (kept - 1) / (n * (n - 1)), kept / n
    ours = present.T @ present / len(present) / pair
    np.fill_diagonal(ours, present.mean(0) / single)
    theirs = public.T @ public / len(public)
    a = np.zeros((n, n))
    a[:g, :g] = ours
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        found = optimize.quadratic_assignment(a, theirs, options=dict(maximize=True, rng=rng,
                                                                       P0="randomized"))
        if best is None or found.fun > best.fun:
            best = found
    return best.col_ind[:g]


def _nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = (x * x).sum(-1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(-1)
    return d2.argmin(-1), d2


def anchor_groups(tokens, anchors, content_dim: int, extra: int = 0,
                  rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Groups every token with a blank-patch anchor, without the head.

    A token at position n is `a_n + (x - x_blank) W`: its anchor plus content, and content
    spans at most `content_dim` (P) directions. With `D > P`, tokens are grouped with the
    nearest anchor off the top P principal directions of the tokens, then the content
    directions are re-estimated from the residuals `t - a_group` and the tokens regrouped,
    `rounds` times; exact once the content directions are. With `D <= P`, content fills
    every direction and the nearest anchor is all there is. `extra` more groups, for
    positions never blank, start at the token farthest from every centre so far, one after
    the other, and move as k-means centres (the anchors stay).

    Args:
      tokens: `[T, D]`; anchors: `[G, D]` (`repeated_tokens`); content_dim: P.

    Returns:
      `(groups [T] in [0, G + extra), distances [T, G + extra])`: squared distances to each
      group's centre, off the content directions when `D > P`.
    """
    tokens = np.asarray(tokens, np.float64)
    centres = np.asarray(anchors, np.float64)
    d, g = tokens.shape[1], len(centres)
    if d > content_dim:
        basis = remove_top_basis(tokens - tokens.mean(0), content_dim)
    else:
        basis, rounds = np.eye(d), 1
    for r in range(rounds):
        x = tokens @ basis
        if r == 0:  # farthest-point seeds: one per position that has no anchor, ideally
            for _ in range(extra):
                _, d2 = _nearest(x, centres @ basis)
                centres = np.concatenate([centres, tokens[d2.min(-1).argmax()][None]])
        for _ in range(5 if extra else 1):
            groups, d2 = _nearest(x, centres @ basis)
            for j in range(g, len(centres)):
                if np.any(groups == j):
                    centres[j] = tokens[groups == j].mean(0)
        if r + 1 < rounds:
            basis = remove_top_basis(tokens - centres[groups], content_dim)
    return groups, d2


def remove_top_basis(x, num: int) -> np.ndarray:
    """An orthonormal basis `[D, D - num]` of the directions left after the top `num`
    principal directions of `x` `[T, D]` (uncentred: pass centred data or residuals)."""
    x = np.asarray(x, np.float64)
    _, vectors = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vectors[:, :x.shape[1] - num]


# ---------------------------------------------- the payload's structure (head secret, linear)


def blank_tokens(tokens, samples, num_samples: int,
                 rtol: float = 2e-3) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's blank token: tokens `[T, D]` of samples `[T]` -> (`[num_samples, D]`,
    `[T]` bool: the token lies on the blank line, so it was sent without a position).

    With blank patches unplaced, a blank patch of background level `b` is `(b 1) W`: every
    sample's blank token lies on one line through the origin (the head has no bias), at the
    sample's own background (the contrast augmentation moves it). The line is the direction
    of the payload's most common token (the black background's); a sample's blank token is
    its darkest token on that line (within `rtol` of the token's norm: float16's rounding;
    a uniform patch inside the object lies on it too, brighter), and the most common token
    for a sample that kept no blank patch. Subtracting it from the sample's tokens leaves
    `(x - b 1) W + o_n`: the contrast undone, the background gone.
    """
    tokens, samples = np.asarray(tokens, np.float64), np.asarray(samples)
    values, counts = np.unique(tokens, axis=0, return_counts=True)
    modal = values[counts.argmax()]
    line = modal / np.linalg.norm(modal)
    along = tokens @ line
    off = np.linalg.norm(tokens - along[:, None] * line, axis=-1)
    on_line = off <= rtol * np.linalg.norm(tokens, axis=-1)
    out = np.broadcast_to(modal, (num_samples, tokens.shape[1])).copy()
    # A uniform patch inside the object lies on the line too, brighter than the background:
    # the darkest of a sample's tokens on the line (the farthest out along the modal one's
    # direction, which is the black background's) is its background.
    found = np.flatnonzero(on_line)
    darkest = np.full(num_samples, -np.inf)
    np.maximum.at(darkest, samples[found], along[found])
    found = found[along[found] == darkest[samples[found]]]
    out[samples[found]] = tokens[found]
    return out, on_line


def shifted_mixture(tokens, anchors, num_groups: int, iters: int = 10,
                    ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Groups every token by position, without the head: a token at position n is
    `o_n + c` with content `c = (x - b 1) W` drawn from one distribution at every position,
    so the tokens are a mixture of one shape shifted to `num_groups` places. Fitted by
    classification EM with one shared Gaussian for the content: each token joins the shift
    it is most likely under (Mahalanobis distance with the content's covariance, far
    sharper than the nearest shift because content varies along few directions), the
    content's mean and covariance are re-estimated, then the shifts that no anchor fixes.

    Args:
      tokens: `[T, D]` placed tokens, background removed (`blank_tokens`).
      anchors: `[G, D]` shifts known from almost blank tokens (`near_repeats`' centres,
        content almost 0), G <= num_groups; they stay. The other shifts start at the
        nearest-anchor grouping's extra groups (`anchor_groups`).

    Returns:
      `(groups [T], distances [T, num_groups])`: squared Mahalanobis distances.
    """
    tokens = np.asarray(tokens, np.float64)
    anchors = np.asarray(anchors, np.float64)
    fixed = len(anchors)
    if fixed > num_groups:
        raise SMSDError(f"{fixed} anchors for {num_groups} groups: give at most one anchor "
                        "per group")
    groups, _ = anchor_groups(tokens, anchors, tokens.shape[1], extra=num_groups - fixed)
    shifts = np.concatenate([anchors, np.zeros((num_groups - fixed, tokens.shape[1]))])
    for j in range(fixed, num_groups):
        members = tokens[groups == j]
        shifts[j] = members.mean(0) if len(members) else tokens.mean(0)
    for _ in range(iters):
        content = tokens - shifts[groups]
        mean = content.mean(0)
        cov = np.cov(content.T) + ridge * np.eye(tokens.shape[1])
        root = np.linalg.cholesky(np.linalg.inv(cov))  # whitening: |(t - s) L|^2
        white, centres = tokens @ root, (shifts + mean) @ root
        _, d2 = _nearest(white, centres)
        groups = d2.argmin(-1)
        for j in range(fixed, num_groups):
            if np.any(groups == j):
                shifts[j] = tokens[groups == j].mean(0) - mean
    return groups, d2


# ------------------------------------------ a substitute head (FORA-style learned inversion)


def _sliced_w2(key: jax.Array, a: jax.Array, b: jax.Array, directions: int) -> jax.Array:
    """Sliced Wasserstein-2 distance between two equal-sized point sets `[B, D]`: the mean
    squared gap between their sorted projections on `directions` random unit vectors."""
    dirs = jax.random.normal(key, (a.shape[1], directions))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0)
    return jnp.mean((jnp.sort(a @ dirs, axis=0) - jnp.sort(b @ dirs, axis=0)) ** 2)


@functools.partial(jax.jit, static_argnames=("num_positions", "steps", "batch", "directions",
                                             "lr"))
def _fit_substitute(key: jax.Array, tokens: jax.Array, patches: jax.Array,
                    positions: jax.Array, noise_std: float, *, num_positions: int, steps: int,
                    batch: int, directions: int, lr: float) -> tuple[tuple, jax.Array]:
    """One start of `substitute_head`: `((W [P, D], offsets [N, D]), final loss)`, Adam with
    a cosine learning rate; the loss at the end is measured on a fresh draw of 8 batches."""
    dim, pdim = tokens.shape[1], patches.shape[1]
    k_w, k_o, k_fit, k_end = jax.random.split(key, 4)
    spread = jnp.sqrt(jnp.mean(jnp.sum((tokens - tokens.mean(0)) ** 2, -1)))
    w = spread * jax.random.normal(k_w, (pdim, dim)) / jnp.sqrt(
        jnp.sum(jnp.mean(patches ** 2, 0)) * dim)
    o = tokens.mean(0) + 0.5 * spread / jnp.sqrt(dim) * jax.random.normal(
        k_o, (num_positions, dim))
    tx = optax.adam(optax.cosine_decay_schedule(lr * spread, steps))

    def loss(params, k):
        k_t, k_p, k_e, k_d = jax.random.split(k, 4)
        t = tokens[jax.random.randint(k_t, (batch,), 0, tokens.shape[0])]
        j = jax.random.randint(k_p, (batch,), 0, patches.shape[0])
        fake = patches[j] @ params[0] + params[1][positions[j]]
        return _sliced_w2(k_d, t, fake + noise_std * jax.random.normal(k_e, fake.shape),
                          directions)

    def step(carry, k):
        params, opt_state = carry
        grad = jax.grad(loss)(params, k)
        updates, opt_state = tx.update(grad, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, ((w, o), tx.init((w, o))), jax.random.split(k_fit, steps))
    end = jax.vmap(lambda k: loss(params, k))(jax.random.split(k_end, 8)).mean()
    return params, end / spread ** 2


def substitute_head(key: jax.Array, tokens, patches, positions, num_positions: int,
                    noise_std: float = 0.0, *, restarts: int = 2, steps: int = 1000,
                    batch: int = 1024,
                    directions: int = 64, lr: float = 3e-3) -> tuple[np.ndarray, np.ndarray,
                                                                     float]:
    """Head secret, in the manner of FORA (CVPR 2024): a substitute head learned on public
    data so that its tokens look like the payload's, then inverted as if it were public.

    The substitute is a linear head `t = x W' + o'_n` (the sites' own form, which the code
    says); it is fitted so that the tokens of public patches at their positions match the
    payload's tokens in distribution (sliced Wasserstein, `directions` random projections a
    step; the sites' token noise, of std `noise_std`, added to the substitute's), from
    `restarts` random starts, keeping the one that matches best. Nothing ties a token to its
    position or patch: only the two clouds are compared, which is all a server holds. Feed
    the result to `linear_gaussian`: its scores group and name positions, and its posterior
    mean is the inverter (the best linear one under the public prior).

    Args:
      key: draws the starts.
      tokens: `[T, D]` the payload's tokens that carry a position (blanks sent without one
        left out: `blank_tokens`).
      patches: `[Q, P]` public patches (normalised, augmented as the sites do) that a site
        would send with a position; positions: `[Q]` theirs.

    Returns:
      `(W' [P, D], offsets [N, D], relative loss of the start kept)`.
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    if tokens.ndim != 2 or len(tokens) < 2:
        raise SMSDError(f"tokens of shape {tokens.shape}: expected [T >= 2, D]")
    best = None
    for k in jax.random.split(key, restarts):
        (w, o), end = _fit_substitute(
            k, tokens, jnp.asarray(patches, jnp.float32), jnp.asarray(positions), noise_std,
            num_positions=num_positions, steps=steps, batch=batch, directions=directions,
            lr=lr)
        if best is None or float(end) < best[2]:
            best = (np.asarray(w, np.float64), np.asarray(o, np.float64), float(end))
    return best
