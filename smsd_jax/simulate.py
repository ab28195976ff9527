"""The whole single round on one machine (`--mode=simulate`): every stage for every site.

    simulate.run_simulation(config, Layout("runs/quickstart"))

Consortium set-up, stage 1 at each site in turn, stage 2 at the server, stage 3 with the
random body and raw pixels beside the trained body; then `results/simulate.json` (times,
bytes uploaded per site, the server's last metrics, the results) and the report's figures.
"""

from __future__ import annotations

import time

import numpy as np

from smsd_jax import (consortium, cost, data, downstream, evaluation, files, keys,
                      report, server, site, tasks)
from smsd_jax.layout import Layout


def run_simulation(config, layout: Layout) -> dict:
    """Runs the single round for every site of `config` into `layout`; returns the summary."""
    timings = {}
    t = time.perf_counter()
    consortium.set_up(config, layout)
    timings["init_s"] = time.perf_counter() - t
    parts, _ = data.load_partition(layout.partition)
    sites = range(len(parts))
    t = time.perf_counter()
    manifests = [site.site_stage(config, layout, k) for k in sites]
    timings["sites_s"] = time.perf_counter() - t
    t = time.perf_counter()
    final = server.run_server(config, [layout.payload(k) for k in sites], layout)
    timings["server_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = downstream.downstream_stage(config, layout, baselines=True)
    timings["downstream_s"] = time.perf_counter() - t
    summary = dict(timings=timings, server=final, results=results,
                   payload_bytes_per_site=[cost.folder_bytes(layout.payload(k))
                                           for k in sites],
                   images_per_site=[m["num_images"] for m in manifests])
    files.write_json(layout.results / "simulate.json", summary)
    print(summary_lines(summary))
    report.draw_report(layout)
    print(f"results: {layout.results} (table, JSON, PNG curves)")
    return summary


def gains_line(results: list[dict], task: str = "") -> str:
    """The SMSD body against the random body on one task's rows (`downstream.evaluate_task`
    with baselines: raw pixels, random body, SMSD body)."""
    random, smsd = results[1], results[2]
    metric = evaluation.headline_metric(results)  # accuracy, mean AUC or Dice
    if metric == "dice":
        dice = lambda r: 100 * r["segment"]["mean_dice"]
        gains = f"mean Dice {dice(smsd) - dice(random):+.1f}"
    else:
        gain = lambda probe, frac: 100 * (smsd[probe][frac][metric] - random[probe][frac][metric])
        gains = ", ".join(f"{probe} {frac}: {gain(probe, frac):+.1f}"
                          for probe in ("linear", "knn") for frac in smsd[probe])
    unit = {"accuracy": "accuracy points", "auc": "mean AUC x 100", "dice": "Dice x 100"}[metric]
    return f"SMSD body against the random body{f' on {task}' if task else ''} ({unit}): {gains}"


def summary_lines(summary: dict) -> str:
    """What a person reads at the end: time, bytes, the teacher's entropy, the gains (one line
    per downstream task)."""
    timings, final = summary["timings"], summary["server"]
    return "\n".join([
        f"\nsingle round: {sum(timings.values()) / 60:.1f} min "
        f"(sites {timings['sites_s']:.0f} s, server {timings['server_s']:.0f} s, "
        f"downstream {timings['downstream_s']:.0f} s); each site uploaded once, "
        f"{np.mean(summary['payload_bytes_per_site']) / 2**20:.1f} MB on average",
        f"teacher entropy at the end: {final['teacher_entropy']:.2f} "
        f"(ln(out_dim) = {final['max_entropy']:.2f} is uniform collapse, 0 one-hot collapse)",
        *(gains_line(rows, task) for task, rows in tasks.by_task(summary["results"]).items()),
        *([f"keys: {keys.DEMO}: reproducible, and readable by anyone; not for real data"]
          if final.get("keys") == keys.DEMO else [])])
