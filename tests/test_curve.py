"""The learning curve: one run probed at its checkpoints; its plan, its plain answers, and a
tiny real run through the command line that resumes and equals an unstopped run."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import curve_fashion
from experiments import curve
from smsd_jax import export, server
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from tests.test_pipeline import ROOT


def test_plan_probes_each_epoch_once_then_the_last_for_every_seed():
    config = curve_fashion.get_config()
    runs = curve.plan(config)
    smsd = [r for r in runs if r["kind"] == "smsd"]
    first, *more = config.curve.seeds
    epochs = [float(e) for e in config.curve.probe_epochs]
    assert [r["epochs"] for r in smsd] == sorted(epochs) + [max(epochs)] * len(more)
    assert [r["seed"] for r in smsd] == [first] * len(epochs) + list(more)
    assert {r["seed"] for r in runs if r["kind"] == "random"} == set(config.curve.seeds)
    assert {r["seed"] for r in runs if r["kind"] == "pixels"} == set(config.curve.seeds)
    assert len({r["dir"] for r in runs}) == len(runs)
    assert max(epochs) == config.server.epochs  # the last probe is the run's end


@pytest.mark.parametrize("epochs", [(0, 2), (1, 64), ()])
def test_plan_refuses_probes_outside_the_run(epochs):
    config = curve_fashion.get_config()
    config.curve.probe_epochs = epochs
    with pytest.raises(SMSDError, match="probe_epochs"):
        curve.plan(config)


def test_stop_step_counts_whole_batches_as_the_server_does():
    config = curve_fashion.get_config()
    assert curve.stop_step(config, 60_000, 1) == 60_000 // 128
    assert curve.stop_step(config, 60_000, 32) == 32 * (60_000 // 128)
    assert curve.stop_step(config, 100, 0.5) == 1  # never step 0


def _stats(mean, n=1):
    return {"mean": mean, "std": 0.0, "n": n}


def test_answers_name_the_first_epoch_that_beats_each_reference_on_the_same_labels():
    by_epoch = {e: {"linear": {"0.1": _stats(acc)}, "knn": {}, "finetune": {}, "seeds": [0]}
                for e, acc in (("1", 0.70), ("2", 0.76), ("4", 0.81), ("8", 0.83))}
    by_epoch["8"].update(finetune={"0.01": _stats(0.74, n=2)}, seeds=[0, 1])
    by_seed = {"raw_pixels": {"0": {"linear": {"0.1": 0.803}}, "1": {"linear": {"0.1": 0.85}}},
               "random_body": {"0": {"linear": {"0.1": 0.75}, "finetune": {"0.01": 0.69}},
                               "1": {"linear": {"0.1": 0.75}, "finetune": {"0.01": 0.71}}}}
    lines = curve.answers(by_epoch, {"by_seed": by_seed})
    assert "linear 10%: SMSD beats the random body from epoch 2 (76.0 against 75.0)" in lines
    assert "linear 10%: SMSD beats raw pixels from epoch 4 (81.0 against 80.3)" in lines
    assert "fine-tune 1%: SMSD beats fine-tune only from epoch 8 (74.0 against 70.0)" in lines
    assert ("fine-tune 1% at epoch 8: SMSD 74.0 against fine-tune only 70.0 on the same 2 "
            "seed(s): +4.0 points") in lines
    # Epoch 8 has seeds 0 and 1: its raw pixels are their mean, 82.65, not seed 0's 80.3.
    del by_epoch["4"]
    by_epoch["8"]["linear"]["0.1"] = _stats(0.81, n=2)
    assert ("linear 10%: SMSD does not beat raw pixels within 8 epochs (closest at epoch 8: "
            "81.0 against 82.7)") in curve.answers(by_epoch, {"by_seed": by_seed})


@pytest.mark.slow
def test_tiny_curve_from_the_cli_resumes_and_equals_one_unstopped_run(tmp_path):
    config = curve_fashion.get_config("tiny")
    workdir = tmp_path / "curve"
    cmd = [sys.executable, "-m", "launch.main", "--config=configs/curve_fashion.py:tiny",
           "--mode=curve", f"--workdir={workdir}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    again = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    assert again.stdout.count("done before, kept") == len(curve.plan(config))

    results = workdir / "results"
    summary = json.loads((results / curve.JSON).read_text())
    assert set(summary["smsd"]) == {"1", "2"}
    assert summary["smsd"]["2"]["step"] == 2 * summary["smsd"]["1"]["step"]
    assert summary["smsd"]["2"]["finetune"]["0.5"]["n"] == len(config.curve.seeds)
    for probe in ("linear", "knn"):
        for fraction in ("0.1", "0.5"):
            assert 0.0 <= summary["smsd"]["1"][probe][fraction]["mean"] <= 1.0
    assert summary["references"]["random_body"]["finetune"]["0.5"]["n"] == 2
    assert set(summary["references"]["by_seed"]["raw_pixels"]) == {"0", "1"}
    assert (results / curve.PNG).stat().st_size > 10_000
    assert "| SMSD | 2 |" in (results / curve.MARKDOWN).read_text()

    # Stopped at epoch 1 and continued, the run ends where one unstopped run ends.
    layout = Layout(workdir)
    whole = server.run_server(config, layout.payload_dirs(), tmp_path / "whole")
    _, ours, _ = export.load_body(workdir / "curve" / "smsd" / "epochs2" / "body")
    _, theirs, _ = export.load_body(whole["body"])
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)
