"""The single round on real data: payload contents, manifest checks, server resume, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from configs import base
from smsd_jax import (consortium, data, export, files, models, payload, server,
                      site)

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 96


def _config(**site_overrides):
    config = base.get_config("tiny")
    config.site.update(site_overrides)
    return config


def _encode(tmp_path, config, name, head_name="head", head_seed=0, n=N_IMAGES, site_id=0):
    head_dir = tmp_path / head_name
    if not head_dir.exists():
        consortium.init_head(config, head_dir, secret_seed=head_seed)
    source = data.fashion_mnist("train")
    site.run_site(config, site_id, source, np.arange(n), head_dir, tmp_path / name,
                  secret_seed=7)
    return tmp_path / name, head_dir, source


def test_payload_holds_only_encrypted_tokens(tmp_path):
    config = _config(augment=dict(flip=False, max_shift=0, contrast=0.0))
    # Blank patches placed, so that every sent token has one position to find below.
    config.model.constant_patches = "placed"
    out, head_dir, source = _encode(tmp_path, config, "payload")
    manifest = payload.read_manifest(out)
    allowed = {"format", "site_id", "num_images", "num_samples", "tokens", "dim", "dtype",
               "head_fingerprint", "keep", "num_patches", "keys", "shards", "complete"}
    assert set(manifest) == allowed
    assert manifest["complete"] and manifest["num_images"] == N_IMAGES
    # Every file is the manifest or a shard; a shard's records are one image's tokens each,
    # of exactly the bytes M x K x D float16 values take.
    names = sorted(f.name for f in out.iterdir())
    assert names == [payload.MANIFEST, *(s["name"] for s in manifest["shards"])]
    m, k, d = manifest["num_samples"], manifest["tokens"], manifest["dim"]
    reader = ArrayRecordReader(str(out / manifest["shards"][0]["name"]))
    records = reader.read_all()
    assert {len(r) for r in records} == {m * k * d * 2}
    tokens = payload.read_tokens(out)
    assert tokens.shape == (N_IMAGES, m, k, d) and tokens.dtype == np.float16
    np.testing.assert_array_equal(np.frombuffer(records[0], np.float16).reshape(m, k, d),
                                  tokens[0])
    assert k < manifest["num_patches"]  # masked: fewer tokens than patches
    # Without augmentation, each sent token is exactly a head token of its own image, at a
    # distinct hidden position, and the order is shuffled. Only a test that holds the head and
    # the images can find the positions.
    head, params, _ = consortium.load_head(head_dir)
    images = source.images[:N_IMAGES].astype(np.float32) / 255
    pixels = (images - config.data.mean) / config.data.std
    grid = np.asarray(head.apply({"params": params}, pixels))  # [n, N, D]
    # Tokens, not pixel patches, even at the default width of a patch's values.
    patches = np.asarray(models.patchify(jnp.asarray(pixels), config.model.patch_size))
    assert d == patches.shape[-1] and np.abs(grid - patches).mean() > 0.1
    for sample in range(m):
        sent = tokens[:, sample].astype(np.float32)
        dist = np.linalg.norm(sent[:, :, None] - grid[:, None], axis=-1)  # [n, K, N]
        np.testing.assert_allclose(dist.min(-1), 0.0, atol=0.02)  # float16 rounding only
        positions = dist.argmin(-1)
        assert all(len(set(p)) == k for p in positions)
        assert np.mean([np.all(np.diff(p) > 0) for p in positions]) < 0.05


@pytest.mark.slow
def test_payload_bytes_follow_head_dim(tmp_path):
    default, narrow = _config(), _config()
    default.model.head_dim = 0  # the body's width
    narrow.model.head_dim = 8
    wide, _, _ = _encode(tmp_path, default, "wide", head_name="head_wide", n=32)
    thin, _, _ = _encode(tmp_path, narrow, "thin", head_name="head_thin", n=32)
    wide_tokens, thin_tokens = payload.read_tokens(wide), payload.read_tokens(thin)
    width = wide_tokens.shape[-1]
    assert width == 32 and thin_tokens.shape == wide_tokens.shape[:-1] + (8,)
    assert payload.read_manifest(thin)["dim"] == 8
    assert thin_tokens.nbytes * width == wide_tokens.nbytes * 8
    # A server configured for the body's width refuses them, naming the key to set.
    with pytest.raises(ValueError, match="head_dim=0 takes tokens of width 32 but the "
                                         "payloads' tokens have width 8"):
        server.run_server(default, [thin], tmp_path / "server")


def test_unplaced_head_round_trips_and_changes_the_fingerprint(tmp_path):
    """The rule for constant patches is part of the head: written, read back, and in the
    fingerprint, so a site that sends placed blanks is refused beside unplaced ones."""
    placed, unplaced = _config(), _config()  # unplaced: the default
    placed.model.constant_patches = "placed"
    a, head_a, _ = _encode(tmp_path, placed, "site_a", head_name="head_a", n=32)
    b, head_b, _ = _encode(tmp_path, unplaced, "site_b", head_name="head_b", n=32, site_id=1)
    (ha, pa, ma), (hb, pb, mb) = consortium.load_head(head_a), consortium.load_head(head_b)
    assert (ha.constant_patches, hb.constant_patches) == ("placed", "unplaced")
    assert mb["constant_patches"] == "unplaced"
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    assert ma["fingerprint"] != mb["fingerprint"]
    manifests = {str(a): payload.read_manifest(a), str(b): payload.read_manifest(b)}
    with pytest.raises(ValueError, match=r"site_b \(site 1\) has head_fingerprint"):
        payload.check_agree(manifests)
    # Blank patches: many exact repeats of one token per blank position when placed, a few
    # position-free values when not.
    def repeats(path):
        tokens = payload.read_tokens(path)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        _, counts = np.unique(tokens, axis=0, return_counts=True)
        return np.sort(counts)[::-1]
    placed_counts, unplaced_counts = repeats(a), repeats(b)
    assert (placed_counts >= 5).sum() > 10
    assert unplaced_counts[0] > placed_counts[0]  # the blanks of every position in one value
    assert (unplaced_counts >= 5).sum() < (placed_counts >= 5).sum()


def test_a_heads_blank_range_round_trips_and_changes_the_fingerprint(tmp_path):
    """`model.blank_range` (in [0, 1] pixels) is the head's rule in its own units (normalised
    pixels): written, read back, and in the fingerprint, so sites with other rules disagree."""
    config = _config()
    fingerprints = {}
    for blank_range in (0.0, 0.3):
        config.model.blank_range = blank_range
        path = tmp_path / f"head_{blank_range}"
        fingerprints[blank_range] = consortium.init_head(config, path, secret_seed=0)
        head, _, meta = consortium.load_head(path)
        assert head.blank_range == pytest.approx(blank_range / config.data.std)
        assert meta["fingerprint"] == fingerprints[blank_range]
        assert head == models.head_from_config(config)
    assert fingerprints[0.0] != fingerprints[0.3]


def test_payloads_from_different_heads_are_refused_naming_the_site(tmp_path):
    config = _config()
    a, _, _ = _encode(tmp_path, config, "site_a", head_name="head_a", head_seed=0, n=32)
    b, _, _ = _encode(tmp_path, config, "site_b", head_name="head_b", head_seed=1, n=32,
                      site_id=1)
    manifests = {str(a): payload.read_manifest(a), str(b): payload.read_manifest(b)}
    with pytest.raises(ValueError, match=r"site_b \(site 1\) has head_fingerprint"):
        payload.check_agree(manifests)


def test_payloads_with_other_keep_are_refused(tmp_path):
    a, _, _ = _encode(tmp_path, _config(), "site_a", n=32)
    b, _, _ = _encode(tmp_path, _config(keep=0.75), "site_b", n=32, site_id=1)
    with pytest.raises(ValueError, match="tokens="):
        server.run_server(_config(), [a, b], tmp_path / "server")


def test_incomplete_payload_is_refused(tmp_path):
    a, _, _ = _encode(tmp_path, _config(), "site_a", n=32)
    manifest = payload.read_manifest(a)
    files.write_json(a / payload.MANIFEST, {**manifest, "complete": False})
    with pytest.raises(ValueError, match="incomplete"):
        payload.check_agree({str(a): payload.read_manifest(a)})


def test_site_encoding_is_reproducible_and_resumes(tmp_path):
    config = _config(shard_size=32, batch_size=16)
    full, _, _ = _encode(tmp_path, config, "full")
    # A site that stopped after its first shard continues with identical results.
    part, _, _ = _encode(tmp_path, config, "part")
    manifest = payload.read_manifest(part)
    files.write_json(part / payload.MANIFEST,
                          {**manifest, "shards": manifest["shards"][:1], "complete": False})
    for shard in manifest["shards"][1:]:
        (part / shard["name"]).unlink()
    _encode(tmp_path, config, "part")
    np.testing.assert_array_equal(payload.read_tokens(part), payload.read_tokens(full))
    assert len(payload.read_manifest(part)["shards"]) == N_IMAGES // 32


def test_encoding_a_complete_payload_again_changes_nothing(tmp_path):
    # 40 images in batches of 16: the last batch is short, and a complete payload must not
    # take it again.
    config = _config(shard_size=32, batch_size=16)
    out, _, _ = _encode(tmp_path, config, "payload", n=40)
    tokens, manifest = payload.read_tokens(out), payload.read_manifest(out)
    _encode(tmp_path, config, "payload", n=40)
    assert payload.read_manifest(out) == manifest
    np.testing.assert_array_equal(payload.read_tokens(out), tokens)


@pytest.mark.slow
def test_server_on_eight_devices_equals_one(tmp_path):
    config = _config()
    pay, _, _ = _encode(tmp_path, config, "payload", n=64)
    bodies = []
    for n in (1, 8):
        config.server.num_devices = n
        out = server.run_server(config, [pay], tmp_path / f"server{n}")
        bodies.append(export.load_body(out["body"])[1])
    for a, b in zip(jax.tree.leaves(bodies[0]), jax.tree.leaves(bodies[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _cli(*args, workdir):
    return [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny",
            f"--workdir={workdir}", *args]


@pytest.mark.slow
def test_server_resumes_after_kill_and_matches_uninterrupted(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workdir = tmp_path / "run"
    overrides = ["--config.server.epochs=5", "--config.server.checkpoint_every=10"]
    for mode in ("init", "site"):
        subprocess.run(_cli(f"--mode={mode}", *overrides, workdir=workdir), cwd=ROOT, env=env,
                       check=True, capture_output=True)
    # Uninterrupted reference, on a copy of the same payload.
    ref = tmp_path / "ref"
    payload_dir = workdir / "payloads" / "site_0"
    server_cmd = lambda wd: _cli("--mode=server", *overrides, f"--payloads={payload_dir}",
                                 workdir=wd)
    subprocess.run(server_cmd(ref), cwd=ROOT, env=env, check=True, capture_output=True)
    # Killed (SIGKILL) once its second checkpoint is on disk, then run again.
    proc = subprocess.Popen(server_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (workdir / "server" / "checkpoints" / "20").exists() and time.time() < deadline:
        assert proc.poll() is None, "server ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "server" / "body").exists()
    result = subprocess.run(server_cmd(workdir), cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True)
    assert "resumed from step" in result.stdout
    ref_body, resumed_body = (export.load_body(d / "server" / "body")[1] for d in (ref, workdir))
    for a, b in zip(jax.tree.leaves(ref_body), jax.tree.leaves(resumed_body)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(l)["step"] for l in (workdir / "server" / "metrics.jsonl").open()]
    assert steps == sorted(set(steps))  # each step logged once, in order


@pytest.mark.slow
def test_simulate_runs_the_whole_round_from_the_cli(tmp_path):
    # With a narrow head: tokens of 8 values (half the 16 of a patch) into the tiny body of
    # width 32 through its stem, in every stage, the body export and the downstream model
    # (head -> stem -> body -> tail). The study's, the curve's and the report's tests run the
    # round at the default head width.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workdir = tmp_path / "sim"
    result = subprocess.run(_cli("--mode=simulate", "--config.model.head_dim=8",
                                 workdir=workdir),
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert payload.read_manifest(workdir / "payloads" / "site_0")["dim"] == 8
    body, params, meta = export.load_body(workdir / "server" / "body")
    assert (meta["dim"], meta["token_dim"], body.input_dim) == (32, 8, 8)
    assert np.shape(params["stem"]["kernel"]) == (8, 32)
    summary = json.loads((workdir / "results" / "simulate.json").read_text())
    names = [r["name"] for r in summary["results"]]
    assert names == ["raw pixels", "random body", "SMSD body"]
    smsd = summary["results"][-1]
    for probe in ("linear", "knn", "finetune"):
        for metrics in smsd[probe].values():
            assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    assert len(summary["payload_bytes_per_site"]) == 4
    assert sum(summary["images_per_site"]) == 256
    assert "| SMSD body |" in result.stdout
    # The server's entropy is logged against ln(out_dim), so collapse is visible.
    row = json.loads((workdir / "server" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["teacher_entropy"] <= row["max_entropy"] + 1e-6

    # Then every site on its own data: the same body, each site's labels and held-out images.
    result = subprocess.run(_cli("--mode=downstream_per_site", "--config.model.head_dim=8", workdir=workdir),
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "results" / "sites.json").read_text())
    assert [s["site"] for s in report["sites"]] == [0, 1, 2, 3]
    for s, images in zip(report["sites"], summary["images_per_site"]):
        assert s["images"] == images and sum(s["classes"]) == images
        assert 0 < s["local_test"] < images
        assert [r["name"] for r in s["results"]] == names
        for r in s["results"]:
            assert set(r["local"]) == ({"linear", "knn"} if r["name"] == "raw pixels" else
                                       {"linear", "knn", "finetune"})
    mean = report["summary"]["local"]["SMSD body"]["linear"]["0.5"]
    per_site = [100 * s["results"][2]["local"]["linear"]["0.5"]["accuracy"]
                for s in report["sites"]]
    assert mean["per_site"] == pytest.approx(per_site)
    assert mean["mean"] == pytest.approx(np.mean(per_site))
    text = (workdir / "results" / "sites.md").read_text()
    assert "Tested on the site's own held-out images" in text and "| mean over sites |" in text
    # Every probe has its column (fine-tuning too, which raw pixels lack), bodies in order.
    assert "| fine-tune 50% |" in text and text.index("| raw pixels |") < text.index("| SMSD")
