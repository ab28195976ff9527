"""The learning curve (`--mode=curve`): when does the single round pay, and does it track
centralized DINO?

Each method pre-trains the same ViT for each budget of `config.curve.budgets` epochs of
images seen (a full schedule per budget: warm-up, cosine decay and the teacher's momentum
reach their ends at that budget, as a run of that length would), then its teacher is probed
at the site: linear probe and k-NN at `config.downstream.label_fractions`. Matched images
seen: SMSD's server and centralized DINO run `budget` epochs of the pooled images,
FedAvg-DINO `budget` rounds of one local epoch. Beside them, on the same labels: raw pixels,
the random (untrained) body, and fine-tune only trained to convergence.

Every run is one folder with a `run.json` (`comparison.run_plan`), so a stopped curve
resumes. Writes `WORKDIR/results/curve.json`, `curve.md` and `curve.png`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from smsd_jax import data, downstream, evaluation, files
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from experiments import study as comparison
from experiments import study_tables as summary_tables

PRETRAINED = ("smsd", "centralized_dino", "fedavg_dino")
NAMES = {"smsd": "SMSD (single round)", "centralized_dino": "centralized DINO",
         "fedavg_dino": "FedAvg-DINO", "raw_pixels": "raw pixels",
         "random_body": "random body", "finetune_only": "fine-tune only (converged)"}
JSON, MARKDOWN, PNG = "curve.json", "curve.md", "curve.png"


# ---------------------------------------------------------------- the plan


def plan(config) -> list[dict]:
    """Every run of the curve, in order: the references (cheap), then the pre-trained methods
    at each budget and seed, the cheapest budget first, so that a stopped curve has its
    references and its early points."""
    s = config.curve
    for method in s.methods:
        if method not in PRETRAINED:
            raise SMSDError(f"config.curve.methods has {method!r}; use any of {PRETRAINED}")
    runs = []
    for seed in s.baseline_seeds:
        runs.append(dict(kind="pixels", method="raw_pixels", seed=seed, budget=0,
                         dir=f"raw_pixels/seed{seed}"))
        runs.append(dict(kind="finetune_only", method="finetune_only", seed=seed, budget=0,
                         dir=f"finetune_only/seed{seed}"))
    for budget in sorted(s.budgets):
        for method in s.methods:
            for seed in (s.smsd_seeds if method == "smsd" else s.baseline_seeds):
                runs.append(dict(kind="method", method=method, seed=seed, budget=budget,
                                 dir=f"{method}/seed{seed}/epochs{budget:g}"))
    return runs


def budget_config(config, budget: float):
    """`config` pre-training for `budget` epochs of images seen, probing only (no fine-tune)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.server.epochs = float(budget)
        c.baselines.update(rounds=int(budget), local_epochs=1.0)
        c.downstream.finetune_fractions = ()
    return c


def _execute(config, run: dict, run_dir: Path, train, test) -> dict:
    c = comparison.seeded(config, run["seed"], config.curve.partition)
    if run["kind"] == "pixels":
        record = dict(results=downstream.evaluate_pixels(c, train, test), cost=None)
    elif run["kind"] == "finetune_only":  # its probes are the random body's
        with c.unlocked():
            c.downstream.finetune_fractions = tuple(c.downstream.label_fractions)
        record = comparison.run_method(c, "finetune_only", run_dir, train, test)
    else:
        if int(run["budget"]) != run["budget"] and run["method"] == "fedavg_dino":
            raise SMSDError(f"config.curve.budgets has {run['budget']}: FedAvg-DINO needs whole"
                            " epochs (rounds of one local epoch)")
        record = comparison.run_method(budget_config(c, run["budget"]), run["method"], run_dir,
                                       train, test)
    return dict(record, method=run["method"], seed=run["seed"], budget=run["budget"])


def run_curve(config, workdir: Layout | str | Path) -> dict:
    """Runs (or resumes) every run of `plan(config)`; writes the curve's JSON, table, figure."""
    layout = Layout.of(workdir)
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    records = comparison.run_plan(plan(config), layout.root / "curve",
                                  lambda run, run_dir: _execute(config, run, run_dir, train,
                                                                test), name="curve")
    summary = summarize(config, records)
    files.write_results(layout.results, "curve", summary, markdown(summary), figure(summary))
    return summary


# ---------------------------------------------------------------- summary


def _probe_stats(records: list[dict], probe: str) -> dict:
    """`{fraction: accuracy stats}` of `probe` over `records` (seeds)."""
    fractions = sorted({f for r in records for f in r["results"].get(probe, {})}, key=float)
    return {f: summary_tables.stats([r["results"][probe][f]["accuracy"] for r in records
                       if f in r["results"].get(probe, {})]) for f in fractions}


def summarize(config, records: list[dict]) -> dict:
    """Accuracy (mean, std over seeds) per method, budget, probe and label fraction, the
    references, and the plain answers: the first budget at which SMSD beats each reference,
    and SMSD's gap to centralized DINO at each budget."""
    curves = {}
    for method in config.curve.methods:
        rows = [r for r in records if r["method"] == method]
        curves[method] = {f"{b:g}": {p: _probe_stats([r for r in rows if r["budget"] == b], p)
                                     for p in ("linear", "knn")}
                          for b in sorted({r["budget"] for r in rows})}
    pixels = [r for r in records if r["method"] == "raw_pixels"]
    finetune = [r for r in records if r["method"] == "finetune_only"]
    references = {
        "raw_pixels": {p: _probe_stats(pixels, p) for p in ("linear", "knn")},
        "random_body": {p: _probe_stats(finetune, p) for p in ("linear", "knn")},
        "finetune_only": {"finetune": _probe_stats(finetune, "finetune")}}
    return dict(setup=dict(
        images=config.data.subset, sites=config.data.num_sites, partition=config.curve.partition,
        model=config.model.size, batch=config.server.batch_size, budgets=list(config.curve.budgets),
        smsd_seeds=list(config.curve.smsd_seeds), baseline_seeds=list(config.curve.baseline_seeds),
        label_fractions=list(config.downstream.label_fractions)),
        curves=curves, references=references, answers=answers(curves, references),
        wall_s=float(sum(r.get("seconds", 0.0) for r in records)), runs=records)


def _first_beat(points: list[tuple[float, float]], reference: float, what: str) -> str:
    """When the SMSD points `(budget, accuracy)` first exceed `reference`, in words."""
    beaten = [b for b, acc in sorted(points) if acc > reference]
    if beaten:
        return f"SMSD beats {what} ({100 * reference:.1f}) from {beaten[0]:g} epochs"
    budget, best = max(points, key=lambda p: p[1])
    return (f"SMSD does not beat {what} ({100 * reference:.1f}) within "
            f"{max(b for b, _ in points):g} epochs (best {100 * best:.1f} at {budget:g})")


def answers(curves: dict, references: dict) -> list[str]:
    """Sentences a person reads: from what budget SMSD's mean beats raw pixels, the random
    body and converged fine-tune only (each probe and fraction), and its gap to centralized
    DINO per budget."""
    smsd, central = curves.get("smsd", {}), curves.get("centralized_dino", {})
    finetune, random_body = (references["finetune_only"]["finetune"],
                             references["random_body"])
    lines = []
    for probe in ("linear", "knn"):
        for f, pixels in references["raw_pixels"][probe].items():
            where = f"{evaluation.PROBES[probe]} {100 * float(f):g}%"
            points = [(float(b), v[probe][f]["mean"]) for b, v in smsd.items() if f in v[probe]]
            if not points:
                continue
            lines.append(f"{where}: {_first_beat(points, pixels['mean'], 'raw pixels')}")
            if f in random_body[probe]:
                untrained = random_body[probe][f]["mean"]
                lines.append(f"{where}: {_first_beat(points, untrained, 'the random body')}")
            if f in finetune:
                lines.append(f"{where}: "
                             f"{_first_beat(points, finetune[f]['mean'], 'fine-tune only')}")
            gaps = [f"{b}: {100 * (smsd[b][probe][f]['mean'] - c[probe][f]['mean']):+.1f}"
                    for b, c in central.items() if b in smsd and f in c[probe]
                    and f in smsd[b][probe]]
            if gaps:
                lines.append(f"{where}: SMSD - centralized DINO in points, by budget (epochs): "
                             + ", ".join(gaps))
    return lines


# ---------------------------------------------------------------- table and figure


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return (f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}" if stats["n"] > 1
            else f"{100 * stats['mean']:.1f}")


def markdown(summary: dict) -> str:
    """The curve as a Markdown table (rows: method and budget; columns: probe and fraction),
    the references and the answers."""
    s = summary["setup"]
    fractions = [f"{f:g}" for f in s["label_fractions"]]
    columns = [(p, f) for p in ("linear", "knn") for f in fractions]
    head = ("| method | epochs | " + " | ".join(f"{evaluation.PROBES[p]} {100 * float(f):g}%"
                                              for p, f in columns) + " |")
    lines = [f"# Learning curve: {s['images'] or 'all'} images, {s['sites']} "
             f"{s['partition']} sites, ViT {s['model']}, batch {s['batch']}",
             "", "Accuracy (%) on the test split (mean ± std over seeds: SMSD "
             f"{s['smsd_seeds']}, baselines {s['baseline_seeds']}).", "", head,
             "|---|---|" + "---|" * len(columns)]
    for method, by_budget in summary["curves"].items():
        for budget, probes in by_budget.items():
            lines.append(f"| {NAMES[method]} | {budget} | " + " | ".join(
                _cell(probes[p].get(f)) for p, f in columns) + " |")
    refs = summary["references"]
    for name in ("raw_pixels", "random_body"):
        lines.append(f"| {NAMES[name]} | - | " + " | ".join(
            _cell(refs[name][p].get(f)) for p, f in columns) + " |")
    lines.append(f"| {NAMES['finetune_only']} | - | " + " | ".join(
        _cell(refs["finetune_only"]["finetune"].get(f)) if p == "linear" else "-"
        for p, f in columns) + " |  (fine-tune accuracy, under linear)")
    lines += ["", "## Answers", "", *[f"- {line}" for line in summary["answers"]],
              "", f"Run time: {summary['wall_s'] / 60:.1f} min on this machine."]
    return "\n".join(lines) + "\n"


def figure(summary: dict) -> Figure:
    """One panel per probe and fraction: accuracy against epochs of images seen (log 2), a
    line per method (band: one std over seeds), references as horizontal lines."""
    fractions = [f"{f:g}" for f in summary["setup"]["label_fractions"]]
    panels = [(p, f) for p in ("linear", "knn") for f in fractions]
    fig = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    refs = summary["references"]
    for ax, (probe, f) in zip(axes, panels):
        for method, by_budget in summary["curves"].items():
            points = sorted((float(b), v[probe][f]) for b, v in by_budget.items()
                            if f in v[probe])
            if not points:
                continue
            x = np.array([b for b, _ in points])
            mean = np.array([100 * s["mean"] for _, s in points])
            std = np.array([100 * s["std"] for _, s in points])
            ax.plot(x, mean, marker="o", label=NAMES[method])
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        for name, stats, style in (
                ("raw_pixels", refs["raw_pixels"][probe].get(f), "--"),
                ("random_body", refs["random_body"][probe].get(f), ":"),
                ("finetune_only", refs["finetune_only"]["finetune"].get(f), "-.")):
            if stats:
                ax.axhline(100 * stats["mean"], color="gray", linestyle=style, label=NAMES[name])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pre-training budget (epochs of images seen)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{evaluation.PROBES[probe]}, {100 * float(f):g}% labels")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("when does the single round pay? (Fashion-MNIST, CPU)")
    return fig
