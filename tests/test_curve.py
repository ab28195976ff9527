"""The learning curve: its plan, its plain answers, and a tiny real run that resumes."""

import json

import pytest

from configs import curve_fashion
from experiments import curve


def test_plan_runs_each_method_at_each_budget_cheapest_first():
    config = curve_fashion.get_config()
    runs = curve.plan(config)
    methods = [r for r in runs if r["kind"] == "method"]
    s = config.curve
    assert len(methods) == len(s.budgets) * (len(s.smsd_seeds) + 2 * len(s.baseline_seeds))
    assert [r["budget"] for r in methods] == sorted(r["budget"] for r in methods)
    assert {r["seed"] for r in methods if r["method"] == "smsd"} == set(s.smsd_seeds)
    assert len({r["dir"] for r in runs}) == len(runs)
    assert {r["kind"] for r in runs} == {"method", "finetune_only", "pixels"}


def test_budget_config_matches_images_seen():
    config = curve.budget_config(curve_fashion.get_config(), 4)
    assert config.server.epochs == 4.0  # SMSD and centralized DINO: epochs of pooled images
    assert config.baselines.rounds * config.baselines.local_epochs == 4  # FedAvg-DINO
    assert tuple(config.downstream.finetune_fractions) == ()


def _stats(mean):
    return {"mean": mean, "std": 0.0, "n": 1}


def test_answers_name_the_first_budget_that_beats_each_reference():
    curves = {"smsd": {b: {"linear": {"0.1": _stats(acc)}, "knn": {}}
                       for b, acc in (("1", 0.70), ("2", 0.76), ("4", 0.81), ("8", 0.83))},
              "centralized_dino": {"4": {"linear": {"0.1": _stats(0.80)}, "knn": {}}}}
    references = {"raw_pixels": {"linear": {"0.1": _stats(0.803)}, "knn": {}},
                  "random_body": {"linear": {"0.1": _stats(0.75)}, "knn": {}},
                  "finetune_only": {"finetune": {"0.1": _stats(0.9)}}}
    lines = curve.answers(curves, references)
    assert "linear 10%: SMSD beats the random body (75.0) from 2 epochs" in lines
    assert "linear 10%: SMSD beats raw pixels (80.3) from 4 epochs" in lines
    assert ("linear 10%: SMSD does not beat fine-tune only (90.0) within 8 epochs "
            "(best 83.0 at 8)") in lines
    assert any("SMSD - centralized DINO" in line and "4: +1.0" in line for line in lines)


@pytest.mark.slow
def test_tiny_curve_writes_its_results_and_resumes(tmp_path, capsys):
    config = curve_fashion.get_config("tiny")
    summary = curve.run_curve(config, tmp_path)
    results = tmp_path / "results"
    written = json.loads((results / curve.JSON).read_text())
    assert set(written["curves"]) == set(config.curve.methods) == {"smsd"}
    for method in written["curves"].values():
        assert set(method) == {"1", "2"}
        for fraction in ("0.1", "0.5"):
            assert 0.0 <= method["1"]["linear"][fraction]["mean"] <= 1.0
    assert set(written["references"]["finetune_only"]["finetune"]) == {"0.1", "0.5"}
    assert (results / curve.PNG).stat().st_size > 10_000
    assert "| SMSD (single round) | 1 |" in (results / curve.MARKDOWN).read_text()
    assert written["answers"]
    capsys.readouterr()
    again = curve.run_curve(config, tmp_path)
    assert capsys.readouterr().out.count("done before, kept") == len(curve.plan(config))
    assert again["curves"] == summary["curves"]
