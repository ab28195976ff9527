"""The comparison study: its plan, its statistics, and a whole tiny study from the CLI."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import base, study_fashion
from experiments import study as comparison, study_tables as tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", [None, "gpu"])
def test_plan_runs_pooled_methods_once_per_seed(variant):
    config = study_fashion.get_config(variant)
    runs = comparison.plan(config)
    methods = [(r["method"], r["partition"], r["seed"]) for r in runs if r["kind"] == "method"]
    assert len(methods) == len(set(methods))
    for seed in config.study.seeds:
        image_dino = seed in config.study.image_dino_seeds
        assert {p for m, p, s in methods if m == "smsd" and s == seed} == \
            set(config.study.partitions)
        assert {p for m, p, s in methods if m == "fedavg_dino" and s == seed} == \
            (set(config.study.partitions) if image_dino else set())
        assert [p for m, p, s in methods if m == "finetune_only" and s == seed] == ["pooled"]
        assert [p for m, p, s in methods if m == "centralized_dino" and s == seed] == \
            (["pooled"] if image_dino else [])
    ablations = [r for r in runs if r["kind"] == "ablation"]
    assert [r["ablation"] for r in ablations] == list(config.study.ablations)
    assert len({r["dir"] for r in runs}) == len(runs)  # every run has its own folder


def test_ablation_changes_one_setting():
    config = study_fashion.get_config()
    assert comparison.ablation_config(config, "keep=0.25").site.keep == 0.25
    assert comparison.ablation_config(config, "samples=4").site.num_samples == 4
    assert comparison.ablation_config(config, "no_permutation").site.permute is False
    public = comparison.ablation_config(config, "public_head")
    assert public.consortium_seed != config.consortium_seed and public.site == config.site
    assert config.site.keep == 0.5 and config.site.permute  # the original is untouched
    with pytest.raises(ValueError, match="'keep_half'"):
        comparison.ablation_config(config, "keep_half")


def _record(method, partition, seed, accuracy, upload=1000):
    metrics = {"accuracy": accuracy, "auc": 0.5 + accuracy / 2}
    cost = dict(upload_bytes_per_site=[upload, upload], download_bytes_per_site=[10, 10],
                client_flops_per_site=[1e9, 1e9], server_flops=1e12, images_seen=100,
                rounds=1, wall_s=1.0)
    return dict(method=method, partition=partition, seed=seed, ablation="", cost=cost,
                results={"name": method, "linear": {"0.1": metrics}, "finetune": {"0.1": metrics}})


def test_summary_statistics_over_seeds():
    config = study_fashion.get_config()
    config.study.partitions = ("iid",)
    smsd, fedavg = [0.70, 0.74, 0.75], [0.60, 0.61, 0.65]
    records = ([_record("smsd", "iid", s, a) for s, a in enumerate(smsd)]
               + [_record("fedavg_dino", "iid", s, a, upload=5000) for s, a in enumerate(fedavg)]
               + [_record("finetune_only", "pooled", s, 0.5) for s in range(3)])
    summary = tables.summarize(config, records)
    cell = summary["table"]["iid"]["smsd"]["linear"]["0.1"]["accuracy"]
    assert cell["mean"] == pytest.approx(np.mean(smsd))
    assert cell["std"] == pytest.approx(np.std(smsd, ddof=1)) and cell["n"] == 3
    # A pooled method's runs appear under every partition.
    assert summary["table"]["iid"]["finetune_only"]["finetune"]["0.1"]["accuracy"]["n"] == 3
    diff = summary["comparisons"]["iid"]["smsd - fedavg_dino"]["linear"]["0.1"]
    assert diff["mean"] == pytest.approx(np.mean(smsd) - np.mean(fedavg))
    assert summary["cost"]["iid"]["fedavg_dino"]["upload_bytes_per_site"] == 5000
    text = tables.markdown(summary)
    assert f"{100 * np.mean(smsd):.1f} ± {100 * np.std(smsd, ddof=1):.1f}" in text
    assert "FedAvg-DINO" in text and "Cost, sites iid" in text


def _run_study(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/study_fashion.py:tiny",
         "--mode=study", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_study_from_the_cli_and_resume(tmp_path):
    proc = _run_study(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "study.json").read_text())
    table = summary["table"]["iid"]
    assert set(table) == {"smsd", "fedavg_dino", "centralized_dino", "finetune_only",
                          "raw_pixels"}
    for method in ("smsd", "fedavg_dino", "centralized_dino", "finetune_only"):
        for probe in ("linear", "knn", "finetune"):
            assert set(table[method][probe]) == {"0.1", "1"}, (method, probe)
            for cell in table[method][probe].values():
                assert 0.0 <= cell["accuracy"]["mean"] <= 1.0
                assert 0.0 <= cell["auc"]["mean"] <= 1.0
    cost = summary["cost"]["iid"]
    # SMSD uploads once: the payload; FedAvg-DINO a model exchange per round.
    assert cost["smsd"]["rounds"] == 1 and cost["smsd"]["upload_bytes_per_site"] > 0
    assert cost["fedavg_dino"]["client_flops_per_site"] > cost["smsd"]["client_flops_per_site"]
    assert cost["finetune_only"]["upload_bytes_per_site"] == 0
    assert cost["centralized_dino"]["server_flops"] > 0
    # The ablation ran and is reported apart from the methods.
    names = [a["name"] for a in summary["ablations"]]
    assert names[0].startswith("default") and names[1:] == ["no_permutation"]
    for name in (tables.FRACTIONS_PNG, tables.BYTES_PNG):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| SMSD (single round) |" in (results / "study.md").read_text()

    # Running again keeps every finished run and rebuilds the same tables.
    again = _run_study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, kept") == len(summary["runs"])
    assert json.loads((results / "study.json").read_text())["table"] == summary["table"]


def test_comparisons_keep_the_tables_order_after_json():
    diff = {"linear": {"0.1": {"mean": 0.01, "se": 0.002, "seeds": (2, 2)}}}
    built = {"dirichlet": {f"smsd - {m}": diff
                           for m in ("fedavg_dino", "finetune_only", "centralized_dino")}}
    saved = json.loads(json.dumps(built, sort_keys=True))  # as results/study.json holds it
    lines = tables.comparison_lines(saved)
    assert lines == tables.comparison_lines(built)
    assert [line.split(", ")[1].split(":")[0] for line in lines] == [
        "smsd - fedavg_dino", "smsd - centralized_dino", "smsd - finetune_only"]


def test_a_plan_starts_no_run_after_its_deadline_and_resumes_later(tmp_path):
    runs = [dict(dir=f"run{i}") for i in range(3)]
    calls = []

    def execute(run, run_dir):
        calls.append(run["dir"])
        time.sleep(0.2)
        return dict(name=run["dir"])

    first = comparison.run_plan(runs, tmp_path, execute, deadline_s=0.1)
    assert calls == ["run0"] and [r["name"] for r in first] == ["run0"]
    again = comparison.run_plan(runs, tmp_path, execute)
    assert calls == ["run0", "run1", "run2"]  # run0 kept from its run.json
    assert [r["name"] for r in again] == ["run0", "run1", "run2"]


def test_a_plan_takes_recorded_runs_of_the_same_fingerprint_only(tmp_path, capsys):
    runs = [dict(dir=f"run{i}", fingerprint=f"f{i}") for i in range(3)]
    calls = []

    def execute(run, run_dir):
        calls.append(run["dir"])
        return dict(name=f"{run['dir']} here")

    kept = {"run0": dict(name="run0 elsewhere", dir="run0", fingerprint="f0"),
            "run1": dict(name="run1 elsewhere", dir="run1", fingerprint="old")}
    records = comparison.run_plan(runs, tmp_path, execute, kept=kept)
    assert calls == ["run1", "run2"]  # run0 taken; run1 was recorded with another config
    assert [r["name"] for r in records] == ["run0 elsewhere", "run1 here", "run2 here"]
    assert [(r["dir"], r["fingerprint"]) for r in records] == [("run0", "f0"), ("run1", "f1"),
                                                                ("run2", "f2")]
    assert "run1 was made with another config" in capsys.readouterr().out


def test_an_option_added_later_at_its_default_keeps_the_fingerprint(monkeypatch):
    """Runs recorded before an option existed are taken after it is added at its default
    (which changes no run); set to anything else, they run again."""
    config = study_fashion.get_config()
    run = comparison.plan(config)[0]
    before = comparison.fingerprint(config, run, comparison.PLAN_KEYS)
    defaults = base.get_config

    def with_option():
        c = defaults()
        c.model.new_option = 0.25
        return c

    monkeypatch.setattr(base, "get_config", with_option)
    config.model.new_option = 0.25
    assert comparison.fingerprint(config, run, comparison.PLAN_KEYS) == before
    config.model.new_option = 0.5
    assert comparison.fingerprint(config, run, comparison.PLAN_KEYS) != before


def test_a_fingerprint_ignores_which_runs_a_plan_holds_but_not_what_a_run_is():
    config = study_fashion.get_config()
    run = comparison.plan(config)[0]
    before = comparison.fingerprint(config, run, comparison.PLAN_KEYS)
    config.study.seeds = (0, 1, 2)
    config.workdir = "elsewhere"
    assert comparison.fingerprint(config, run, comparison.PLAN_KEYS) == before
    config.server.lr = 2 * config.server.lr
    assert comparison.fingerprint(config, run, comparison.PLAN_KEYS) != before
    assert comparison.fingerprint(config, dict(run, seed=9), ()) != comparison.fingerprint(
        config, run, ())
