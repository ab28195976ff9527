"""The privacy study (`--mode=privacy`): every attack on payloads made the way sites make them.

For each point of `config.privacy` (every setting at the project's default head and keep, then
one knob at a time around the default: token width D, position-embedding std, keep, token
noise), a site's private images are augmented, encoded by the consortium's head and sent as the
setting says. The server attacks that payload twice: knowing the head ("public") and not
("secret"), with public images of the other split. Writes, under `workdir/results/`,
`privacy.json`, `privacy.md` and `reconstructions_{public,secret}.png`, and answers which
settings keep secret-head position recovery and reconstruction near chance.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smsd_jax import data, evaluation, files, models, ops
from smsd_jax.privacy import attacks, leakage
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout

# name: (masked, permuted, one draw reused for every sample, what the server knows of order)
SETTINGS = {
    "none": (False, False, False, "sorted"),         # all tokens, in grid order
    "permutation": (False, True, False, "free"),     # keep = 1, shuffled
    "masking": (True, False, False, "sorted"),       # keep < 1, kept tokens in grid order
    "both": (True, True, False, "free"),             # the method's default
    "reused": (True, True, True, "fixed"),           # both, one mask + permutation per site
}
HEADS = ("public", "secret")
KNOBS = ("dim", "pos_std", "keep", "noise_std", "constant_patches", "blank_range")
PSNR_CAP_DB = 100.0  # an exact reconstruction has infinite PSNR; the mean stays finite
KNOB_COSTS = {
    "setting": "permutation costs no accuracy (the body is order-blind); masking keeps fewer "
               "tokens per sample (the default keep 0.5 is the method's)",
    "keep": "a lower keep sends fewer tokens per sample: less to learn from per view",
    "pos_std": "a small position embedding is drowned by content, so the body loses where a "
               "token came from (docs/method.md needed std 0.5)",
    "noise_std": "token noise corrupts every input of the body and of the downstream model",
    "dim": "D is the token width, the body's unless config.model.head_dim gives the body a "
           "stem from D: without a stem a small D limits the model; D < values per patch "
           "throws content away at the site",
    "constant_patches": "unplaced: blank patches lose their position, so the body no longer "
                        "sees where the background is, only how much of it there is",
}


@functools.partial(jax.jit, static_argnames=("setting", "keep"))
def make_payload(key: jax.Array, tokens: jax.Array, setting: str,
                 keep: float) -> tuple[jax.Array, jax.Array]:
    """What a site sends under `setting`: tokens `[S, N, D]` -> (sent `[S, K, D]`, positions
    `[S, K]`). "none" and "permutation" send every token (keep 1)."""
    if setting not in SETTINGS:
        raise SMSDError(f"setting {setting!r} is unknown; use one of {sorted(SETTINGS)}")
    masked, permuted, reused, _ = SETTINGS[setting]
    keep = keep if masked else 1.0
    if reused:
        _, first = ops.encrypt(key, tokens[:1], keep)
        positions = jnp.broadcast_to(first, (tokens.shape[0], first.shape[-1]))
    elif permuted:
        _, positions = ops.encrypt(key, tokens, keep)
    else:
        _, positions = ops.mask_sample(key, tokens, keep)
    return jnp.take_along_axis(tokens, positions[..., None], axis=-2), positions


def points(config) -> list[dict]:
    """The study's points: every setting at the default knobs, then each sweep value of each
    knob (other knobs at default) with `privacy.sweep_setting`."""
    p = config.privacy
    default = dict(dim=models.token_width(config), pos_std=config.model.pos_std,
                   keep=config.site.keep, noise_std=p.noise_std,
                   constant_patches=config.model.constant_patches,
                   blank_range=config.model.blank_range)
    out = [dict(default, setting=s, sweep="grid") for s in p.settings]
    for knob, values in p.sweeps.items():
        if knob not in KNOBS:
            raise SMSDError(f"config.privacy.sweeps.{knob} is not a knob; use {KNOBS}")
        out += [dict(default, **{knob: v}, setting=p.sweep_setting, sweep=knob)
                for v in values if v != default[knob]]
    for point in out:
        keep = point["keep"] if SETTINGS[point["setting"]][0] else 1.0
        point.update(keep=keep, label=f"{point['setting']} D{point['dim']} "
                     f"pos{point['pos_std']:g} keep{keep:g} noise{point['noise_std']:g}"
                     + blank_label(point))
    return out


def blank_label(point: dict) -> str:
    """How a point treats blank patches, for its label: "" (placed, the default), else
    " unplaced" and the range of values that counts as blank."""
    return ("" if point["constant_patches"] == "placed" else f" {point['constant_patches']}") \
        + (f" blank<={point['blank_range']:g}" if point.get("blank_range") else "")


def blank_mask(config, patches: np.ndarray, point: dict) -> np.ndarray:
    """Normalised patches `[..., N, P]` -> `[..., N]` bool: blank under `point`'s
    `blank_range` (in [0, 1] pixels; `models.blank_patches`)."""
    return np.asarray(models.blank_patches(
        patches, point.get("blank_range", 0.0) / config.data.std))


# ----------------------------------------------------------------------------- data


def sample_images(config, split: str, count: int, seed: int) -> np.ndarray:
    """`count` images of `split`, drawn at random: float32 `[count, H, W, C]` in [0, 1]."""
    source = data.load_source(config.data, split)
    if count > len(source):
        raise SMSDError(f"config.privacy asks for {count} {split} images but {source.name} has"
                        f" {len(source)}; lower num_victim / num_public")
    index = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    return np.stack([source[int(i)]["image"] for i in index]).astype(np.float32) / 255


def augment_copies(images: np.ndarray, copies: int, augment, seed: int) -> np.ndarray:
    """`[n, H, W, C]` -> `[n, copies, H, W, C]`, each copy augmented as the site's pipeline does."""
    aug, rng = data.augment_from_config(augment), np.random.default_rng(seed)
    return np.stack([[aug.image(x, rng) for _ in range(copies)] for x in images])


@dataclasses.dataclass
class _Data:
    """The harness's ground truth and the server's public data (normalised pixels)."""
    victim: np.ndarray          # [S, H, W, C] in [0, 1], S = images * M, the sent samples
    victim_patches: np.ndarray  # [S, N, P]
    public: np.ndarray          # [n_public, H, W, C] normalised
    public_patches: np.ndarray  # [n_public, N, P]
    prior: attacks.PatchPrior
    num_samples: int            # M
    flips: bool                 # the site's augmentation mirrors images: score up to a mirror
    mean_image: dict            # PSNR and SSIM of the public mean image: the guess without data


def prepare(config) -> _Data:
    """The victim's augmented samples and the server's public data for `config.privacy`."""
    p, d = config.privacy, config.data
    if p.victim_split == p.public_split:
        raise SMSDError(f"config.privacy.victim_split and public_split are both "
                        f"{p.victim_split!r}: the server must not hold the images it attacks")
    m = config.site.num_samples
    augment = config.site.augment if p.augment else None
    flips = data.augment_from_config(augment).flip
    victim = augment_copies(sample_images(config, p.victim_split, p.num_victim, config.seed),
                            m, augment, config.seed + 1
                            ).reshape(-1, d.image_size, d.image_size, d.channels)
    public = augment_copies(sample_images(config, p.public_split, p.num_public,
                                          config.seed + 2), 1, augment, config.seed + 3)[:, 0]
    public = (public - d.mean) / d.std
    patch = config.model.patch_size
    public_patches = np.asarray(models.patchify(public, patch))
    prior = attacks.fit_patch_prior(public_patches)
    # Nothing recovered: every patch is the public mean, the attacker's guess without data.
    guess = np.broadcast_to(to_pixels(config, prior.mean[None, :0], np.zeros((1, 0), int),
                                      prior.mean), victim.shape)
    return _Data(victim, np.asarray(models.patchify((victim - d.mean) / d.std, patch)), public,
                 public_patches, prior, m, flips, image_quality(guess, victim, flips))


# ----------------------------------------------------------------------------- heads


@dataclasses.dataclass
class _Head:
    """Everything that depends only on the head's knobs (D, position std, token noise)."""
    tokens: np.ndarray      # [S, N, D] the victim's tokens, noise included
    kernel: np.ndarray
    offsets: np.ndarray
    gaussian: attacks.LinearGaussian
    leaked: dict            # learned attacker trained with the victim's head (head public)
    own: dict               # learned attacker trained with the server's own head (secret)
    losses: dict


def setup_head(config, ds: _Data, point: dict) -> _Head:
    """The victim's tokens and the attackers for a head of `point`'s width `dim` and
    `pos_std`, sent with noise of std `noise_std` per value (absolute units), after each token
    is clipped to L2 norm `dp_clip` when that is > 0 (the Gaussian mechanism's release)."""
    p, c = config.privacy, config.data
    dim, pos_std, noise_std = point["dim"], point["pos_std"], point["noise_std"]
    clip = point.get("dp_clip", 0.0)
    head = models.ViTHead(c.image_size, config.model.patch_size, dim, pos_std,
                          constant_patches=point.get("constant_patches", "placed"),
                          blank_range=point.get("blank_range", 0.0) / c.std)
    blank = jnp.zeros((1, c.image_size, c.image_size, c.channels))
    init = jax.jit(head.init)
    victim_params = init(jax.random.key(p.head_seed), blank)["params"]
    own_params = init(jax.random.key(p.attacker_head_seed), blank)["params"]
    encode = jax.jit(lambda params, x: head.apply({"params": params}, x))

    def noisy_tokens(params, images, salt):
        """Tokens as a site sends them: noise added, stored in the payload's dtype."""
        tokens = encode(params, jnp.asarray(images))
        tokens = np.asarray(ops.clip_tokens(tokens, clip) if clip > 0 else tokens)
        rng = np.random.default_rng([config.seed, salt])
        tokens = tokens + np.float32(noise_std) * rng.standard_normal(tokens.shape, np.float32)
        return tokens.astype(jnp.dtype(config.site.payload_dtype)).astype(np.float32)

    tokens = noisy_tokens(victim_params, (ds.victim - c.mean) / c.std, 0)
    n = ds.public_patches.shape[1]
    positions = np.tile(np.arange(n), len(ds.public))
    targets = jnp.asarray(ds.public_patches.reshape(-1, ds.public_patches.shape[-1]))
    trained, losses = {}, {}
    for salt, (name, params) in enumerate((("leaked", victim_params), ("own", own_params)), 1):
        inputs = attacks.standardize(noisy_tokens(params, ds.public, salt).reshape(-1, dim))
        trained[name], loss = attacks.train_attacker(
            jax.random.key(p.attacker_head_seed + salt), jnp.asarray(inputs), positions,
            targets, num_positions=n, **p.attacker)
        losses[name] = float(np.mean(np.asarray(loss)[-50:]))
    kernel, offsets = attacks.head_matrices(victim_params)
    gaussian = attacks.linear_gaussian(kernel, offsets, ds.prior, noise_std, ridge=p.prior_ridge)
    return _Head(tokens, kernel, offsets, gaussian, trained["leaked"], trained["own"], losses)


# ------------------------------------------------------------------------- evaluation


def to_pixels(config, patches, positions, fill) -> np.ndarray:
    """Recovered patches `[S, K, P]` at `positions` `[S, K]`, `fill` `[N, P]` elsewhere
    (normalised) -> images `[S, H, W, C]` in [0, 1]."""
    images = attacks.assemble_images(patches, positions, fill, config.model.patch_size,
                                     config.data.channels)
    return np.clip(images * config.data.std + config.data.mean, 0.0, 1.0)


def image_quality(images, truth, flips: bool) -> dict:
    """Mean PSNR and SSIM of reconstructions `[S, H, W, 1]`. With `flips` each image is scored
    in its better orientation: the site mirrors images at random, so neither the attacker nor
    the truth has a preferred one, and a mirrored reconstruction shows as much."""
    psnr, ssim = leakage.psnr(images, truth), leakage.ssim(images, truth)
    if flips:
        mirrored = images[:, :, ::-1]
        psnr_m, ssim_m = leakage.psnr(mirrored, truth), leakage.ssim(mirrored, truth)
        psnr, ssim = np.maximum(psnr, psnr_m), np.where(psnr_m > psnr, ssim_m, ssim)
    return dict(psnr=float(np.mean(np.minimum(psnr, PSNR_CAP_DB))), ssim=float(np.mean(ssim)))


def mirror_accuracy(found, truth, num_positions: int, flips: bool) -> float:
    """Position accuracy; with `flips`, the better of the positions and their mirror images
    (one choice for the whole payload: the mirror symmetry of flip-augmented data lets an
    attacker name every position by its mirror, which reveals as much)."""
    found, side = np.asarray(found), int(round(np.sqrt(num_positions)))
    accuracy = leakage.position_accuracy(found, truth)
    if not flips:
        return accuracy
    mirrored = np.where(found >= 0, found // side * side + side - 1 - found % side, found)
    return max(accuracy, leakage.position_accuracy(mirrored, truth))


def _pairs(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """`[images * M, ...]` -> samples 0 and 1 of each image, `[images, ...]` each."""
    x = x.reshape(-1, m, *x.shape[1:])
    return x[:, 0], x[:, 1]


def _linkage(similarity, samples: np.ndarray, m: int, seed: int) -> dict:
    """ROC AUC of each similarity, same-image pairs (samples 0 and 1 of an image) against pairs
    from different images. `similarity(a, b)` -> `{name: [n]}`, higher = same image."""
    if m < 2:
        return {}
    a, b = _pairs(samples, m)
    n = len(a)
    other = (np.arange(n) + 1 + np.random.default_rng(seed).integers(n - 1, size=n)) % n
    same, different = similarity(a, b), similarity(a, b[other])
    labels = np.r_[np.ones(n), np.zeros(n)]
    return {name: evaluation.roc_auc(np.r_[same[name], different[name]], labels) for name in same}


def _token_similarity(a, b) -> dict:
    return {name: np.asarray(v) for name, v in
            attacks.linkage_scores(jnp.asarray(a), jnp.asarray(b)).items()}


def _image_similarity(a, b) -> dict:
    return {"image": -np.mean((a - b) ** 2, axis=(1, 2, 3))}


def _cluster(key, x, k: int, iters: int) -> np.ndarray:
    return np.asarray(attacks.kmeans(key, jnp.asarray(x, jnp.float32), k=k, iters=iters))


def _grouping(config, ds: _Data, sent, positions, order: str, noise_std: float,
              seed: int, has: np.ndarray) -> tuple[dict, float, tuple]:
    """Head-agnostic grouping of the payload's tokens by position.

    k-means on the tokens, on their residual off the top P principal directions (D > P
    only) and the slots (`content_only`: k-means on the true patches, what content alone
    groups). The groups the server trusts most (slots when it knows they are positions:
    grid order or a reused permutation; else the residual, or raw, k-means groups) are named by
    their spectra.

    Grouping is `leakage.grouping_accuracy` (groups matched one-to-one to positions) over
    the tokens that carry a position (`has`, `[S*K]`).

    Returns:
      `(grouping, accuracy of the spectral names, (tokens, groups, moments, labels,
      rounds))`, the last for `attacks.estimate_head` (rounds 0 when the order already names
      every slot).
    """
    p = config.privacy
    s, k, dim = sent.shape
    n, pdim = ds.victim_patches.shape[1:]
    flat, truth = sent.reshape(-1, dim), positions.reshape(-1)
    pick = np.random.default_rng(seed).choice(len(flat), min(len(flat), p.cluster_tokens),
                                              replace=False)
    content = np.take_along_axis(ds.victim_patches, positions[..., None], axis=1)
    slots = np.broadcast_to(np.arange(k), (s, k)).ravel()
    key = jax.random.key(seed)
    groups = _cluster(key, flat[pick], n, p.kmeans_iters)
    by_content = _cluster(key, content.reshape(-1, pdim)[pick], n, p.kmeans_iters)
    grouping = dict(content_only=_grouped(by_content, truth[pick], has[pick]),
                    kmeans=_grouped(groups, truth[pick], has[pick]), residual=None,
                    slot=_grouped(slots, truth, has))
    if dim > pdim:
        groups = _cluster(key, attacks.remove_top_components(flat[pick], pdim), n,
                          p.kmeans_iters)
        grouping["residual"] = _grouped(groups, truth[pick], has[pick])
    in_grid_order = order == "sorted" and k == n
    if order == "fixed" or in_grid_order:  # the slots are exact groups
        tokens, groups = flat, slots
    else:
        tokens, truth = flat[pick], truth[pick]
    moments = attacks.group_moments(tokens, groups, noise_std)
    labels = attacks.spectral_labels(moments, np.max(groups) + 1, ds.prior, p.spectrum_size)
    spectral = mirror_accuracy(labels[groups], truth, n, ds.flips)
    if in_grid_order:
        return grouping, spectral, (tokens, groups, moments, np.arange(n), 0)
    return grouping, spectral, (tokens, groups, moments, labels, p.moments.rounds)


def _grouped(groups, truth, has) -> float:
    """`leakage.grouping_accuracy` over the tokens that carry a position."""
    return leakage.grouping_accuracy(np.asarray(groups)[has], np.asarray(truth)[has])


def _anchors(config, ds: _Data, sent, background: tuple, assign, noise_std: float, seed: int,
             public_placed: np.ndarray | None):
    """Head secret, from the payload's exact repeats: blank patches give one token per blank
    position (`attacks.repeated_tokens`; with blank patches `unplaced`, each sample's blank
    token gives its background (`attacks.blank_tokens`), and once it is subtracted the
    almost blank tokens cluster tightly by position, `attacks.near_repeats`); every placed
    token is grouped by position around them (`attacks.shifted_mixture`); the groups are
    named by which are present together in a sample (`attacks.name_by_cooccurrence` against
    public images: which positions are blank together, or with blanks unplaced, which hold
    the object together), the head is estimated from the named groups' moments
    (`attacks.estimate_head`) and the payload attacked as if it were public.

    `public_placed`: `[n_public, N]` bool, the public patches a site would send with their
    position, when blank patches are sent unplaced; None when every patch is placed.

    Returns:
      None when nothing repeats (token noise), else `(groups [S*K], -1 for a token sent
      without position, positions by anchor [S, K], positions and images by the estimated
      head)`.
    """
    p = config.privacy
    unplaced = public_placed is not None
    s, k, dim = sent.shape
    n = ds.victim_patches.shape[1]
    flat, rows = sent.reshape(-1, dim), np.repeat(np.arange(s), k)
    residual, placed = background  # `_without_background`
    if unplaced:  # exact blanks carry no position but give each sample's background
        values, repeated = attacks.near_repeats(residual, rows, n, p.near_radius,
                                                min_count=max(3, s // 200))
    else:  # a blank position is blank in more than 1 sample in 50; rarer repeats are noise
        values, repeated = attacks.repeated_tokens(flat, n, min_count=max(3, s // 50))
    if not len(values):
        return None
    groups = np.full(len(flat), -1)
    groups[placed], d2 = attacks.shifted_mixture(residual[placed], values, n)
    if unplaced:  # every position's group: named by which positions hold the object together
        present = attacks.presence(groups, rows, s, n)
        names = attacks.name_by_cooccurrence(present, public_placed, k, seed=seed)
    else:  # the blank anchors: named by which positions are blank together
        present = attacks.presence(repeated, rows, s, len(values))
        names = attacks.name_by_cooccurrence(present, attacks.blank_patches(ds.public_patches),
                                             k, seed=seed)
        names = np.concatenate([names, np.setdiff1d(np.arange(n), names)])  # never blank
    scores = np.zeros((len(flat), n))  # an unplaced token: every position alike
    scores[np.ix_(placed, names)] = -d2
    by_anchor = assign(scores.reshape(s, k, n))
    moments = attacks.group_moments(flat[placed], groups[placed], noise_std)
    kernel, offsets, _ = attacks.estimate_head(
        jax.random.key(seed), flat[placed], groups[placed], moments, names, ds.prior,
        steps=p.moments.steps, refine_steps=p.moments.refine_steps, rounds=p.moments.rounds,
        lr=p.moments.lr)
    model = attacks.linear_gaussian(kernel, offsets, ds.prior, noise_std, ridge=p.prior_ridge)
    return groups, by_anchor, linear_attack(config, model, sent, assign, ds.prior.mean)


def _substitute(config, ds: _Data, sent, placed, assign, point: dict, seed: int):
    """Head secret, FORA-style (`attacks.substitute_head`): a linear head fitted on public
    patches so that their tokens match the payload's placed tokens in distribution, then used
    as if it were the head. -> (groups `[S*K]` by its most likely position, positions `[S, K]`,
    images)."""
    s, k, dim = sent.shape
    n = ds.public_patches.shape[1]
    sends = ~blank_mask(config, ds.public_patches, point) \
        if point.get("constant_patches", "placed") == "unplaced" \
        else np.ones(ds.public_patches.shape[:2], bool)
    kernel, offsets, _ = attacks.substitute_head(
        jax.random.key(seed), sent.reshape(-1, dim)[placed], ds.public_patches[sends],
        np.nonzero(sends)[1], n, point["noise_std"], **config.privacy.substitute)
    model = attacks.linear_gaussian(kernel, offsets, ds.prior, point["noise_std"],
                                    ridge=config.privacy.prior_ridge)
    scores = attacks.gaussian_scores(model, sent)
    found = assign(scores)
    images = to_pixels(config, attacks.invert_patches(model, sent, found), found, ds.prior.mean)
    return scores.reshape(s * k, n).argmax(-1), found, images


def grouping_bound(background: tuple, positions, offsets, has) -> float:
    """What grouping by position the payload's structure allows: `attacks.shifted_mixture`
    started from the true offsets `[N, D]` (which no attacker holds; the attacks above must
    find them), on the tokens as the attacks see them (`background`: the payload's
    `_without_background`). Informative for defences: a setting whose bound is low leaves
    nothing for a better search to find."""
    residual, placed = background
    groups = np.full(len(residual), -1)
    groups[placed], _ = attacks.shifted_mixture(residual[placed], offsets, len(offsets))
    return _grouped(groups, positions.reshape(-1), has)


def _without_background(sent, unplaced: bool) -> tuple[np.ndarray, np.ndarray]:
    """The payload's tokens `[S*K, D]`, less each sample's blank token when blanks are sent
    unplaced (`attacks.blank_tokens`), and `[S*K]` bool: the token was sent with a position
    (as far as the server can tell)."""
    s, k, dim = sent.shape
    flat = sent.reshape(-1, dim)
    if not unplaced:
        return flat, np.ones(len(flat), bool)
    rows = np.repeat(np.arange(s), k)
    blanks, on_line = attacks.blank_tokens(flat, rows, s)
    return flat - blanks[rows], ~on_line


def linear_attack(config, model: attacks.LinearGaussian, sent, assign, fill):
    """Positions by `gaussian_scores` and the order, then patches inverted there: the attack of
    a server that knows (or has estimated) the head. -> (positions `[S, K]`, images)."""
    found = assign(attacks.gaussian_scores(model, sent))
    return found, to_pixels(config, attacks.invert_patches(model, sent, found), found, fill)


def _row(accuracies: dict, reconstructions: dict, linkage: dict) -> dict:
    """One head's results: every attack's numbers, and the best attack of each kind."""
    best_pos = max(accuracies, key=accuracies.get)
    best_rec = max(reconstructions, key=lambda name: reconstructions[name]["psnr"])
    return dict(position_accuracy=accuracies[best_pos], position_attack=best_pos,
                position_attacks=accuracies, psnr=reconstructions[best_rec]["psnr"],
                ssim=reconstructions[best_rec]["ssim"], reconstruction_attack=best_rec,
                reconstructions=reconstructions,
                linkage_auc=max(linkage.values()) if linkage else None, linkage=linkage)


def evaluate_point(config, ds: _Data, hd: _Head, point: dict, seed: int) -> dict:
    """Attacks one payload, made as `point` says, with the head public and with it secret.

    Returns:
      `{"shared": head-agnostic numbers, "public": row, "secret": row, "examples": {"public",
      "secret": reconstructions of the first images' sample 0, [e, H, W, C]}}`.
    """
    order = SETTINGS[point["setting"]][3]
    blank = blank_mask(config, ds.victim_patches, point)  # [S, N]
    sent, positions = (np.asarray(a) for a in make_payload(
        jax.random.key(seed), jnp.asarray(hd.tokens), point["setting"], point["keep"]))
    s, k, _ = sent.shape
    n, m, fill = ds.victim_patches.shape[1], ds.num_samples, ds.prior.mean
    assign = lambda scores: attacks.assign_positions(scores, order)
    accuracy = lambda found: mirror_accuracy(found, positions, n, ds.flips)

    unplaced = point.get("constant_patches", "placed") == "unplaced"
    truth = positions.reshape(-1)
    # The tokens sent with their position: every one, or with blanks unplaced the others.
    has = ~np.take_along_axis(blank, positions, axis=1).reshape(-1) if unplaced \
        else np.ones(len(truth), bool)
    grouping, spectral, blind = _grouping(config, ds, sent, positions, order,
                                          point["noise_std"], seed + 1, has)
    background = _without_background(sent, unplaced)
    anchored = _anchors(config, ds, sent, background, assign, point["noise_std"], seed + 3,
                        ~blank_mask(config, ds.public_patches, point) if unplaced else None)
    grouping["anchors"] = None if anchored is None else _grouped(anchored[0], truth, has)
    order_only = accuracy(assign(np.zeros((s, k, n))))
    token_link = _linkage(_token_similarity, sent, m, config.seed)
    shared = dict(point, chance_accuracy=1.0 / n, order_only_accuracy=order_only,
                  grouping=grouping, position_share=float(has.mean()),
                  grouping_bound=grouping_bound(background, positions, hd.offsets, has),
                  slot_consistency=attacks.slot_consistency(sent), mean_image=ds.mean_image)

    def learned(params):
        log_probs, patches = attacks.attacker_predict(params, jnp.asarray(
            attacks.standardize(sent)))
        found = assign(np.asarray(log_probs))
        return accuracy(found), to_pixels(config, np.asarray(patches), found, fill)

    leaked_accuracy, leaked_images = learned(hd.leaked)
    own_accuracy, own_images = learned(hd.own)

    # Head public: linear algebra on W and the offsets; the learned attacker with the true head.
    found, linear_images = linear_attack(config, hd.gaussian, sent, assign, fill)
    public_images = {"linear": linear_images, "learned": leaked_images}
    public = _row(
        dict(order_only=order_only,
             projection=accuracy(assign(attacks.projection_scores(sent, hd.kernel, hd.offsets))),
             gaussian=accuracy(found), learned=leaked_accuracy),
        {name: image_quality(x, ds.victim, ds.flips) for name, x in public_images.items()},
        {**token_link, **_linkage(_image_similarity, linear_images, m, config.seed)})

    # Head secret: a learned attacker with the server's own head; groups named by spectra; the
    # head estimated from the payload's moments, then attacked as if public.
    p = config.privacy
    tokens, groups, moments, labels, rounds = blind
    kernel, offsets, _ = attacks.estimate_head(
        jax.random.key(seed + 2), tokens, groups, moments, labels, ds.prior,
        steps=p.moments.steps, refine_steps=p.moments.refine_steps, rounds=rounds,
        lr=p.moments.lr)
    estimated = attacks.linear_gaussian(kernel, offsets, ds.prior, point["noise_std"],
                                        ridge=p.prior_ridge)
    found, moment_images = linear_attack(config, estimated, sent, assign, fill)
    secret_images = {"learned_own_head": own_images, "moments": moment_images}
    secret_accuracies = dict(order_only=order_only, learned_own_head=own_accuracy,
                             spectral=spectral, moments=accuracy(found))
    if anchored is not None:
        _, by_anchor, (found, secret_images["anchors"]) = anchored
        secret_accuracies.update(anchors=accuracy(by_anchor), anchors_moments=accuracy(found))
    groups, found, secret_images["substitute"] = _substitute(
        config, ds, sent, background[1], assign, point, seed + 4)
    grouping["substitute"] = _grouped(groups, truth, has)
    secret_accuracies["substitute"] = accuracy(found)
    secret = _row(
        secret_accuracies,
        {name: image_quality(x, ds.victim, ds.flips) for name, x in secret_images.items()},
        {**token_link, **_linkage(_image_similarity, moment_images, m, config.seed)})
    secret["head_leaked_accuracy"] = leaked_accuracy
    examples = {head: images[row["reconstruction_attack"]][::m][:p.num_examples]
                for head, images, row in (("public", public_images, public),
                                          ("secret", secret_images, secret))}
    return dict(shared=shared, public=public, secret=secret, examples=examples)


# --------------------------------------------------------------------------- the answer


def best_grouping(grouping: dict | None) -> float | None:
    """The best of a row's groupings by position (content alone left out); None when there is
    none (attacks run before grouping was measured)."""
    found = [v for name, v in (grouping or {}).items()
             if name != "content_only" and v is not None]
    return max(found, default=None)


def _checks(row: dict, margins) -> dict:
    """Whether one head's attacks stay near chance (within `margins`)."""
    return dict(
        position=row["position_accuracy"] <= row["chance_accuracy"] + margins.accuracy,
        grouping=best_grouping(row["grouping"]) <= margins.grouping * row["chance_accuracy"],
        reconstruction=(row["psnr"] <= row["mean_image"]["psnr"] + margins.psnr_db
                        and row["ssim"] <= row["mean_image"]["ssim"] + margins.ssim))


def _loss_rank(row: dict, default: dict) -> tuple:
    """Sort key, least expected accuracy loss first: a change of setting only, then the rule
    for constant patches, keep, position std, noise and D (our judgement of each knob's cost;
    `--mode=frontier` measures it), and within a knob the value that gives up least (higher
    keep, std and D; lower noise)."""
    knobs = ("grid", "constant_patches", "keep", "pos_std", "noise_std", "dim")
    knob = row["sweep"]
    if knob == "grid":
        return (0, list(SETTINGS).index(row["setting"]))
    if isinstance(row[knob], str):
        return (knobs.index(knob), float(row[knob] != default[knob]))
    direction = 1 if knob == "noise_std" else -1
    return (knobs.index(knob), direction * (row[knob] - default[knob]))


def answer(rows: list[dict], margins) -> dict:
    """Which points keep the secret-head attacks near chance, and which of those loses least.

    Near chance (the question): best position accuracy within `margins.accuracy` of 1/N
    (order-only included) and best reconstruction within `margins.psnr_db` / `margins.ssim`
    of the public mean image. Strictly near chance: also every grouping (k-means, residual,
    slot, anchors; groups matched one-to-one to positions) at most `margins.grouping` times
    chance (1/N).
    """
    default = next(r for r in rows if r["sweep"] == "grid")
    checks = {(r["label"], r["head"]): _checks(r, margins) for r in rows}
    near = lambda head: [r for r in rows if r["head"] == head and
                         checks[r["label"], head]["position"] and
                         checks[r["label"], head]["reconstruction"]]
    secret = near("secret")
    strict = [r for r in secret if checks[r["label"], "secret"]["grouping"]]
    best = min(strict or secret, key=lambda r: _loss_rank(r, default), default=None)
    return dict(
        question="Which settings keep secret-head position recovery and reconstruction near "
                 "chance, with the least loss?",
        near_chance_secret=[r["label"] for r in secret],
        near_chance_secret_strict=[r["label"] for r in strict],
        near_chance_public=[r["label"] for r in near("public")],
        least_loss=best["label"] if best else None,
        least_loss_cost=KNOB_COSTS["setting" if best["sweep"] == "grid" else best["sweep"]]
        if best else None,
        failed_checks_secret={label: [c for c, ok in found.items() if not ok]
                              for (label, head), found in checks.items()
                              if head == "secret" and not all(found.values())},
        knob_costs=KNOB_COSTS, margins=dict(margins))


# ------------------------------------------------------------------------------ outputs


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict) -> str:
    """The study's results as a Markdown report (tables and the answer)."""
    rows, ans, ref = summary["rows"], summary["answer"], summary["data"]
    lines = [
        "# Privacy of the payload: attacks of an honest-but-curious server", "",
        f"Victim: {ref['victim_images']} images of {ref['victim_split']} x M = "
        f"{ref['num_samples']} augmented samples; the server's public data: "
        f"{ref['public_images']} images of {ref['public_split']}. Chance position accuracy "
        f"1/N = {_pct(rows[0]['chance_accuracy'])}%. Guessing the public mean image: PSNR "
        f"{rows[0]['mean_image']['psnr']:.2f} dB, SSIM {rows[0]['mean_image']['ssim']:.3f}. "
        f"Wall time {summary['seconds'] / 60:.1f} min.", "",
        "Position accuracy is the best attack's (in brackets): positions named. Grouping: the "
        "share of the tokens that carry a position (the rest were sent without one) whose "
        "group is matched to their position, groups matched one-to-one to positions (chance "
        "about 1/N), for k-means on the tokens, on the tokens off their top P principal "
        "directions, by slot, around blank-patch anchors with each sample's background "
        "removed, and by the most likely position under a substitute head fitted to the "
        "payload's token distribution (against k-means on the true patches: content "
        "alone). Bound: the same grouping started from the true position offsets, which no "
        "attacker holds: what the payload's structure allows a better search to find. "
        "PSNR/SSIM: the best "
        "reconstruction from one token set. Linkage: ROC AUC of telling two samples of one "
        "image from samples of two images."
        + (" Positions and images are scored up to a left-right mirror, because the site's "
           "augmentation mirrors images at random." if ref["flips"] else ""), "",
        "| point | head | position acc. % | order only % | grouping % k-means / residual / "
        "slot / anchors / substitute (content) | bound % | PSNR dB | SSIM | linkage AUC | s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grp = r["grouping"]
        link = "n/a" if r["linkage_auc"] is None else f"{r['linkage_auc']:.3f}"
        lines.append(
            f"| {r['label']} | {r['head']} | {_pct(r['position_accuracy'])} "
            f"({r['position_attack']}) | {_pct(r['order_only_accuracy'])} | "
            f"{_pct(grp['kmeans'])} / {_pct(grp['residual'])} / {_pct(grp['slot'])} / "
            f"{_pct(grp.get('anchors'))} / {_pct(grp.get('substitute'))} "
            f"({_pct(grp['content_only'])}) | "
            f"{_pct(r.get('grouping_bound'))} | {r['psnr']:.2f} "
            f"({r['reconstruction_attack']}) | "
            f"{r['ssim']:.3f} | {link} | {r['seconds']:.1f} |")
    listed = lambda labels: ", ".join(f"`{x}`" for x in labels) or "none"
    lines += [
        "", "## Answer", "", f"**{ans['question']}**", "",
        f"- Head secret, position recovery and reconstruction near chance: "
        f"{listed(ans['near_chance_secret'])}.",
        f"- ... and grouping by position too: {listed(ans['near_chance_secret_strict'])}.",
        f"- Head public, position recovery and reconstruction near chance: "
        f"{listed(ans['near_chance_public'])}.",
        f"- Least loss among the secret-head ones: "
        f"{'`' + ans['least_loss'] + '`' if ans['least_loss'] else 'none'}"
        f"{': ' + ans['least_loss_cost'] if ans['least_loss_cost'] else ''}.", "",
        "Head secret, checks that fail (position, grouping, reconstruction):", ""]
    lines += [f"- `{label}`: {', '.join(fails)}"
              for label, fails in ans["failed_checks_secret"].items()]
    lines += ["", "What each knob would cost in accuracy (judged here; results/frontier.md "
              "measures it):", ""]
    lines += [f"- {knob}: {text}" for knob, text in ans["knob_costs"].items()]
    m = ans["margins"]
    lines += ["", f"Near chance means: best position accuracy <= 1/N + {m['accuracy']}, best "
              f"PSNR <= mean image + {m['psnr_db']} dB and SSIM <= mean image + {m['ssim']}; "
              f"every grouping <= {m['grouping']:g} x 1/N. Near chance against "
              "these attacks, not a proof against every attack.", ""]
    return "\n".join(lines)


def _reconstructions_figure(truth: np.ndarray, columns: dict, title: str) -> Figure:
    """A grid of grayscale images: the originals, then one column per setting."""
    columns = {"original": truth, **columns}
    fig = Figure(figsize=(1.3 * len(columns), 1.3 * len(truth) + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(truth), len(columns), squeeze=False)
    for j, (name, images) in enumerate(columns.items()):
        axes[0, j].set_title(name, fontsize=8)
        for i, image in enumerate(images):
            axes[i, j].imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            axes[i, j].axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def _print_row(row: dict) -> None:
    grp = row["grouping"]
    link = "n/a" if row["linkage_auc"] is None else f"{row['linkage_auc']:.3f}"
    print(f"{row['label']:<38} {row['head']:<6} position {_pct(row['position_accuracy']):>5}% "
          f"({row['position_attack']}), grouping {_pct(grp['kmeans'])}/{_pct(grp['residual'])}/"
          f"{_pct(grp['slot'])}/{_pct(grp.get('anchors'))}/{_pct(grp.get('substitute'))}%, "
          f"PSNR {row['psnr']:.1f} dB, SSIM {row['ssim']:.3f}, "
          f"linkage AUC {link}, {row['seconds']:.1f} s", flush=True)


def run_privacy(config, workdir: Layout | str | Path) -> dict:
    """Runs the study of `config.privacy`; writes `workdir/results/privacy.{json,md}` and
    `reconstructions_{public,secret}.png`.

    Returns:
      The summary written to `privacy.json`: `rows` (one per point and head), `answer`,
      `data`, `files`, `seconds`.
    """
    p = config.privacy
    if config.data.channels != 1:
        raise SMSDError(f"config.data.channels={config.data.channels}: the privacy metrics "
                        "(PSNR, SSIM on [0, 1]) are for grayscale images")
    if p.num_victim < 2 or p.num_public < 2:
        raise SMSDError(f"config.privacy needs at least 2 victim and 2 public images, got "
                        f"{p.num_victim} and {p.num_public}")
    start = time.perf_counter()
    ds = prepare(config)
    all_points = points(config)
    by_head = {}
    for index, point in enumerate(all_points):
        by_head.setdefault((point["dim"], point["pos_std"], point["noise_std"],
                            point["constant_patches"], point["blank_range"]), []).append(index)
    print(f"privacy: {len(all_points)} points x {len(HEADS)} heads, {len(by_head)} heads to "
          f"train attackers for; data ready in {time.perf_counter() - start:.1f} s", flush=True)
    rows, examples = {}, {head: {} for head in HEADS}
    truth = ds.victim[::ds.num_samples][:p.num_examples]
    for (dim, pos_std, noise_std, *_), indices in by_head.items():
        t = time.perf_counter()
        hd = setup_head(config, ds, all_points[indices[0]])
        print(f"head D{dim} pos{pos_std:g} noise{noise_std:g}"
              f"{blank_label(all_points[indices[0]])}: attackers trained in "
              f"{time.perf_counter() - t:.1f} s (final loss with the victim's head "
              f"{hd.losses['leaked']:.3f}, own head {hd.losses['own']:.3f})", flush=True)
        for index in indices:
            t = time.perf_counter()
            point = all_points[index]
            result = evaluate_point(config, ds, hd, point, 1000 * config.seed + 10 * index)
            seconds = time.perf_counter() - t
            for head in HEADS:
                rows[index, head] = dict(result["shared"], **result[head], head=head,
                                         seconds=seconds)
                _print_row(rows[index, head])
                if point["sweep"] == "grid":
                    examples[head][point["setting"]] = result["examples"][head]
    rows = [rows[key] for key in sorted(rows, key=lambda key: (key[0], HEADS.index(key[1])))]
    summary = dict(rows=rows, answer=answer(rows, p.margins), data=dict(
        victim_split=p.victim_split, public_split=p.public_split, victim_images=p.num_victim,
        public_images=p.num_public, num_samples=ds.num_samples, flips=ds.flips),
        config=p.to_dict())
    results = Layout.of(workdir).results
    written = [results / "privacy.json", results / "privacy.md"]
    for head in HEADS:
        written.append(files.save_figure(results / f"reconstructions_{head}.png",
                                         _reconstructions_figure(
                                             truth, examples[head],
                                             f"reconstructions, head {head} (best attack)")))
    summary.update(files=[str(f) for f in written], seconds=time.perf_counter() - start)
    files.write_text(written[1], markdown(summary))
    files.write_json(written[0], summary)
    print(f"privacy: {summary['seconds'] / 60:.1f} min; results in {results}", flush=True)
    return summary
