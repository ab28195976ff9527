"""Privacy of the payload: the attacks break what they should, the metrics are right, and the
study writes its report.

The attacks run on real Fashion-MNIST images: victims from the train split, the server's public
images from the test split. Asserting that each attack succeeds where it must (head public, a
leaked head, a reused permutation) is what stops a broken attack from reporting good privacy.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from configs import privacy_fashion
from smsd_jax import data, evaluation, models, ops
from smsd_jax.data import fashion_mnist
from smsd_jax.privacy import attacks, leakage
from experiments import privacy_audit as audit

MEAN, STD = 0.286, 0.353  # config.data's normalisation
PATCH, N, P = 4, 49, 16   # patch 4 on 28x28 grayscale: 49 positions, 16 values per patch
CHANCE = 1 / N


@functools.cache
def _images(split: str, count: int) -> np.ndarray:
    """The first `count` real images of `split`, float32 [count, 28, 28, 1] in [0, 1]."""
    return fashion_mnist(split).images[:count].astype(np.float32) / 255


@functools.cache
def _head(dim: int, seed: int, pos_std: float = 0.5):
    head = models.ViTHead(28, PATCH, dim, pos_std)
    return head, head.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def _tokens(dim: int, seed: int, images: np.ndarray) -> np.ndarray:
    head, params = _head(dim, seed)
    return np.asarray(head.apply({"params": params}, (images - MEAN) / STD))


def _patches(images: np.ndarray) -> np.ndarray:
    return np.asarray(models.patchify((images - MEAN) / STD, PATCH))


def _linear_attack(dim: int, sent: np.ndarray, order: str = "free"):
    """Head public: (positions found by projection, positions found by the Gaussian model,
    patches inverted at the latter)."""
    kernel, offsets = attacks.head_matrices(_head(dim, 1)[1])
    model = attacks.linear_gaussian(kernel, offsets,
                                    attacks.fit_patch_prior(_patches(_images("test", 500))))
    projected = attacks.assign_positions(attacks.projection_scores(sent, kernel, offsets), order)
    found = attacks.assign_positions(attacks.gaussian_scores(model, sent), order)
    return projected, found, attacks.invert_patches(model, sent, found)


def _to_image(patches, positions, fill):
    images = attacks.assemble_images(patches, positions, fill, PATCH, 1)
    return np.clip(images * STD + MEAN, 0, 1)


# ------------------------------------------------------------------------ head public


@pytest.mark.parametrize("dim", [32, 128])
def test_public_head_without_protection_gives_back_positions_and_images(dim):
    victims = _images("train", 40)
    tokens = _tokens(dim, 1, victims)
    # Shuffle anyway and attack as if the order were unknown: the attack must find positions.
    projected, found, patches = _linear_attack(dim, tokens)
    assert leakage.position_accuracy(projected, np.broadcast_to(np.arange(N), (40, N))) >= 0.99
    assert leakage.position_accuracy(found, np.broadcast_to(np.arange(N), (40, N))) >= 0.99
    rebuilt = _to_image(patches, found, np.zeros((N, P)))
    assert np.mean(leakage.psnr(rebuilt, victims)) > 30
    assert np.mean(leakage.ssim(rebuilt, victims)) > 0.99


def test_public_head_defeats_default_masking_and_permutation():
    # docs/method.md's documented weakness: masking and permutation do not hide positions from a
    # server that knows the head, and every kept patch comes back exactly.
    victims = _images("train", 40)
    sent, positions = ops.encrypt(jax.random.key(0), jnp.asarray(_tokens(128, 1, victims)), 0.5)
    sent, positions = np.asarray(sent), np.asarray(positions)
    projected, found, patches = _linear_attack(128, sent)
    assert leakage.position_accuracy(projected, positions) >= 0.99
    assert leakage.position_accuracy(found, positions) >= 0.99
    kept = np.take_along_axis(_patches(victims), positions[..., None], axis=1)
    np.testing.assert_allclose(patches, kept, atol=1e-3)


def test_public_head_narrower_than_a_patch_still_leaks_positions():
    # D = 8 < 16 values per patch: nothing lies off the row space of W, so projection is blind,
    # but the public patch prior still names most positions.
    victims = _images("train", 40)
    sent, positions = ops.encrypt(jax.random.key(1), jnp.asarray(_tokens(8, 1, victims)), 0.5)
    projected, found, _ = _linear_attack(8, np.asarray(sent))
    assert leakage.position_accuracy(projected, positions) < 3 * CHANCE
    assert leakage.position_accuracy(found, positions) > 0.3


def test_gaussian_scores_are_the_token_log_density_up_to_a_constant():
    # Random inputs on purpose: a property of the model for any head, prior and tokens.
    rng = np.random.default_rng(0)
    kernel, offsets = rng.normal(size=(P, 24)), rng.normal(size=(N, 24))
    factors = rng.normal(size=(N, P, P))
    prior = attacks.PatchPrior(rng.normal(size=(N, P)), factors @ factors.transpose(0, 2, 1),
                               rng.normal(size=(N, P)))
    model = attacks.linear_gaussian(kernel, offsets, prior, noise_std=0.3, ridge=0.1)
    tokens = rng.normal(size=(5, 24)) * 3
    want = np.stack([stats.multivariate_normal(
        prior.mean[n] @ kernel + offsets[n],
        kernel.T @ (prior.cov[n] + 0.1 * np.eye(P)) @ kernel + (0.09 + 1e-6) * np.eye(24)
    ).logpdf(tokens) for n in range(N)], axis=-1)
    got = attacks.gaussian_scores(model, tokens)
    np.testing.assert_allclose(got - got[:, :1], want - want[:, :1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ head secret


@functools.cache
def _trained_attacker(head_seed: int):
    """A learned attacker on public (test split) images encoded with head `head_seed`, D 128."""
    public = _images("test", 300)
    inputs = attacks.standardize(_tokens(128, head_seed, public).reshape(-1, 128))
    params, losses = attacks.train_attacker(
        jax.random.key(0), jnp.asarray(inputs), np.tile(np.arange(N), len(public)),
        jnp.asarray(_patches(public).reshape(-1, P)), num_positions=N, hidden=128, steps=150,
        batch_size=256)
    return params, np.asarray(losses)


@pytest.mark.slow
def test_learned_attacker_is_at_chance_with_its_own_head_and_wins_with_the_leaked_one():
    victims = _images("train", 100)
    sent, positions = ops.encrypt(jax.random.key(2), jnp.asarray(_tokens(128, 1, victims)), 0.5)
    inputs = jnp.asarray(attacks.standardize(sent))
    accuracy = {}
    for name, seed in (("own", 2), ("leaked", 1)):
        params, losses = _trained_attacker(seed)
        assert losses[-20:].mean() < 0.5 * losses[:20].mean()  # it did learn its own head
        log_probs, _ = attacks.attacker_predict(params, inputs)
        found = attacks.assign_positions(np.asarray(log_probs), "free")
        accuracy[name] = leakage.position_accuracy(found, positions)
    assert accuracy["own"] < 3 * CHANCE, accuracy
    assert accuracy["leaked"] > 0.9, accuracy


@pytest.mark.slow
def test_residual_clustering_groups_tokens_by_position_without_the_head():
    victims = _images("train", 100)
    sent, positions = ops.encrypt(jax.random.key(3), jnp.asarray(_tokens(128, 1, victims)), 0.5)
    flat, truth = np.asarray(sent).reshape(-1, 128), np.asarray(positions).ravel()
    raw = attacks.kmeans(jax.random.key(0), jnp.asarray(flat), k=N, iters=15)
    residual = attacks.kmeans(jax.random.key(0), jnp.asarray(
        attacks.remove_top_components(flat, P), jnp.float32), k=N, iters=15)
    assert leakage.cluster_purity(residual, truth) > 0.7
    assert leakage.cluster_purity(residual, truth) > leakage.cluster_purity(raw, truth) + 0.2


def _payload(dim: int, victims: np.ndarray, constant_patches: str = "placed"):
    """The default payload (keep 0.5, shuffled) of `victims` under a secret head: (sent
    [S, K, D] in float16's values, positions [S, K])."""
    head, params = _head(dim, 1)
    head = head.clone(constant_patches=constant_patches)
    tokens = np.asarray(head.apply({"params": params}, (victims - MEAN) / STD))
    sent, positions = ops.encrypt(jax.random.key(3), jnp.asarray(
        tokens.astype(np.float16).astype(np.float32)), 0.5)
    return np.asarray(sent), np.asarray(positions)


def _blank_anchor_attack(dim: int, victims: np.ndarray, constant_patches: str = "placed"):
    """Head secret: repeated tokens named by co-occurrence against public blanks, then every
    token grouped with its anchor. -> (repeated groups, names, anchor groups, truth)."""
    sent, positions = _payload(dim, victims, constant_patches)
    s, k, _ = sent.shape
    flat, truth = sent.reshape(-1, dim), positions.reshape(-1)
    values, repeated = attacks.repeated_tokens(flat, N, min_count=s // 50)
    present = attacks.presence(repeated, np.repeat(np.arange(s), k), s, len(values))
    public = attacks.blank_patches(_patches(_images("test", 1000)))
    names = attacks.name_by_cooccurrence(present, public, k)
    groups, _ = attacks.anchor_groups(flat, values, P, extra=N - len(values))
    return repeated, names, groups, truth


@pytest.mark.slow
def test_blank_patches_repeat_one_token_per_position_at_any_width():
    # A blank patch is x W + o_n with x fixed: one exact value per blank position, whatever D.
    for dim in (8, 128):
        repeated, names, _, truth = _blank_anchor_attack(dim, _images("train", 600))
        hit = repeated >= 0
        assert hit.mean() > 0.1
        assert leakage.cluster_purity(repeated[hit], truth[hit]) == 1.0
        # Named from which positions are blank together in public images: most are right.
        assert leakage.position_accuracy(names[repeated[hit]], truth[hit]) > 0.6


def test_blank_anchors_group_every_token_by_position_without_the_head():
    victims = _images("train", 600)
    _, _, wide, truth = _blank_anchor_attack(128, victims)
    assert leakage.cluster_purity(wide, truth) > 0.9  # D > P: exact off the content
    _, _, narrow, truth = _blank_anchor_attack(16, victims)
    assert leakage.cluster_purity(narrow, truth) > 0.3  # D = P: the nearest anchor, still far
    # above what content alone groups
    content = attacks.kmeans(jax.random.key(0), jnp.asarray(
        _patches(victims).reshape(-1, P)[:len(truth)]), k=N, iters=15)
    assert leakage.cluster_purity(content, np.tile(np.arange(N), len(victims))[:len(truth)]) < 0.2


def test_unplaced_constant_patches_take_the_anchors_away():
    # Blank patches sent without their position are one value for every position: no anchor
    # to name or to group around (placed, the same attack groups 51% of tokens here).
    victims = _images("train", 600)
    repeated, names, groups, truth = _blank_anchor_attack(16, victims, "unplaced")
    hit = repeated >= 0
    assert leakage.position_accuracy(names[repeated[hit]], truth[hit]) < CHANCE + 0.05
    _, positions = _payload(16, victims, "unplaced")
    content = np.take_along_axis(_patches(victims), positions[..., None], axis=1)
    content_only = leakage.cluster_purity(attacks.kmeans(
        jax.random.key(0), jnp.asarray(content.reshape(-1, P)), k=N, iters=15), truth)
    assert leakage.cluster_purity(groups, truth) < content_only + 0.08


def test_almost_blank_patches_still_anchor_positions_when_blanks_are_unplaced():
    # A patch a few pixels off the background is x W + o_n with x close to blank: unplacing
    # exact blanks leaves one tight cluster of tokens per position, found without the head.
    victims = _images("train", 600)
    sent, positions = _payload(16, victims, "unplaced")
    s, k, _ = sent.shape
    flat, truth = sent.reshape(-1, 16), positions.reshape(-1)
    values, groups = attacks.near_repeats(flat, np.repeat(np.arange(s), k), N, min_count=3)
    hit = groups >= 0
    assert len(values) >= 45 and hit.mean() > 0.03
    assert leakage.cluster_purity(groups[hit], truth[hit]) > 0.99
    # The unplaced blank token repeats within a sample, so it never forms a group.
    _, which, counts = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    blank = which.ravel() == counts.argmax()
    assert blank.mean() > 0.1 and not np.any(hit & blank)


def _augmented(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two samples of each image, augmented as a site does (flip, shift, contrast 0.2)."""
    return audit.augment_copies(images, 2, privacy_fashion.get_config().site.augment,
                                seed).reshape(-1, 28, 28, 1)


def test_background_removed_every_placed_token_groups_by_position_without_the_head():
    # Blanks unplaced lie on one line through the origin, each sample's at its background
    # level: subtracting it undoes the contrast augmentation, the almost blank tokens then
    # anchor every position, and one content distribution shifted to each anchor groups the
    # placed tokens far better than the nearest anchor does.
    victims = _augmented(_images("train", 600))
    sent, positions = _payload(16, victims, "unplaced")
    s, k, _ = sent.shape
    flat, truth, rows = sent.reshape(-1, 16), positions.reshape(-1), np.repeat(np.arange(s), k)
    blanks, unplaced = attacks.blank_tokens(flat, rows, s)
    content = np.take_along_axis(_patches(victims), positions[..., None], axis=1)
    constant = (content.max(-1) == content.min(-1)).reshape(-1)
    assert np.array_equal(unplaced, constant)
    kernel, _ = attacks.head_matrices(_head(16, 1)[1])
    background = (victims.reshape(s, -1).min(-1) - MEAN) / STD
    # float16's rounding of the tokens (norm ~ 2: steps of 2^-10) bounds the error; a sample
    # that kept no blank patch gets the most common background (black), wrong when its
    # contrast lifted the background
    error = np.abs(blanks - background[:, None] * kernel.sum(0)).max(-1)
    kept_blank = np.bincount(rows[unplaced], minlength=s) > 0
    assert np.all(error[kept_blank] < 1e-2) and kept_blank.mean() > 0.9
    residual = flat - blanks[rows]
    anchors, near = attacks.near_repeats(residual, rows, N, radius=0.2, min_count=3)
    placed = ~unplaced
    nearest, _ = attacks.anchor_groups(residual[placed], anchors, P, extra=N - len(anchors))
    mixture, _ = attacks.shifted_mixture(residual[placed], anchors, N)
    by_nearest = leakage.grouping_accuracy(nearest, truth[placed])
    by_mixture = leakage.grouping_accuracy(mixture, truth[placed])
    assert by_mixture > 0.8 and by_mixture > by_nearest + 0.2
    # Named by which groups hold the object together in a sample, against which positions
    # do in public images (scored up to a mirror, as the flips allow no better).
    groups = np.full(len(flat), -1)
    groups[placed] = mixture
    public = _patches(_augmented(_images("test", 1000), 1)[::2])
    names = attacks.name_by_cooccurrence(attacks.presence(groups, rows, s, N),
                                         public.max(-1) > public.min(-1), k)
    named = audit.mirror_accuracy(names[mixture], truth[placed], N, flips=True)
    assert named > 3 * CHANCE
    # Without offsets to find (a head with no position embedding) the same attack only
    # groups content: the score comes from positions, not from how it is counted.
    head, params = _head(16, 1)
    blind = jax.tree.map(np.asarray, params)
    blind["pos_embed"] = np.zeros_like(blind["pos_embed"])
    tokens = np.asarray(head.clone(constant_patches="unplaced").apply(
        {"params": blind}, (victims - MEAN) / STD)).astype(np.float16).astype(np.float32)
    plain = np.take_along_axis(tokens, positions[..., None], axis=1).reshape(-1, 16)
    blanks, unplaced = attacks.blank_tokens(plain, rows, s)
    residual = plain - blanks[rows]
    anchors, _ = attacks.near_repeats(residual, rows, N, radius=0.2, min_count=3)
    if len(anchors):
        groups, _ = attacks.shifted_mixture(residual[~unplaced], anchors, N)
        assert leakage.grouping_accuracy(groups, truth[~unplaced]) < 0.25


@pytest.mark.slow
def test_unplacing_almost_blank_patches_too_leaves_positions_grouped():
    # A defence that sends faint patches (values spanning at most 0.3) without position as
    # well: fewer tokens carry a position, but those that do still group by position without
    # the head (the next faintest patches anchor each position), and from the true offsets
    # almost all of them: what groups is the offsets added to bounded content, not the blanks.
    victims = _augmented(_images("train", 600))
    head, params = _head(16, 1)
    x = (victims - MEAN) / STD
    found = {}
    for blank_range in (0.0, 0.3):
        unplaced = head.clone(constant_patches="unplaced", blank_range=blank_range / STD)
        tokens = np.asarray(unplaced.apply({"params": params}, x))
        sent, positions = (np.asarray(a) for a in ops.encrypt(jax.random.key(3), jnp.asarray(
            tokens.astype(np.float16).astype(np.float32)), 0.5))
        s, k, _ = sent.shape
        flat, truth, rows = sent.reshape(-1, 16), positions.reshape(-1), np.repeat(np.arange(s), k)
        blank = np.asarray(models.blank_patches(models.patchify(x, PATCH), blank_range / STD))
        has = ~np.take_along_axis(blank, positions, axis=1).reshape(-1)
        blanks, on_line = attacks.blank_tokens(flat, rows, s)
        residual, placed = flat - blanks[rows], ~on_line
        anchors, _ = attacks.near_repeats(residual, rows, N, radius=0.2, min_count=3)
        groups, bound = np.full(len(flat), -1), np.full(len(flat), -1)
        groups[placed], _ = attacks.shifted_mixture(residual[placed], anchors, N)
        offsets = np.asarray(params["pos_embed"])
        bound[placed], _ = attacks.shifted_mixture(residual[placed], offsets, N)
        found[blank_range] = (has.mean(), len(anchors),
                              leakage.grouping_accuracy(groups[has], truth[has]),
                              leakage.grouping_accuracy(bound[has], truth[has]))
    (share, _, grouped, _), (fewer, anchors, still, bound) = found[0.0], found[0.3]
    assert fewer < share - 0.15 and anchors >= 45
    assert grouped > 0.75 and still > 0.5 and bound > 0.9


@pytest.mark.slow
def test_a_substitute_head_fitted_to_the_token_cloud_groups_positions_it_was_never_told():
    # FORA-style: a linear head fitted so that public patches' tokens match the payload's in
    # distribution, then used as the head. It sees no pairing of token and position, so what
    # it groups comes from the position offsets it found: the same attack on a head without
    # position embedding (content alone) groups near chance.
    victims = _augmented(_images("train", 600))
    head, params = _head(16, 1)
    public = _patches(_augmented(_images("test", 1000), 1)[::2])
    sends = public.max(-1) > public.min(-1)  # blanks unplaced: a site sends them unplaced
    prior = attacks.fit_patch_prior(public)
    grouped = {}
    for with_positions in (True, False):
        weights = jax.tree.map(np.asarray, params)
        if not with_positions:
            weights["pos_embed"] = np.zeros_like(weights["pos_embed"])
        tokens = head.clone(constant_patches="unplaced").apply(
            {"params": weights}, (victims - MEAN) / STD)
        sent, positions = (np.asarray(a) for a in ops.encrypt(
            jax.random.key(3), jnp.asarray(tokens, jnp.float16).astype(jnp.float32), 0.5))
        s, k, _ = sent.shape
        flat, truth = sent.reshape(-1, 16), positions.reshape(-1)
        _, unplaced = attacks.blank_tokens(flat, np.repeat(np.arange(s), k), s)
        kernel, offsets, loss = attacks.substitute_head(
            jax.random.key(0), flat[~unplaced], public[sends], np.nonzero(sends)[1], N,
            restarts=1, steps=600)
        assert kernel.shape == (P, 16) and offsets.shape == (N, 16) and np.isfinite(loss)
        scores = attacks.gaussian_scores(attacks.linear_gaussian(kernel, offsets, prior),
                                         flat[~unplaced])
        grouped[with_positions] = leakage.grouping_accuracy(scores.argmax(-1), truth[~unplaced])
    assert grouped[True] > 6 * CHANCE and grouped[True] > 2 * grouped[False]


def test_a_secret_head_is_estimated_from_moments_when_positions_are_known():
    # All tokens in grid order (no permutation): each position's token covariance is
    # W^T S_n W, and public patches give S_n. That pins W down, sign included, without the head.
    victims = _images("train", 400)
    tokens = _tokens(64, 1, victims)
    prior = attacks.fit_patch_prior(_patches(_images("test", 1000)))
    flat, groups = tokens.reshape(-1, 64), np.tile(np.arange(N), len(victims))
    kernel, offsets, labels = attacks.estimate_head(
        jax.random.key(0), flat, groups, attacks.group_moments(flat, groups), np.arange(N),
        prior, steps=600, rounds=0)
    np.testing.assert_array_equal(labels, np.arange(N))
    positions = np.broadcast_to(np.arange(N), (len(victims), N))
    model = attacks.linear_gaussian(kernel, offsets, prior)
    rebuilt = _to_image(attacks.invert_patches(model, tokens, positions), positions, prior.mean)
    mean_image = _to_image(prior.mean[None], np.arange(N)[None], prior.mean)
    assert np.mean(leakage.psnr(rebuilt, victims)) > 20
    assert np.mean(leakage.psnr(np.broadcast_to(mean_image, victims.shape), victims)) < 12
    assert np.mean(leakage.ssim(rebuilt, victims)) > 0.7


def test_a_reused_permutation_gives_positions_away_by_slot():
    victims = _images("train", 200)
    tokens = jnp.asarray(_tokens(128, 1, victims))
    fresh, fresh_positions = audit.make_payload(jax.random.key(4), tokens, "both", 0.5)
    reused, reused_positions = audit.make_payload(jax.random.key(4), tokens, "reused", 0.5)
    slots = np.broadcast_to(np.arange(fresh.shape[1]), fresh.shape[:2])
    assert leakage.cluster_purity(slots, reused_positions) >= 0.95
    assert leakage.cluster_purity(slots, fresh_positions) < 0.2
    # The server can tell, from the payload alone, that a site reused its permutation.
    assert attacks.slot_consistency(reused) > 10 * attacks.slot_consistency(fresh)


def test_linkage_tells_samples_of_one_image_from_samples_of_two():
    victims = _images("train", 100)
    rng = np.random.default_rng(0)
    augment = data.Augment(flip=True, max_shift=2, contrast=0.2)  # the site default
    pairs = np.stack([[augment.image(x, rng) for _ in range(2)] for x in victims])
    tokens = _tokens(128, 1, pairs.reshape(-1, 28, 28, 1)).reshape(100, 2, N, 128)
    sent, _ = ops.encrypt(jax.random.key(5), jnp.asarray(tokens), 0.5)
    a, b = sent[:, 0], sent[:, 1]
    same, other = attacks.linkage_scores(a, b), attacks.linkage_scores(a, jnp.roll(b, 1, 0))
    labels = np.r_[np.ones(100), np.zeros(100)]
    assert evaluation.roc_auc(np.r_[same["chamfer"], other["chamfer"]], labels) > 0.8


# ------------------------------------------------------------------- assignment and payloads


def test_assign_positions_uses_what_the_server_knows_of_order():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(5, 6, 10))
    free = attacks.assign_positions(noise, "free")
    assert all(len(set(row)) == 6 for row in free)            # one position per token
    fixed = attacks.assign_positions(noise, "fixed")
    assert (fixed == fixed[0]).all()                         # one map for every sample
    # Sorted: the evidence says slot 1 sits at 7 and slot 2 at 3, impossible in grid order;
    # the order forces the decision.
    scores = np.full((1, 3, 10), -50.0)
    scores[0, 0, 2], scores[0, 1, 7], scores[0, 2, 3], scores[0, 2, 9] = 0.0, 0.0, 0.0, -1.0
    np.testing.assert_array_equal(attacks.assign_positions(scores, "sorted"), [[2, 7, 9]])
    # All tokens kept in grid order: the order alone gives every position.
    np.testing.assert_array_equal(attacks.assign_positions(np.zeros((2, 10, 10)), "sorted"),
                                  np.broadcast_to(np.arange(10), (2, 10)))
    with pytest.raises(ValueError, match="order"):
        attacks.assign_positions(noise, "shuffled")


@pytest.mark.parametrize("setting", list(audit.SETTINGS))
def test_payloads_send_rows_of_the_tokens_as_their_setting_says(setting):
    tokens = jax.random.normal(jax.random.key(0), (6, N, 8))  # any tokens: a property
    sent, positions = audit.make_payload(jax.random.key(1), tokens, setting, 0.5)
    masked, permuted, reused, _ = audit.SETTINGS[setting]
    np.testing.assert_array_equal(sent, jnp.take_along_axis(tokens, positions[..., None], 1))
    assert sent.shape[1] == (24 if masked else N)
    assert np.all(np.diff(np.asarray(positions), axis=1) > 0) != permuted
    # Only a reused draw (or sending everything in order) gives every sample the same positions.
    assert np.all(positions == positions[0]) == (reused or setting == "none")


# --------------------------------------------------------------------------------- metrics


def test_ssim_of_an_image_with_itself_is_one_and_constant_images_match_the_formula():
    x = _images("test", 3)
    np.testing.assert_allclose(leakage.ssim(x, x), 1.0, atol=1e-12)
    a, b = np.full((28, 28), 0.2), np.full((28, 28), 0.6)
    # No variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    np.testing.assert_allclose(leakage.ssim(a, b), (2 * 0.12 + 1e-4) / (0.04 + 0.36 + 1e-4))
    noisy = np.clip(x + 0.2 * np.random.default_rng(0).normal(size=x.shape), 0, 1)
    assert np.all(leakage.ssim(x, noisy) < 0.9)


def test_psnr_of_a_constructed_case():
    np.testing.assert_allclose(leakage.psnr(np.zeros((2, 8, 8)), np.full((2, 8, 8), 0.1)), 20.0)
    np.testing.assert_allclose(leakage.psnr(np.zeros((8, 8)), np.full((8, 8), 2.0), 4.0), 6.0206,
                               atol=1e-4)
    assert leakage.psnr(np.ones((4, 4)), np.ones((4, 4))) == np.inf


def test_accuracy_purity_and_auc_on_hand_cases():
    assert leakage.position_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    # Group 0 holds positions 5, 5, 7 (2 right); group 1 holds 7, 7 (2 right): 4 of 5.
    assert leakage.cluster_purity([0, 0, 0, 1, 1], [5, 5, 7, 7, 7]) == 0.8
    # One-to-one: group 0 -> 5 (2 tokens), group 1 -> 7 (2): 4 of 5, as purity; but splitting
    # position 7 over two groups gains purity and loses grouping (one group per position).
    assert leakage.grouping_accuracy([0, 0, 0, 1, 1], [5, 5, 7, 7, 7]) == 0.8
    assert leakage.cluster_purity([0, 0, 1, 2, 3], [5, 5, 7, 7, 7]) == 1.0
    assert leakage.grouping_accuracy([0, 0, 1, 2, 3], [5, 5, 7, 7, 7]) == 0.6
    assert leakage.grouping_accuracy([-1, 0, 0, 1, 1], [5, 5, 5, 7, 7]) == 0.8  # -1: wrong
    assert evaluation.roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert evaluation.roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert evaluation.roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        leakage.position_accuracy([1, 2], [1])


# ---------------------------------------------------------------------------------- study


def test_points_attack_the_token_width_the_sites_send():
    # D is the head's width: the body's by default, config.model.head_dim when it is set.
    config = privacy_fashion.get_config("tiny")
    width = models.preset(config.model.size)["dim"]
    assert {p["dim"] for p in audit.points(config) if p["sweep"] != "dim"} == {width}
    config.model.head_dim = 16
    assert {p["dim"] for p in audit.points(config) if p["sweep"] != "dim"} == {16}


def test_study_refuses_to_attack_with_the_images_it_attacks(tmp_path):
    config = privacy_fashion.get_config("tiny")
    config.privacy.public_split = "train"
    with pytest.raises(ValueError, match="must not hold the images it attacks"):
        audit.run_privacy(config, tmp_path)


@pytest.mark.slow
def test_run_privacy_tiny_writes_json_markdown_and_pngs(tmp_path):
    config = privacy_fashion.get_config("tiny")
    summary = audit.run_privacy(config, tmp_path)
    results = tmp_path / "results"
    written = json.loads((results / "privacy.json").read_text())
    assert len(written["rows"]) == 2 * len(audit.points(config))
    assert {r["head"] for r in written["rows"]} == set(audit.HEADS)
    assert written["answer"]["question"] and summary["answer"] == written["answer"]
    table = (results / "privacy.md").read_text()
    assert "| point | head |" in table and "## Answer" in table
    for head in audit.HEADS:
        with Image.open(results / f"reconstructions_{head}.png") as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
