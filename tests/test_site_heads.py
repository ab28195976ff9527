"""Per-site heads (`config.model.per_site_heads`): every site its own secret head, a stem per
site at the server, and what one leaked head then reveals; through the real CLI
(`--mode=per_site_heads`) on Fashion-MNIST, at the tests' size.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import per_site_heads
from smsd_jax import consortium, downstream, export, files, payload, server, site
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from experiments import per_site_heads as site_heads
from tests.test_pipeline import ROOT

pytestmark = pytest.mark.slow  # one real run (the module fixture) serves every test

SITES = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("heads")
    subprocess.run([sys.executable, "-m", "launch.main",
                    "--config=configs/per_site_heads.py:tiny", "--mode=per_site_heads",
                    f"--workdir={workdir}"], cwd=ROOT, check=True, capture_output=True)
    config = per_site_heads.get_config("tiny")
    config.model.per_site_heads = True
    return config, Layout(workdir), files.read_json(workdir / "results" / "per_site_heads.json")


def test_each_site_encodes_with_its_own_head(run):
    config, layout, _ = run
    per_site = Layout(layout.root / "per_site")
    assert not per_site.head.exists()  # no consortium head at all
    fingerprints = []
    for k in range(SITES):
        _, _, meta = consortium.load_head(per_site.site_head(k))
        manifest = payload.read_manifest(per_site.payload(k))
        assert payload.heads(manifest) == payload.PER_SITE
        assert manifest["head_fingerprint"] == meta["fingerprint"]
        fingerprints.append(meta["fingerprint"])
    assert len(set(fingerprints)) == SITES
    shared = payload.read_manifest(Layout(layout.root / "shared").payload(0))
    assert payload.heads(shared) == payload.SHARED and "heads" not in shared


def test_the_body_has_a_stem_per_site_and_each_site_gets_its_own(run):
    config, layout, _ = run
    per_site = Layout(layout.root / "per_site")
    body, params, meta = export.load_body(per_site.body)
    assert body.site_stems == meta["site_stems"] == SITES and meta["site_ids"] == [0, 1, 2, 3]
    assert params["stem"]["kernel"].shape[0] == SITES
    tokens = jnp.asarray(payload.read_tokens(per_site.payload(2))[:4, 0], jnp.float32)
    many, _ = body.apply({"params": params}, tokens, sites=jnp.full((4,), 2))
    head_dir, own, own_params = downstream.at_site(config, per_site, body, params, 2)
    assert head_dir == per_site.site_head(2) and own.site_stems == 0
    np.testing.assert_allclose(own.apply({"params": own_params}, tokens)[0], many, atol=1e-5)
    # A site whose head is gone cannot fine-tune a fresh one: it would not be its head.
    moved = per_site.site_head(3).with_name("head.moved")
    per_site.site_head(3).rename(moved)
    try:
        with pytest.raises(SMSDError, match="site 3 has no head"):
            downstream.at_site(config, per_site, body, params, 3)
    finally:
        moved.rename(per_site.site_head(3))
    shared = config.copy_and_resolve_references()
    shared.model.per_site_heads = False
    with pytest.raises(SMSDError, match="per_site_heads=False"):
        downstream.at_site(shared, per_site, body, params, 0)


def test_a_leaked_head_opens_its_own_site_only(run):
    _, _, summary = run
    per_site, shared = (summary["rounds"][name]["leaks"] for name in ("per_site", "shared"))
    chance = per_site["chance"]
    accuracy = lambda rows: np.array([[c["position_accuracy"] for c in r] for r in rows])
    # One shared head: leaked, it opens every site's payload.
    assert accuracy(shared["direct"]).shape == (1, SITES)
    assert accuracy(shared["direct"]).min() > 10 * chance
    for attack in site_heads.ATTACKS:
        found = accuracy(per_site[attack])
        assert found.shape == (SITES, SITES)
        assert np.diag(found).min() > 10 * chance, attack
        assert found[~np.eye(SITES, dtype=bool)].max() < 3 * chance, attack
    psnr = np.array([[c["psnr"] for c in r] for r in per_site["direct"]])
    mean_image = np.array([m["psnr"] for m in per_site["mean_image"]])
    # Its own site: better than the public mean image over the sites (a site's PSNR over the
    # tests' few images is noisy: one of four sites may fall below it, whatever the key).
    assert np.diag(psnr).mean() > mean_image.mean() + 0.3
    assert (psnr[~np.eye(SITES, dtype=bool)] < np.repeat(mean_image, SITES - 1)).all()
    for name in ("shared", "per_site"):  # each round's trained and random body, same head
        assert set(summary["rounds"][name]["random"]) == set(summary["rounds"][name]["accuracy"])
    accuracies = summary["rounds"]["per_site"]["site_accuracy"]
    assert len(accuracies) == SITES and all(0 < a["linear 0.5"] <= 100 for a in accuracies)


def test_the_report_is_rebuilt_the_same_from_its_json(run):
    _, layout, summary = run
    written = (layout.results / "per_site_heads.md").read_text()
    assert site_heads.markdown(summary) == written  # JSON sorts keys; the tables must not
    assert written.index("shared heads") < written.index("per-site heads")
    assert (layout.results / "per_site_heads.png").stat().st_size > 10_000


def test_the_attacked_truth_is_checked_against_the_payload(run):
    # The attack's truth (images, positions) is rebuilt from the site's key: a wrong key is
    # caught, not scored.
    config, layout, _ = run
    per_site = Layout(layout.root / "per_site")
    victim = site_heads.victim(config, per_site, 1, 8)
    assert victim.sent.shape[0] == victim.positions.shape[0] == victim.images.shape[0] == 16
    wrong = config.copy_and_resolve_references()
    wrong.site.secret_seed += 1
    with pytest.raises(SMSDError, match="is not what its images and key give"):
        site_heads.victim(wrong, per_site, 1, 8)


def test_the_server_and_the_payloads_agree_on_the_kind_of_head(run):
    config, layout, _ = run
    shared = payload.read_manifest(Layout(layout.root / "shared").payload(0))
    mine = payload.read_manifest(Layout(layout.root / "per_site").payload(1))
    with pytest.raises(SMSDError, match="heads='per_site'"):
        payload.check_agree({"a": shared, "b": mine})
    with pytest.raises(SMSDError, match="encoded with per_site heads but config.model"):
        wrong = config.copy_and_resolve_references()
        wrong.model.per_site_heads = False
        server.check_heads(wrong, mine)
    # Per-site payloads need not share a fingerprint; everything else still must agree.
    other = payload.read_manifest(Layout(layout.root / "per_site").payload(2))
    payload.check_agree({"a": mine, "b": other})
    with pytest.raises(SMSDError, match="num_samples"):
        payload.check_agree({"a": mine, "b": {**other, "num_samples": 3}})


def test_stem_map_carries_one_sites_tokens_into_anothers_space():
    # Stems t -> t K + c: the map that the two stems agree through, exactly when the victim's
    # stem output lies in the span of the leaked one's (here: K_v = M K_l, c_v = c_l + r K_l).
    rng = np.random.default_rng(0)
    k_leaked, mix = rng.standard_normal((8, 32)), rng.standard_normal((8, 8))
    c_leaked = rng.standard_normal(32)
    stems = {"kernel": np.stack([mix @ k_leaked, k_leaked]),
             "bias": np.stack([c_leaked + rng.standard_normal(8) @ k_leaked, c_leaked])}
    a, b = site_heads.stem_map(stems, victim_site=0, leaked_site=1)
    t = rng.standard_normal((5, 8))
    np.testing.assert_allclose((t @ a + b) @ k_leaked + stems["bias"][1],
                               t @ stems["kernel"][0] + stems["bias"][0], atol=1e-8)


def test_per_site_heads_need_a_stem():
    from smsd_jax import validate
    config = per_site_heads.get_config("tiny")
    config.model.update(per_site_heads=True, head_dim=0)
    with pytest.raises(SMSDError, match="model.per_site_heads"):
        validate.check_config(config)


def test_a_sites_head_is_drawn_once_from_the_seed_and_the_site(tmp_path):
    config = per_site_heads.get_config("tiny")
    config.model.per_site_heads = True
    layout = Layout(tmp_path)
    heads = [consortium.site_head(config, layout, k) for k in (0, 1)]
    weights = [consortium.load_head(h)[1]["patch_embed"]["kernel"] for h in heads]
    assert not np.allclose(weights[0], weights[1])
    again = Layout(tmp_path / "again")
    np.testing.assert_array_equal(
        consortium.load_head(consortium.site_head(config, again, 1))[1]["patch_embed"]["kernel"],
        weights[1])
    assert site.secret_seed(config, layout, 1) == config.site.secret_seed + 1
