"""The privacy-utility frontier: settings as config overrides, and a tiny real run from the CLI
that writes every setting's accuracy beside its attacks, then resumes without rerunning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from configs import frontier_fashion
from smsd_jax import models
from experiments import frontier

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_change_exactly_the_keys_named_with_their_types():
    config = frontier_fashion.get_config()
    c = frontier.setting_config(config, "model.head_dim=16 site.token_noise=0.5,"
                                        "model.constant_patches=unplaced site.permute=false")
    assert (c.model.head_dim, c.site.token_noise) == (16, 0.5)
    assert isinstance(c.model.head_dim, int) and c.site.permute is False
    assert c.model.constant_patches == "unplaced"
    assert (config.model.head_dim, config.site.token_noise) == (0, 0.0)  # a copy changed
    assert frontier.setting_config(config, "").to_dict() == config.to_dict()


@pytest.mark.parametrize("text, match", [
    ("model.head_dim", "write section.key=value pairs"),
    ("model.head_width=16", "which the config does not have"),
    ("model.head_dim=wide", "is not a int like its current value 0"),
    ("site.permute=maybe", "is not a bool"),
])
def test_bad_overrides_name_the_pair_and_what_to_write(text, match):
    with pytest.raises(ValueError, match=match):
        frontier.setting_config(frontier_fashion.get_config(), text)


def test_plan_refuses_repeated_names():
    config = frontier_fashion.get_config()
    config.frontier.settings = (("a", ""), ("a", "model.head_dim=8"))
    with pytest.raises(ValueError, match="repeats a name"):
        frontier.plan(config)


def test_audit_point_follows_the_setting():
    config = frontier.setting_config(frontier_fashion.get_config(),
                                     "model.head_dim=16 site.token_noise=0.5 site.keep=0.25")
    point = frontier.audit_point(config)
    assert (point["dim"], point["keep"], point["setting"]) == (16, 0.25, "both")
    assert point["noise_std"] == pytest.approx(0.5 * (1 + 0.5 ** 2) ** 0.5, rel=0.2)
    wide = frontier.audit_point(frontier_fashion.get_config())
    assert wide["dim"] == models.preset("small4")["dim"] and wide["noise_std"] == 0.0
    # The Gaussian mechanism's point is attacked with its own noise, not just clipped.
    dp = frontier.audit_point(frontier.setting_config(
        frontier_fashion.get_config(), "site.dp_clip=4.0 site.dp_noise_multiplier=7.0"))
    assert (dp["dp_clip"], dp["noise_std"]) == (4.0, 28.0)


@pytest.mark.slow
def test_tiny_frontier_from_the_cli_writes_points_and_resumes(tmp_path):
    command = [sys.executable, "-m", "launch.main", "--config=configs/frontier_fashion.py:tiny",
               "--mode=frontier", f"--workdir={tmp_path}"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "frontier.json").read_text())
    settings = frontier_fashion.get_config("tiny").frontier.settings
    assert [p["name"] for p in summary["points"]] == [name for name, _ in settings]
    narrow, wide = summary["points"][1], summary["points"][0]
    assert narrow["token_width"] == 8 and wide["token_width"] == 32
    assert narrow["payload_bytes_per_image"] * 4 == wide["payload_bytes_per_image"]
    for point in summary["points"]:
        assert 0 <= point["accuracy"]["linear 0.5"] <= 1
        assert 0 <= point["accuracy"]["finetune 0.5"] <= 1
        assert 0 <= point["secret"]["position_accuracy"] <= 1
        # A public head gives positions away even at width 8 with noise (10x chance here).
        assert point["secret"]["psnr"] > 0 and point["public"]["position_accuracy"] > 0.2
    table = (results / "frontier.md").read_text()
    assert "| d8_noise | `model.head_dim=8 site.token_noise=0.5` | 8 |" in table
    with Image.open(results / "frontier.png") as image:
        image.verify()
    runs = sorted((tmp_path / "frontier").glob("*/run.json"))
    assert len(runs) == 2
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, kept" in again.stdout
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert json.loads((results / "frontier.json").read_text())["points"] == summary["points"]
    # Another machine takes the settings the results record instead of running them again.
    elsewhere = subprocess.run(
        [*command[:-1], f"--workdir={tmp_path / 'elsewhere'}",
         f"--config.frontier.resume_from={results / 'frontier.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert elsewhere.stdout.count("done before, kept") == 2
    taken = json.loads((tmp_path / "elsewhere" / "results" / "frontier.json").read_text())
    assert taken["points"] == summary["points"]
