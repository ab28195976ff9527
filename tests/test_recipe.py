"""The recipe's ablations (`--mode=recipe`) on Fashion-MNIST at the tests' size, through the
real command line: every setting, its random body and raw pixels, equal compute, resume."""

import json
import subprocess
import sys

import pytest

from configs import recipe_fashion
from experiments import recipe
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from tests.test_pipeline import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipe")
    cmd = [sys.executable, "-m", "launch.main", "--config=configs/recipe_fashion.py:tiny",
           "--mode=recipe", f"--workdir={workdir}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    again = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return workdir, again.stdout


def test_every_setting_is_probed_beside_its_own_random_body(run):
    workdir, _ = run
    summary = json.loads((workdir / "results" / "recipe.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["reference", "lecun", "local4"]
    assert set(summary["baselines"]) == {"raw pixels", "random body (dino init)",
                                         "random body (lecun init)"}
    fractions = recipe_fashion.get_config("tiny").downstream.label_fractions
    keys = {f"{p} {f:g}" for p in ("linear", "knn") for f in fractions}
    assert set(summary["probes"]) == keys
    for row in summary["rows"]:
        assert set(row["probes"]) == keys
        assert all(0 <= v <= 100 for v in row["probes"].values())
        assert set(row["gain_over_random"]) == set(row["probes"])
    reference = summary["rows"][0]
    assert reference["finetune"] and not summary["rows"][1]["finetune"]
    assert set(reference["old_feature"]) == {k for k in keys if k.startswith("linear")}
    # DINO's linear feature (the last blocks' class tokens) is not the final class token.
    assert reference["old_feature"] != {k: reference["probes"][k] for k in reference["old_feature"]}
    text = (workdir / "results" / "recipe.md").read_text()
    assert "model.init=lecun" in text and "final class token" in text
    assert (workdir / "results" / "recipe.png").stat().st_size > 10_000


def test_a_costlier_step_gets_fewer_epochs_for_the_same_compute(run):
    workdir, _ = run
    rows = {r["name"]: r for r in json.loads(
        (workdir / "results" / "recipe.json").read_text())["rows"]}
    reference, local4 = rows["reference"], rows["local4"]
    assert local4["epochs"] < reference["epochs"]  # 4 local views cost more than 2
    ratio = local4["server_tflop"] / reference["server_tflop"]
    assert ratio == pytest.approx(1.0, abs=0.25)  # whole steps: within a step's rounding


def test_a_stopped_recipe_resumes_without_running_again(run):
    _, stdout = run
    # 3 settings, raw pixels, 2 random bodies; the chosen recipe's 2 seeds, 3 runs each
    assert stdout.count("done before, kept") == 12


def test_the_chosen_recipe_is_confirmed_on_its_seeds_beside_its_own_references(run):
    workdir, _ = run
    summary = json.loads((workdir / "results" / "recipe.json").read_text())
    chosen = summary["chosen"]
    assert chosen["seeds"] == [0, 1] and [r["name"] for r in summary["rows"]] == [
        "reference", "lecun", "local4"]  # the seeds stay out of the ablations' table
    per_seed = chosen["per_seed"]
    fractions = recipe_fashion.get_config("tiny").downstream.finetune_fractions
    tuned = {f"finetune {f:g}" for f in fractions}
    for seed in ("0", "1"):
        assert tuned <= set(per_seed[seed]["smsd"]) and tuned <= set(per_seed[seed]["random"])
    # Seeds differ (own split, keys, labelled subsets), and the gains are paired by seed.
    assert per_seed["0"]["smsd"] != per_seed["1"]["smsd"]
    for key, gain in chosen["gain_over_random"].items():
        pairs = [per_seed[s]["smsd"][key] - per_seed[s]["random"][key] for s in ("0", "1")]
        assert gain["mean"] == pytest.approx(sum(pairs) / 2)
    assert set(chosen["gain_over_pixels"]) == set(summary["probes"])  # pixels: no fine-tune
    assert "## The chosen recipe" in (workdir / "results" / "recipe.md").read_text()


def test_another_machine_takes_the_runs_that_the_results_record(run, tmp_path):
    workdir, _ = run
    recorded = json.loads((workdir / "results" / "recipe.json").read_text())
    # The DINO-init random body is not recorded: it runs here, on its reference's head drawn
    # again from the config's keys, since the reference itself ran elsewhere.
    recorded["runs"] = [r for r in recorded["runs"] if r["dir"] != "random_dino"]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recorded))
    elsewhere = tmp_path / "elsewhere"
    out = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/recipe_fashion.py:tiny",
         "--mode=recipe", f"--workdir={elsewhere}", f"--config.recipe.resume_from={path}"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.count("done before, kept") == 11 and "random_dino ..." in out
    again = json.loads((elsewhere / "results" / "recipe.json").read_text())
    assert [r["probes"] for r in again["rows"]] == [r["probes"] for r in recorded["rows"]]
    head = lambda root: json.loads((Layout(root / "recipe" / "reference").head / "meta.json")
                                   .read_text())["fingerprint"]
    assert head(elsewhere) == head(workdir)


def test_a_bad_setting_is_refused_before_anything_runs():
    config = recipe_fashion.get_config("tiny")
    config.recipe.equal_compute = ("nowhere",)
    with pytest.raises(SMSDError, match="equal_compute names"):
        recipe.plan(config)
    config.recipe.equal_compute = ()
    config.recipe.settings = (("reference", ""), ("bad", "server.no_such_key=1"))
    with pytest.raises(SMSDError, match="no_such_key"):
        recipe.plan(config)
