"""The learning curve (`--mode=curve`): one long single round, its teacher probed at
checkpoints. When does SMSD pay on this machine?

    python -m launch.main --config=configs/curve_fashion.py --mode=curve   # resumes

The sites encode once. The server runs one schedule of `config.server.epochs` epochs (warm-up,
cosine decay and the teacher's momentum reach their ends there) and stops at each of
`config.curve.probe_epochs`: a checkpoint and the teacher's export at that step, kept in the
probe's folder. Each stop's teacher is probed at the site with the downstream protocol
(linear probe and k-NN at `downstream.label_fractions`, fine-tuning at
`downstream.finetune_fractions`), labels and fine-tuning seeded by the first of
`config.curve.seeds`; the last stop again for each further seed. Beside it, on the same
labels: for each seed raw pixels, and the random body of the same init, probed and
fine-tuned to convergence (fine-tune only). Every comparison is paired: a probe of the
teacher is read against the references of its own seeds (the same labelled images).

Every probe is a folder with its `run.json` (`study.run_plan`), and the server resumes from
its checkpoints, so a stopped curve resumes where it was; `config.curve.deadline_minutes`
starts no probe after that long (a tiny value writes the results of the probes done). The
results
(`WORKDIR/results/curve.{json,md,png}`) are written again after every probe, so a curve still
running has its early points.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import study
from experiments import study_tables as tables
from smsd_jax import consortium, data, downstream, evaluation, export, files, models, report
from smsd_jax import server, site
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout

JSON, MARKDOWN, PNG = "curve.json", "curve.md", "curve.png"
PROBES = ("linear", "knn", "finetune")


# ---------------------------------------------------------------- the plan


def plan(config) -> list[dict]:
    """The curve's runs in order, `{"kind", "seed", "epochs", "dir"}`: for each seed raw
    pixels and the random body (its probes and fine-tune only), the teacher at each probe
    epoch (first seed), then the last epoch's teacher for each further seed."""
    s = config.curve
    epochs = sorted(float(e) for e in s.probe_epochs)
    if not epochs or epochs[0] <= 0 or epochs[-1] > config.server.epochs:
        raise SMSDError(f"config.curve.probe_epochs={tuple(s.probe_epochs)} must lie in "
                        f"(0, config.server.epochs={config.server.epochs}]")
    if not s.seeds:
        raise SMSDError("config.curve.seeds is empty; give at least one seed, e.g. (0,)")
    first, *more = s.seeds
    runs = [dict(kind=kind, seed=seed, epochs=0.0, dir=f"{name}/seed{seed}")
            for seed in s.seeds for kind, name in (("pixels", "raw_pixels"),
                                                   ("random", "random_body"))]
    runs += [dict(kind="smsd", seed=first, epochs=e, dir=f"smsd/epochs{e:g}") for e in epochs]
    runs += [dict(kind="smsd", seed=seed, epochs=epochs[-1], dir=f"smsd/epochs{epochs[-1]:g}"
                  f"_seed{seed}") for seed in more]
    return runs


def stop_step(config, num_images: int, epochs: float) -> int:
    """The server step after `epochs` epochs of `num_images` images (the server's own count:
    whole batches an epoch)."""
    return max(1, int(round(epochs * (num_images // config.server.batch_size))))


def _probe_config(config, seed: int):
    """`config` with the downstream protocol seeded by `seed` (labels, tail, order; the random
    body's init); the data split, keys and server keep `config.seed`."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = seed
    return c


def _encode(config, layout: Layout, train) -> list[Path]:
    """Every site's payload of the curve's one single round (resumes; done: reads only)."""
    if not layout.head.exists():
        consortium.init_head(config, layout.head, secret_seed=config.consortium_seed)
    parts = data.split_sites(train.labels, config.data, config.seed)
    dirs = [layout.payload(k) for k in range(len(parts))]
    for k, idx in enumerate(parts):
        site.run_site(config, k, train, idx, layout.head, dirs[k],
                      secret_seed=config.site.secret_seed + k)
    return dirs


def _teacher_at(config, layout: Layout, train, epochs: float, keep: Path) -> dict:
    """Runs the server on to `epochs` and copies the teacher's export there to `keep`
    (written under a temporary name, then renamed); returns the server's summary."""
    num_images = data.subset_size(config.data, len(train))
    start = time.perf_counter()
    final = server.run_server(config, _encode(config, layout, train), layout,
                              stop_at_step=stop_step(config, num_images, epochs))
    partial = keep.with_name(keep.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(final["body"], partial)
    shutil.rmtree(keep, ignore_errors=True)
    partial.rename(keep)
    return dict(step=final["step"], steps=final["steps"], loss=final.get("loss"),
                teacher_entropy=final.get("teacher_entropy"),
                server_s=time.perf_counter() - start)


def _execute(config, run: dict, run_dir: Path, layout: Layout, train, test) -> dict:
    c = _probe_config(config, run["seed"])
    record = dict(kind=run["kind"], seed=run["seed"], epochs=run["epochs"])
    if run["kind"] == "pixels":
        return dict(record, results=downstream.evaluate_pixels(c, train, test))
    if run["kind"] == "random":
        if not layout.head.exists():
            consortium.init_head(config, layout.head, secret_seed=config.consortium_seed)
        results = downstream.evaluate_body(c, layout.head, models.body_from_config(c), None,
                                           train_source=train, test_source=test,
                                           name=f"random body, seed {run['seed']}")
        return dict(record, results=results)
    body_dir = run_dir / "body"
    if body_dir.exists():  # the server reached this stop before the probe was cut short
        server_record = files.read_json(run_dir / "server.json")
    else:
        server_record = _teacher_at(config, layout, train, run["epochs"], body_dir)
        files.write_json(run_dir / "server.json", server_record)
    body, params, _ = export.load_body(body_dir)
    results = downstream.evaluate_body(
        c, layout.head, body.clone(dtype=jnp.float32), params, train_source=train,
        test_source=test, name=f"SMSD at {run['epochs']:g} epochs, seed {run['seed']}")
    return dict(record, results=results, server=server_record)


def run_curve(config, workdir: Layout | str | Path) -> dict:
    """Runs (or resumes) every run of `plan(config)`, writing the curve's JSON, table and
    figure after each; returns the summary."""
    layout = Layout.of(workdir)
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    runs = plan(config)

    def write(records: list[dict]) -> dict:
        summary = summarize(config, records)
        files.write_results(layout.results, "curve", summary, markdown(summary),
                            figure(summary))
        return summary

    records = study.run_plan(
        runs, layout.root / "curve",
        lambda run, run_dir: _execute(config, run, run_dir, layout, train, test),
        name="curve", deadline_s=60 * config.curve.deadline_minutes, after=write)
    return write(records)


# ---------------------------------------------------------------- summary


def _stats(records: list[dict], probe: str) -> dict:
    """`{fraction: accuracy stats}` of `probe` over `records` (seeds)."""
    fractions = sorted({f for r in records for f in r["results"].get(probe, {})}, key=float)
    return {f: tables.stats([r["results"][probe][f]["accuracy"] for r in records
                             if f in r["results"].get(probe, {})]) for f in fractions}


def _by_seed(records: list[dict], probes) -> dict:
    """`{seed: {probe: {fraction: accuracy}}}` of reference `records` (one per seed)."""
    return {str(r["seed"]): {p: {f: m["accuracy"] for f, m in r["results"].get(p, {}).items()}
                             for p in probes} for r in records}


def summarize(config, records: list[dict]) -> dict:
    """Accuracy (mean, std over seeds) of the teacher at each probe epoch, the references
    (over all seeds, and per seed for the paired answers), the server's time, and the plain
    answers."""
    smsd = [r for r in records if r["kind"] == "smsd"]
    by_epoch = {}
    for e in sorted({r["epochs"] for r in smsd}):
        rows = [r for r in smsd if r["epochs"] == e]
        by_epoch[f"{e:g}"] = dict({p: _stats(rows, p) for p in PROBES},
                                  step=max(r["server"]["step"] for r in rows),
                                  seeds=sorted(r["seed"] for r in rows))
    pixels = [r for r in records if r["kind"] == "pixels"]
    random = [r for r in records if r["kind"] == "random"]
    references = {"raw_pixels": {p: _stats(pixels, p) for p in ("linear", "knn")},
                  "random_body": {p: _stats(random, p) for p in PROBES},
                  "by_seed": {"raw_pixels": _by_seed(pixels, ("linear", "knn")),
                              "random_body": _by_seed(random, PROBES)}}
    server_s = sum(r["server"]["server_s"] for r in smsd)
    s = config.server
    return dict(
        setup=dict(images=config.data.subset or "all", sites=config.data.num_sites,
                   partition=config.data.partition, model=config.model.size,
                   init=config.model.init, batch=s.batch_size, epochs=s.epochs,
                   seeds=list(config.curve.seeds),
                   label_fractions=list(config.downstream.label_fractions),
                   finetune_fractions=list(config.downstream.finetune_fractions)),
        smsd=by_epoch, references=references, answers=answers(by_epoch, references),
        server_hours=server_s / 3600,
        wall_s=float(sum(r.get("seconds", 0.0) for r in records)), runs=records)


def _paired(by_seed: dict, seeds: list, probe: str, fraction: str) -> float | None:
    """The mean of a reference over `seeds` (None unless every one of them has it)."""
    values = [by_seed.get(str(seed), {}).get(probe, {}).get(fraction) for seed in seeds]
    return None if not values or None in values else float(np.mean(values))


def _first_beat(points: list[tuple[float, float, float]], what: str) -> str:
    """When the points `(epoch, SMSD's accuracy, the reference's on the same labels)` first
    have SMSD ahead, in words."""
    points = sorted(points)
    beaten = [(e, ours, ref) for e, ours, ref in points if ours > ref]
    if beaten:
        e, ours, ref = beaten[0]
        return f"SMSD beats {what} from epoch {e:g} ({100 * ours:.1f} against {100 * ref:.1f})"
    e, ours, ref = max(points, key=lambda p: p[1] - p[2])
    return (f"SMSD does not beat {what} within {points[-1][0]:g} epochs (closest at epoch "
            f"{e:g}: {100 * ours:.1f} against {100 * ref:.1f})")


def answers(by_epoch: dict, references: dict) -> list[str]:
    """Sentences a person reads: from which epoch the teacher beats raw pixels and the random
    body on each frozen probe, and fine-tune only on fine-tuning, each against the references
    of the same seeds (the same labelled images); and the last epoch's fine-tuning gain over
    fine-tune only, with its seeds."""
    lines, by_seed = [], references["by_seed"]
    for probe in PROBES:
        fractions = sorted({f for v in by_epoch.values() for f in v[probe]}, key=float)
        against = ([("raw pixels", "raw_pixels")] if probe != "finetune" else []) + [
            ("fine-tune only" if probe == "finetune" else "the random body", "random_body")]
        for f in fractions:
            where = f"{evaluation.PROBES[probe]} {100 * float(f):g}%"
            for what, name in against:
                points = [(float(e), v[probe][f]["mean"],
                           _paired(by_seed[name], v["seeds"], probe, f))
                          for e, v in by_epoch.items() if f in v[probe]]
                points = [p for p in points if p[2] is not None]
                if points:
                    lines.append(f"{where}: {_first_beat(points, what)}")
    last = max(by_epoch, key=float, default=None)
    for f, ours in (by_epoch[last]["finetune"].items() if last else ()):
        ref = _paired(by_seed["random_body"], by_epoch[last]["seeds"], "finetune", f)
        if ref is not None:
            lines.append(
                f"fine-tune {100 * float(f):g}% at epoch {last}: SMSD {100 * ours['mean']:.1f} "
                f"against fine-tune only {100 * ref:.1f} on the same {ours['n']} seed(s): "
                f"{100 * (ours['mean'] - ref):+.1f} points")
    return lines


# ---------------------------------------------------------------- table and figure


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return (f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}" if stats["n"] > 1
            else f"{100 * stats['mean']:.1f}")


def _columns(summary: dict) -> list[tuple[str, str]]:
    s = summary["setup"]
    return ([(p, f"{f:g}") for p in ("linear", "knn") for f in s["label_fractions"]]
            + [("finetune", f"{f:g}") for f in s["finetune_fractions"]])


def markdown(summary: dict) -> str:
    """The curve as a Markdown table (rows: the teacher at each probe epoch, then the
    references; columns: probe and label fraction), and the answers."""
    s = summary["setup"]
    columns = _columns(summary)
    head = "| | epoch | step | " + " | ".join(
        f"{evaluation.PROBES[p]} {100 * float(f):g}%" for p, f in columns) + " |"
    lines = [f"# Learning curve: one SMSD run of {s['epochs']:g} epochs on {s['images']} "
             f"images, {s['sites']} {s['partition']} sites, ViT {s['model']} ({s['init']} "
             f"init), batch {s['batch']}", "",
             "Test accuracy (%) of the teacher at each probe epoch (mean ± std over seeds "
             f"{s['seeds']} where the row has more than one).", "", head,
             "|---|---|---|" + "---|" * len(columns)]
    for epoch, v in summary["smsd"].items():
        lines.append(f"| SMSD | {epoch} | {v['step']} | "
                     + " | ".join(_cell(v[p].get(f)) for p, f in columns) + " |")
    by_seed = summary["references"]["by_seed"]
    for name, title in (("raw_pixels", "raw pixels"),
                        ("random_body", "random body (fine-tune only)")):
        for seed, values in by_seed[name].items():
            lines.append(f"| {title}, seed {seed} | - | - | " + " | ".join(
                f"{100 * values[p][f]:.1f}" if f in values.get(p, {}) else "-"
                for p, f in columns) + " |")
    lines += ["", "## Answers", "",
              "Each against the references of the same seeds (the same labelled images).", "",
              *[f"- {line}" for line in summary["answers"]], "",
              f"Server time: {summary['server_hours']:.2f} h; with the probes "
              f"{summary['wall_s'] / 3600:.2f} h on this machine."]
    return "\n".join(lines) + "\n"


def figure(summary: dict):
    """One panel per probe and fraction: accuracy against epochs (log 2), references as
    horizontal lines."""
    columns = _columns(summary)
    fig = report.new_figure(figsize=(3.6 * len(columns), 3.6))
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    refs = summary["references"]
    for ax, (probe, f) in zip(axes, columns):
        points = sorted((float(e), v[probe][f]) for e, v in summary["smsd"].items()
                        if f in v[probe])
        if points:
            x = np.array([e for e, _ in points])
            mean = np.array([100 * s["mean"] for _, s in points])
            std = np.array([100 * s["std"] for _, s in points])
            ax.plot(x, mean, marker="o", label="SMSD teacher")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            ax.set_xscale("log", base=2)
        for name, stats, style in (
                ("raw pixels", refs["raw_pixels"].get(probe, {}).get(f), "--"),
                ("fine-tune only" if probe == "finetune" else "random body",
                 refs["random_body"][probe].get(f), ":")):
            if stats:
                ax.axhline(100 * stats["mean"], color="gray", linestyle=style, label=name)
        ax.set_xlabel("epochs of the run")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{evaluation.PROBES[probe]}, {100 * float(f):g}% labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("one single round, probed at its checkpoints (Fashion-MNIST, CPU)")
    return fig
