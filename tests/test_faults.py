"""Fault injection: damaged files, killed processes, bad input and unhealthy training.

Every case uses real files and real processes; each test fails if its guarantee breaks.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from smsd_jax import files, payload, server
from smsd_jax.layout import Layout
from tests.test_pipeline import ROOT, _cli, _config, _encode


def _data_files(folder: Path) -> list[Path]:
    """The array data files of an Orbax checkpoint (one alone may hold only unused bytes)."""
    files = [f for f in folder.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, f"no array data files under {folder}"
    return files


def _flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_payloads(tmp_path, config, damage: str) -> tuple[Path, Path]:
    """A good payload (site_a) and one (site_b) whose first shard is damaged."""
    good, _, _ = _encode(tmp_path, config, "site_a", n=32)
    bad, _, _ = _encode(tmp_path, config, "site_b", n=32, site_id=1)
    victim = bad / payload.shard_name(0)
    if damage == "flip":
        _flip_bytes(victim)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    return good, bad


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_damaged_shard_is_named(tmp_path, damage):
    config = _config()
    good, bad = _damaged_payloads(tmp_path, config, damage)
    with pytest.raises(ValueError, match=r"site_b \(site 1\): shard_00000"):
        server.run_server(config, [good, bad], tmp_path / "server")


@pytest.mark.slow
def test_damaged_site_can_be_skipped(tmp_path):
    config = _config()
    good, bad = _damaged_payloads(tmp_path, config, "flip")
    config.server.skip_bad_sites = True
    with pytest.warns(UserWarning, match="skipping payload .*site_b"):
        out = server.run_server(config, [good, bad], tmp_path / "server_skip")
    assert out["images"] == 32


def test_payload_of_another_format_version_is_refused(tmp_path):
    a, _, _ = _encode(tmp_path, _config(), "site_a", n=32)
    manifest = payload.read_manifest(a)
    files.write_json(a / payload.MANIFEST, {**manifest, "format": "smsd-payload/0"})
    with pytest.raises(ValueError, match="not a payload of this project"):
        payload.read_manifest(a)
    # The Orbax shards of before: refused, saying how to get the current format.
    files.write_json(a / payload.MANIFEST, {**manifest, "format": "smsd-payload/1"})
    with pytest.raises(ValueError, match="format smsd-payload/1 .*encode the site again"):
        server.run_server(_config(), [a], tmp_path / "server")


@pytest.mark.slow
def test_site_killed_mid_encoding_resumes_to_the_same_payload(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    overrides = ["--config.site.shard_size=64", "--config.site.batch_size=32",
                 "--config.data.subset=2048", "--config.data.num_sites=1",
                 "--config.site.secret_seed=5", "--config.consortium_seed=3"]
    runs = {}
    for name in ("ref", "killed"):
        workdir = tmp_path / name
        subprocess.run(_cli("--mode=init", *overrides, workdir=workdir), cwd=ROOT, env=env,
                       check=True, capture_output=True)
        runs[name] = workdir
    subprocess.run(_cli("--mode=site", *overrides, workdir=runs["ref"]), cwd=ROOT, env=env,
                   check=True, capture_output=True)
    out = runs["killed"] / "payloads" / "site_0"
    proc = subprocess.Popen(_cli("--mode=site", *overrides, workdir=runs["killed"]), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "site finished before it could be killed"
        if (out / payload.MANIFEST).exists() and len(payload.read_manifest(out)["shards"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = payload.read_manifest(out)
    assert not killed["complete"]
    # What is on disk is complete shards only: each one listed reads and checks.
    assert len(payload.read_tokens(out)) == sum(s["num_images"] for s in killed["shards"])
    subprocess.run(_cli("--mode=site", *overrides, workdir=runs["killed"]), cwd=ROOT, env=env,
                   check=True, capture_output=True)
    ref = runs["ref"] / "payloads" / "site_0"
    assert payload.read_manifest(out)["complete"]
    np.testing.assert_array_equal(payload.read_tokens(out), payload.read_tokens(ref))


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = _config()
    config.server.update(checkpoint_every=4, keep_checkpoints=3)
    pay, _, _ = _encode(tmp_path, config, "payload", n=64)
    config.server.epochs = 3.0  # 4 steps an epoch: checkpoints at 4, 8, 12
    first = server.run_server(config, [pay], tmp_path / "ref")
    ckpts = Layout(tmp_path / "ref").checkpoints
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    for f in _data_files(ckpts / str(latest) / "state"):
        _flip_bytes(f)
    config.server.epochs = 4.0
    with pytest.warns(UserWarning, match=f"checkpoint .*{latest} is damaged"):
        out = server.run_server(config, [pay], tmp_path / "ref")
    assert out["steps"] == 16 and first["steps"] == 12
    assert (ckpts / f"{latest}.damaged").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_step_and_checkpoint(tmp_path):
    config = _config()
    config.server.update(lr=1e30, min_lr=1e30, clip_grad=1e30, checkpoint_every=1)
    pay, _, _ = _encode(tmp_path, config, "payload", n=64)
    with pytest.raises(FloatingPointError,
                       match=r"non-finite .* at step \d+.*last good checkpoint"):
        server.run_server(config, [pay], tmp_path / "server")


@pytest.mark.slow
def test_collapse_is_warned_about(tmp_path):
    config = _config()
    # A teacher temperature this high makes the targets uniform: collapse from the start.
    config.server.update(teacher_temp=100.0, teacher_temp_final=100.0, collapse_patience=3)
    pay, _, _ = _encode(tmp_path, config, "payload", n=64)
    with pytest.warns(UserWarning, match="collapsed \\(uniform\\)"):
        server.run_server(config, [pay], tmp_path / "server")


@pytest.mark.parametrize("override,message", [
    ("--config.site.keep=1.5", "config.site.keep=1.5: must be a fraction in (0, 1]"),
    ("--config.site.keep=0.01", "keeps no token of the 49 patches"),
    ("--config.server.batch_size=0", "config.server.batch_size=0"),
    ("--config.model.patch_size=5", "must divide data.image_size=28"),
    ("--config.data.source=imagenet", "config.data.source='imagenet'"),
    ("--config.model.head_dim=-1", "config.model.head_dim=-1: must be 0"),
    ("--config.model.blank_range=1.5", "config.model.blank_range=1.5: must be in [0, 1)"),
])
@pytest.mark.slow
def test_bad_config_is_refused_before_any_work(tmp_path, override, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(_cli("--mode=init", override, workdir=tmp_path / "w"), cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


def test_server_refuses_batch_not_divisible_by_devices(tmp_path):
    config = _config()
    config.server.batch_size = 12  # 8 simulated devices
    pay, _, _ = _encode(tmp_path, config, "payload", n=32)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        server.run_server(config, [pay], tmp_path / "server")


def test_empty_site_is_refused_before_encoding(tmp_path):
    from smsd_jax import consortium, data, site
    config = _config()
    consortium.init_head(config, tmp_path / "head", secret_seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        site.run_site(config, 0, data.fashion_mnist("train"), np.array([], np.int64),
                      tmp_path / "head", tmp_path / "payload", secret_seed=1)
    assert not (tmp_path / "payload").exists()


@pytest.mark.slow
def test_site_refuses_a_head_that_is_not_the_consortiums(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workdir = tmp_path / "w"
    subprocess.run(_cli("--mode=init", workdir=workdir), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = subprocess.run(_cli("--mode=site", "--head_fingerprint=0123456789abcdef",
                                 workdir=workdir), cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "is not the consortium's 0123456789abcdef" in result.stderr
    assert not (workdir / "payloads").exists()
