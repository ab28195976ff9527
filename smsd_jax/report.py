"""Pictures of a run for people: training curves of the server and downstream accuracy.

    paths = draw_report("runs/quickstart")   # -> runs/quickstart/results/*.png

Reads what the stages write: `WORKDIR/server/metrics.jsonl` (one JSON line per server step)
and, when stage 3 has run, `WORKDIR/results/downstream.json`. Draws with matplotlib's
object-oriented API on Agg figures, so it never changes the pyplot backend of a notebook.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from smsd_jax import evaluation, files, tasks
from smsd_jax.layout import Layout
from smsd_jax.errors import MissingInputError, SMSDError, require

if TYPE_CHECKING:  # matplotlib is the extra "plots"
    from matplotlib.figure import Figure

CURVES_PNG, DOWNSTREAM_PNG = "training_curves.png", "downstream_accuracy.png"


# ---------------------------------------------------------------- reading (I/O)


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The server's `metrics.jsonl` as columns: `{name: float64 [rows]}`, rows by step.

    A last line without its newline (the server is writing it, or was killed while writing
    it) is left out; any other unreadable line is an error naming the file and line.
    """
    path = files.as_path(path)
    if not path.is_file():
        raise MissingInputError(f"no training metrics: {path} does not exist; run "
                                "--mode=server (or --mode=simulate) on this workdir first")
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SMSDError(f"{path}, line {number}, is not a JSON object ({e}); the file is "
                            "damaged: delete the line or rerun the server") from e
    if not rows:
        raise SMSDError(f"{path} holds no metrics yet; let --mode=server run some steps")
    rows.sort(key=lambda row: row["step"])
    names = sorted({name for row in rows for name in row})
    return {name: np.array([row.get(name, math.nan) for row in rows], np.float64)
            for name in names}


def read_downstream(path: str | os.PathLike) -> list[dict] | None:
    """The results of stage 3 (`downstream.json`), or None when stage 3 has not run."""
    return files.read_json(path) if files.as_path(path).is_file() else None


# ---------------------------------------------------------------- math


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each `window` consecutive values of `values [n]`: `[n - window + 1]`."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def accuracy_table(results: list[dict]) -> tuple[list[str], list[str], np.ndarray]:
    """(bar groups "probe fraction%", body names, accuracy % `[bodies, groups]`, NaN where
    a body lacks a probe) from the results of `downstream.evaluate_body`/`evaluate_pixels`;
    multi-label results give 100 x their mean AUC (`evaluation.headline_metric`); segmentation
    results 100 x the Dice of each foreground class and their mean."""
    metric = evaluation.headline_metric(results)
    if metric == "dice":
        classes = results[0]["segment"]["classes"][1:]
        dice = lambda r, c: math.nan if r["segment"]["dice"][c] is None else r["segment"]["dice"][c]
        table = np.array([[100 * dice(r, c) for c in classes] + [100 * r["segment"]["mean_dice"]]
                          for r in results])
        return [*classes, "mean"], [r["name"] for r in results], table
    groups = [(probe, fraction) for probe in evaluation.PROBES
              for fraction in sorted({f for r in results for f in r.get(probe, {})}, key=float)]
    table = np.array([[100 * r[p][f][metric] if f in r.get(p, {}) else math.nan
                       for p, f in groups] for r in results])
    return ([f"{evaluation.PROBES[p]} {100 * float(f):g}%" for p, f in groups],
            [r["name"] for r in results], table)


# ---------------------------------------------------------------- drawing


def _curve(ax, steps, values, title: str, smooth: bool = False, **style) -> None:
    finite = np.isfinite(values)  # images/s is NaN until the first timing window ends
    steps, values = steps[finite], values[finite]
    window = max(1, len(values) // 50)
    if smooth and window > 1:
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(steps[window - 1:], moving_average(values, window), color="tab:blue",
                label=f"mean of {window} steps")
    else:
        ax.plot(steps, values, color="tab:blue", **style)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def new_figure(**kwargs) -> Figure:
    """A matplotlib Agg `Figure` (the extra `plots`), never touching pyplot's backend."""
    return require("matplotlib.figure", "plots").Figure(layout="constrained", **kwargs)


def training_curves_figure(metrics: dict[str, np.ndarray]) -> Figure:
    """Loss, teacher entropy against ln(out_dim), learning rate, and images/s, per step."""
    fig = new_figure(figsize=(10, 7))
    (loss, entropy), (lr, rate) = fig.subplots(2, 2)
    steps = metrics["step"]
    max_entropy = float(metrics["max_entropy"][-1])
    # A loss stuck at ln(out_dim) is the student matching a uniform teacher: collapse.
    loss.axhline(max_entropy, color="tab:red", linestyle="--", label="ln(out_dim)")
    _curve(loss, steps, metrics["loss"], "DINO loss", smooth=True)
    _curve(entropy, steps, metrics["teacher_entropy"], "teacher entropy")
    entropy.axhline(max_entropy, color="tab:red", linestyle="--",
                    label=f"ln(out_dim) = {max_entropy:.2f}: uniform collapse")
    entropy.axhline(0.0, color="gray", linestyle=":", label="0: one-hot collapse")
    entropy.set_ylim(-0.05 * max_entropy, 1.3 * max_entropy)  # room for the legend on top
    entropy.legend(loc="upper center", ncols=2, fontsize=8)
    _curve(lr, steps, metrics["lr"], "learning rate")
    # One rate per timing window of `log_every` steps: drawn as steps, not a slope.
    _curve(rate, steps, metrics["images_per_s"], "server throughput (images/s)",
           drawstyle="steps-post")
    fig.suptitle(f"server: {len(steps)} steps")
    return fig


def downstream_figure(results: list[dict], task: str = "") -> Figure:
    """Grouped bars: accuracy (multi-label: mean AUC x 100; segmentation: Dice) of each body
    (and raw pixels) per probe and label fraction (per class), on the task named `task`."""
    groups, names, table = accuracy_table(results)
    what = {"accuracy": "accuracy", "auc": "mean AUC", "dice": "Dice"}[
        evaluation.headline_metric(results)]
    fig = new_figure(figsize=(max(6.0, 0.8 * len(groups) * len(names)), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, (name, row) in enumerate(zip(names, table)):
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(row), width,
                      label=name)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in row],
                     fontsize=8)
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"test {what} ({'%' if what == 'accuracy' else 'x 100'})")
    ax.set_ylim(0, 105)
    ax.set_title(f"{task + ': ' if task else ''}downstream {what} at a site "
                 + ("(per class, frozen body)" if what == "Dice" else "(share of labels used)"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def draw_report(workdir: Layout | str | os.PathLike, out_dir: str | os.PathLike | None = None
                ) -> list[Path]:
    """Draws the PNGs of the run in `workdir` into `out_dir` (default `workdir/results`).

    Returns:
      The paths written: the training curves, then the downstream accuracy bars when
      `workdir/results/downstream.json` exists (one PNG per task when stage 3 had several,
      `downstream_accuracy_<task>.png`).

    Raises:
      FileNotFoundError: `workdir/server/metrics.jsonl` does not exist (named).
    """
    layout = Layout.of(workdir)
    out_dir = Path(out_dir) if out_dir is not None else layout.results
    metrics = read_metrics(layout.metrics)
    results = read_downstream(layout.downstream_json)
    figures = {CURVES_PNG: training_curves_figure(metrics)}
    for task, rows in tasks.by_task(results or []).items():
        png = DOWNSTREAM_PNG.replace(".png", f"_{task}.png") if task else DOWNSTREAM_PNG
        figures[png] = downstream_figure(rows, task)
    return [files.save_figure(out_dir / name, fig) for name, fig in figures.items()]
