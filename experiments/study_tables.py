"""Tables and figures of the comparison study, from its run records (no training here).

    summary = summarize(config, records)   # means and standard deviations over seeds
    write(summary, "runs/study_fashion/results")  # study.json, study.md, two PNGs

A record is what `study.run_method` returns: `{"method", "partition", "seed", "ablation",
"results": downstream.evaluate_pretrained's dict, "cost": {...} or None}`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from smsd_jax import evaluation, files

# The probes in the order of the study's tables (fine-tuning first), with their titles.
PROBES = tuple((probe, evaluation.PROBES[probe]) for probe in ("finetune", "linear", "knn"))
NAMES = {"smsd": "SMSD (single round)", "fedavg_dino": "FedAvg-DINO",
         "centralized_dino": "centralized DINO", "finetune_only": "fine-tune only",
         "raw_pixels": "raw pixels"}
JSON, MARKDOWN = "study.json", "study.md"
FRACTIONS_PNG, BYTES_PNG = "study_label_fraction.png", "study_bytes.png"


# ---------------------------------------------------------------- aggregation


def stats(values: list[float]) -> dict:
    """Mean, sample std (0 for one value) and count of `values`."""
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
                n=int(v.size))


def _metric_stats(records: list[dict]) -> dict:
    """`{probe: {fraction: {"accuracy": stats, "auc": stats}}}` over `records` (seeds)."""
    out = {}
    for probe, _ in PROBES:
        fractions = sorted({f for r in records for f in r["results"].get(probe, {})}, key=float)
        for f in fractions:
            rows = [r["results"][probe][f] for r in records if f in r["results"].get(probe, {})]
            out.setdefault(probe, {})[f] = {m: stats([row[m] for row in rows])
                                            for m in ("accuracy", "auc")}
    return out


def _cost_stats(records: list[dict]) -> dict | None:
    costs = [r["cost"] for r in records if r.get("cost")]
    if not costs:
        return None
    mean = lambda key: float(np.mean([np.mean(c[key]) for c in costs]))
    return dict(upload_bytes_per_site=mean("upload_bytes_per_site"),
                download_bytes_per_site=mean("download_bytes_per_site"),
                client_flops_per_site=mean("client_flops_per_site"),
                server_flops=mean("server_flops"), images_seen=mean("images_seen"),
                rounds=int(costs[0]["rounds"]), wall_s=mean("wall_s"))


def _difference(a: dict, b: dict) -> dict:
    """Mean difference a - b per probe and fraction, with the std of the difference of means
    (a method with one seed adds no spread: its seed-to-seed variation is not measured)."""
    out = {}
    for probe in a:
        for f in a[probe]:
            if f in b.get(probe, {}):
                x, y = a[probe][f]["accuracy"], b[probe][f]["accuracy"]
                se = np.sqrt(x["std"] ** 2 / x["n"] + y["std"] ** 2 / y["n"])
                out.setdefault(probe, {})[f] = dict(mean=x["mean"] - y["mean"], se=float(se),
                                                    seeds=[x["n"], y["n"]])
    return out


def summarize(config, records: list[dict]) -> dict:
    """Means and standard deviations over seeds, per partition and method; ablations."""
    s = config.study
    main = [r for r in records if not r.get("ablation")]
    table, cost = {}, {}
    for partition in s.partitions:
        table[partition], cost[partition] = {}, {}
        for method in (*s.methods, "raw_pixels"):
            rows = [r for r in main if r["method"] == method
                    and r["partition"] in (partition, "pooled")]
            if rows:
                table[partition][method] = _metric_stats(rows)
                cost[partition][method] = _cost_stats(rows)
    comparisons = {p: {f"smsd - {other}": _difference(t["smsd"], t[other])
                       for other in ("fedavg_dino", "finetune_only", "centralized_dino")
                       if "smsd" in t and other in t}
                   for p, t in table.items()}
    ablated = [r for r in records if r.get("ablation")]
    # The reference row: SMSD's default run on the ablations' partition and seed.
    default = [dict(r, ablation=f"default (keep {config.site.keep:g}, M "
                                f"{config.site.num_samples}, permuted, secret head)")
               for r in main if ablated and r["method"] == "smsd"
               and r["partition"] == s.ablation_partition and r["seed"] == s.ablation_seed]
    ablations = [dict(name=r["ablation"], partition=r["partition"], seed=r["seed"],
                      metrics=_metric_stats([r]), cost=_cost_stats([r]))
                 for r in default + ablated]
    setup = dict(
        data=config.data.source, images=config.data.subset, sites=config.data.num_sites,
        alpha=config.data.alpha, model=config.model.size, patch=config.model.patch_size,
        server_epochs=config.server.epochs, batch=config.server.batch_size,
        keep=config.site.keep, samples=config.site.num_samples,
        fedavg_rounds=config.baselines.rounds, fedavg_local_epochs=config.baselines.local_epochs,
        seeds=list(s.seeds), image_dino_seeds=list(s.image_dino_seeds),
        label_fractions=list(config.downstream.label_fractions),
        finetune_fractions=list(config.downstream.finetune_fractions),
        finetune_epochs=config.downstream.finetune_epochs,
        finetune_min_steps=config.downstream.finetune_min_steps,
        finetune_max_steps=config.downstream.finetune_max_steps,
        test_images=config.data.subset or None)
    return dict(setup=setup, table=table, cost=cost, comparisons=comparisons,
                ablations=ablations, runs=records)


# ---------------------------------------------------------------- markdown


def _cell(stats: dict | None, metric: str = "accuracy") -> str:
    if not stats:
        return "-"
    m = stats[metric]
    scale = 100 if metric == "accuracy" else 1
    digits = 1 if metric == "accuracy" else 3
    text = f"{scale * m['mean']:.{digits}f}"
    return text + (f" ± {scale * m['std']:.{digits}f}" if m["n"] > 1 else "")


def _columns(table: dict) -> list[tuple[str, str, str]]:
    cols = []
    for probe, title in PROBES:
        fractions = sorted({f for t in table.values() for f in t.get(probe, {})}, key=float)
        cols += [(probe, f, f"{title} {100 * float(f):g}%") for f in fractions]
    return cols


def metrics_table(table: dict, metric: str = "accuracy") -> str:
    """Markdown: one row per method, one column per probe and label fraction."""
    cols = _columns(table)
    lines = ["| method | " + " | ".join(c[2] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for method, stats in _in_order(table):
        cells = [_cell(stats.get(p, {}).get(f), metric) for p, f, _ in cols]
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.2f}"


def cost_table(cost: dict) -> str:
    lines = ["| method | rounds | upload MB / site | download MB / site | site GFLOP | "
             "server GFLOP | images seen | pre-training s |", "|---|" + "---|" * 7]
    for method, c in _in_order(cost):
        if c is None:
            continue
        lines.append(
            f"| {NAMES.get(method, method)} | {c['rounds']} | {_mb(c['upload_bytes_per_site'])}"
            f" | {_mb(c['download_bytes_per_site'])} | {c['client_flops_per_site'] / 1e9:.3g}"
            f" | {c['server_flops'] / 1e9:.3g} | {c['images_seen']:.0f} | {c['wall_s']:.0f} |")
    return "\n".join(lines)


def ablation_table(ablations: list[dict]) -> str:
    if not ablations:
        return "(no ablations run)"
    cols = _columns({a["name"]: a["metrics"] for a in ablations})
    lines = ["| SMSD ablation | " + " | ".join(c[2] for c in cols) + " | upload MB / site |",
             "|---|" + "---|" * (len(cols) + 1)]
    for a in ablations:
        cells = [_cell(a["metrics"].get(p, {}).get(f)) for p, f, _ in cols]
        lines.append(f"| {a['name']} | " + " | ".join(cells)
                     + f" | {_mb(a['cost']['upload_bytes_per_site'])} |")
    return "\n".join(lines)


def comparison_lines(comparisons: dict) -> list[str]:
    lines = []
    for partition, pairs in comparisons.items():
        # "smsd - other", in the tables' order of `other` (JSON sorts a saved summary's keys).
        for pair, diffs in sorted(pairs.items(), key=lambda kv: _rank(kv[0].split(" - ")[-1])):
            parts = [f"{title} {100 * float(f):g}%: {100 * d['mean']:+.1f} ± {100 * d['se']:.1f}"
                     for probe, title in PROBES for f, d in diffs.get(probe, {}).items()]
            single = any(1 in d.get("seeds", ()) for p in diffs.values() for d in p.values())
            lines.append(f"- {partition}, {pair}: " + "; ".join(parts)
                         + (" (one side has one seed: its spread is not in the error)"
                            if single else ""))
    return lines


def _images(count: int | None, split: str) -> str:
    return f"the first {count} {split} images" if count else f"all the {split} images"


def markdown(summary: dict) -> str:
    s = summary["setup"]
    out = [
        "# SMSD against its baselines",
        "",
        f"Data: {s['data']}, {_images(s['images'], 'train')} split over {s['sites']} "
        f"sites; test: {_images(s['test_images'], 'held-out')}. Model: ViT "
        f"`{s['model']}`, patch {s['patch']}. Pre-training: {s['server_epochs']:g} epochs of the "
        f"pooled images at batch {s['batch']} for SMSD's server and centralized DINO; "
        f"FedAvg-DINO {s['fedavg_rounds']} rounds x {s['fedavg_local_epochs']:g} local epochs "
        f"(the same images seen). SMSD sites: keep {s['keep']}, M = {s['samples']}. "
        f"Seeds {s['seeds']} (FedAvg-DINO and centralized DINO: "
        f"{s.get('image_dino_seeds', s['seeds'])}); cells are mean ± std over seeds where "
        "there are several (accuracy %, 10 classes). "
        f"Fine-tuning: up to {s['finetune_epochs']} epochs, at least "
        f"{s.get('finetune_min_steps', 0)} and at most {s['finetune_max_steps'] or 'any number of'}"
        f" steps, the best validation epoch tested. Time: "
        f"{summary.get('wall_s', 0) / 60:.1f} min, the sum of the runs' times.",
        "",
        "Fine-tune only and centralized DINO do not depend on how the sites split the data "
        "(labels are drawn from the pooled images), so their rows repeat in every partition's "
        "table; the linear and k-NN columns of fine-tune only are probes of the random, "
        "untrained body.",
    ]
    for partition, table in summary["table"].items():
        out += ["", f"## Accuracy, sites {partition}", "", metrics_table(table),
                "", f"### Macro AUC, sites {partition}", "", metrics_table(table, "auc"),
                "", f"### Cost, sites {partition}", "", cost_table(summary["cost"][partition])]
    out += ["", "## Differences of means (accuracy points ± standard error)", "",
            *comparison_lines(summary["comparisons"])]
    out += ["", "## SMSD ablations (one seed)", "", ablation_table(summary["ablations"])]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- figures


def _rank(method: str) -> int:
    """A method's place in the tables' order (unknown names last)."""
    return list(NAMES).index(method) if method in NAMES else len(NAMES)


def _in_order(methods: dict) -> list:
    """`methods.items()` in the tables' order (JSON sorts the keys of a saved summary)."""
    return sorted(methods.items(), key=lambda item: _rank(item[0]))


def _color(method: str) -> str:
    """One colour per method in every panel."""
    return f"C{list(NAMES).index(method)}" if method in NAMES else "grey"


def fractions_figure(table: dict) -> Figure:
    """Accuracy against label fraction, one line per method: probes by row, partitions by
    column; error bars are the std over seeds."""
    probes = [(p, t) for p, t in PROBES[:2]]
    fig = Figure(figsize=(5 * len(table), 3.6 * len(probes)), layout="constrained")
    axes = fig.subplots(len(probes), len(table), squeeze=False)
    for col, (partition, methods) in enumerate(table.items()):
        for row, (probe, title) in enumerate(probes):
            ax = axes[row][col]
            for method, stats in _in_order(methods):
                points = stats.get(probe, {})
                if not points:
                    continue
                fractions = sorted(points, key=float)
                x = [100 * float(f) for f in fractions]
                y = [100 * points[f]["accuracy"]["mean"] for f in fractions]
                err = [100 * points[f]["accuracy"]["std"] for f in fractions]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=NAMES.get(method, method),
                            color=_color(method))
            ax.set_xscale("log")
            ax.set_xlabel("labels used (% of the sites' images)")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"{title}, sites {partition}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    return fig


def bytes_figure(summary: dict, probe: str = "linear") -> Figure:
    """Accuracy at the middle label fraction against the bytes each site uploads, per
    partition; SMSD ablations in grey. Fine-tune only uploads nothing: a dashed line."""
    table, cost = summary["table"], summary["cost"]
    fig = Figure(figsize=(5.5 * len(table), 4), layout="constrained")
    axes = fig.subplots(1, len(table), squeeze=False)[0]
    for ax, (partition, methods) in zip(axes, table.items()):
        fractions = sorted({f for m in methods.values() for f in m.get(probe, {})}, key=float)
        if not fractions:
            continue
        f = fractions[len(fractions) // 2]
        for method, stats in _in_order(methods):
            point, c = stats.get(probe, {}).get(f), cost[partition].get(method)
            if point is None:
                continue
            acc = 100 * point["accuracy"]["mean"]
            if not c or c["upload_bytes_per_site"] == 0:
                ax.axhline(acc, ls="--", color="grey", lw=1)
                ax.annotate(NAMES.get(method, method), (0.02, acc), xycoords=("axes fraction",
                            "data"), fontsize=8, va="bottom")
                continue
            ax.errorbar(c["upload_bytes_per_site"] / 2 ** 20, acc,
                        yerr=100 * point["accuracy"]["std"], marker="o", capsize=3,
                        label=NAMES.get(method, method), color=_color(method))
        for a in summary["ablations"]:
            if a["partition"] == partition and f in a["metrics"].get(probe, {}):
                x = a["cost"]["upload_bytes_per_site"] / 2 ** 20
                ax.plot(x, 100 * a["metrics"][probe][f]["accuracy"]["mean"], "x", color="grey")
                ax.annotate(a["name"], (x, 100 * a["metrics"][probe][f]["accuracy"]["mean"]),
                            fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("MB uploaded per site (whole pre-training)")
        ax.set_ylabel(f"test accuracy %, {probe} with {100 * float(f):g}% labels")
        ax.set_title(f"accuracy against communication, sites {partition}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return fig


def write(summary: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Writes study.json, study.md and the two PNGs into `out_dir` (each atomically)."""
    out_dir = files.as_path(out_dir)
    files.write_json(out_dir / JSON, summary)
    files.write_text(out_dir / MARKDOWN, markdown(summary))
    paths = [out_dir / JSON, out_dir / MARKDOWN]
    for name, fig in ((FRACTIONS_PNG, fractions_figure(summary["table"])),
                      (BYTES_PNG, bytes_figure(summary))):
        paths.append(files.save_figure(out_dir / name, fig))
    return paths
