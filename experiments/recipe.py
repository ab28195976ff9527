"""The recipe for the CPU budgets (`--mode=recipe`): single-change ablations from a reference.

    python -m launch.main --config=configs/recipe_fashion.py --mode=recipe   # resumes

Every setting of `config.recipe.settings` is a name and config overrides ("model.init=lecun"),
each applied alone to the reference (the first setting, usually no override). Each runs the
whole single round at the reference's seed (`study.seeded`: the same data split, keys and
label subsets) and probes the teacher body: linear probe and k-NN at
`downstream.label_fractions`, fine-tuning at `downstream.finetune_fractions`. A setting named
in `config.recipe.equal_compute` costs more (or less) per step than the reference: its server
epochs are scaled by the ratio of the compiled steps' FLOPs, so that it gets the reference's
compute, not its step count. Beside them: raw pixels, and the random body of every
`model.init` among the settings (the gain each setting is read against), and for the
reference the linear probe on the old feature (the final class token) beside DINO's. The
reference and the random bodies are also fine-tuned; the other settings are probed only.

Each run is a folder with its `run.json` (`study.run_plan`), so a stopped recipe resumes;
`config.recipe.deadline_minutes` starts no run after that long, and the results then hold the
runs done so far. Writes `WORKDIR/results/recipe.{json,md,png}`; the JSON keeps every run's
record, and `config.recipe.resume_from=<that JSON>` takes the runs it records (of the same
config: `study.fingerprint`) instead of running them again, so a recipe can be spread over
machines or days.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import frontier, study
from smsd_jax import consortium, data, downstream, export, files, models, report
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout


# config.recipe keys that only say which runs the recipe holds or when it stops.
PLAN_KEYS = tuple(f"recipe.{k}" for k in ("settings", "equal_compute", "deadline_minutes",
                                           "resume_from", "chosen", "chosen_seeds"))


def probes(config) -> list[tuple[str, str]]:
    """(probe, fraction key) of every frozen-feature result: linear and k-NN at each of
    `config.downstream.label_fractions`."""
    return [(p, downstream.protocol.result_key(f)) for p in ("linear", "knn")
            for f in config.downstream.label_fractions]


def step_flops(config) -> float:
    """XLA's FLOPs of one server step of `config` (its payload shape from `config.site`)."""
    k = int(config.site.keep * (config.data.image_size // config.model.patch_size) ** 2)
    shape = (config.site.num_samples, k, models.token_width(config))
    return study.server_step_flops(config, shape)


def setting(config, overrides: str, equal_compute: bool):
    """The reference `config` with `overrides`, and with `equal_compute` its server epochs
    scaled to the reference's compute."""
    c = frontier.setting_config(config, overrides)
    if equal_compute:
        ratio = step_flops(config) / step_flops(c)
        with c.unlocked():
            c.server.epochs = float(config.server.epochs * ratio)
    return c


def plan(config) -> list[dict]:
    """The recipe's runs, `{"kind", "name", "overrides", "dir"}`: the reference (`kind`
    "smsd"), raw pixels and the random body of its init, then each other setting, followed by
    the random body of its init when no setting before it had that init; then, once one is
    chosen (`config.recipe.chosen`), the chosen recipe at each of `config.recipe.chosen_seeds`
    (each also with `"seed"` and `"chosen": True`) beside its random body and raw pixels of
    that seed."""
    r = config.recipe
    names = [name for name, _ in r.settings]
    if len(set(names)) != len(names):
        raise SMSDError(f"config.recipe.settings repeats a name: {names}")
    unknown = set(r.equal_compute) - set(names)
    if unknown:
        raise SMSDError(f"config.recipe.equal_compute names {sorted(unknown)}, which "
                        "config.recipe.settings does not have")
    runs, inits = [], set()
    for i, (name, overrides) in enumerate(r.settings):
        init = frontier.setting_config(config, overrides).model.init  # fails early if bad
        runs.append(dict(kind="smsd", name=name, overrides=overrides, dir=name,
                         equal_compute=name in r.equal_compute))
        if i == 0:
            runs.append(dict(kind="pixels", name="raw pixels", overrides="", dir="raw_pixels"))
        if init not in inits:
            inits.add(init)
            runs.append(dict(kind="random", name=f"random body ({init} init)",
                             overrides=overrides, head_from=name, dir=f"random_{init}"))
    if r.chosen:
        init = frontier.setting_config(config, r.chosen).model.init
        for seed in r.chosen_seeds:
            tag = dict(seed=int(seed), chosen=True)
            runs += [dict(kind="smsd", name="chosen", overrides=r.chosen,
                          dir=f"chosen_seed{seed}", **tag),
                     dict(kind="random", name=f"random body ({init} init)", overrides=r.chosen,
                          head_from=f"chosen_seed{seed}", dir=f"random_{init}_seed{seed}", **tag),
                     dict(kind="pixels", name="raw pixels", overrides="",
                          dir=f"raw_pixels_seed{seed}", **tag)]
    return runs


def _probes_only(c):
    c = copy.deepcopy(c)
    with c.unlocked():
        c.downstream.finetune_fractions = ()
    return c


def _execute(config, run: dict, root: Path, train, test) -> dict:
    r = config.recipe
    base = study.seeded(config, run.get("seed", r.seed), r.partition)
    c = setting(base, run["overrides"], run.get("equal_compute", False))
    chosen = dict(seed=run["seed"], chosen=True, kind=run["kind"]) if run.get("chosen") else {}
    return dict(_measure(c, run, root, train, test), **chosen)


def _measure(c, run: dict, root: Path, train, test) -> dict:
    """The record of one run of `plan` with its config `c`."""
    if run["kind"] == "pixels":
        return dict(name=run["name"], results=downstream.evaluate_pixels(c, train, test))
    if run["kind"] == "random":
        head_run = Layout(root / run["head_from"])
        if not head_run.head.exists():  # that run's record was taken from elsewhere
            consortium.set_up(c, head_run)
        body = models.body_from_config(c)
        results = downstream.evaluate_body(c, head_run.head, body, None, train_source=train,
                                           test_source=test, name=run["name"])
        return dict(name=run["name"], init=c.model.init, results=results)
    reference = run["dir"] == c.recipe.settings[0][0]
    tuned = reference or run.get("chosen", False)  # fine-tuned; the others probed only
    record = study.run_method(c if tuned else _probes_only(c), "smsd", root / run["dir"],
                              train, test)
    record.update(name=run["name"], overrides=run["overrides"], init=c.model.init,
                  epochs=float(c.server.epochs), steps=int(record["cost"]["images_seen"]
                                                           // c.server.batch_size))
    if reference:  # the old linear feature beside DINO's
        old = _probes_only(c)
        with old.unlocked():
            old.downstream.linear_features = "cls"
        layout = Layout(root / run["dir"])
        body, params, _ = export.load_body(layout.body)
        record["old_feature"] = downstream.evaluate_body(
            old, layout.head, body.clone(dtype=jnp.float32), params, train_source=train,
            test_source=test, name=f"{run['name']}, linear on the final class token")
    return record


def _cell(results: dict, probe: str, fraction: str) -> float:
    entry = results.get(probe, {}).get(fraction)
    return float("nan") if entry is None else 100 * entry["accuracy"]


def summarise(config, records: list[dict]) -> dict:
    """Each setting's accuracies, time and gain over the random body of its init; the chosen
    recipe's seeds (`chosen_summary`)."""
    frozen = probes(config)
    chosen = chosen_summary(config, [r for r in records if r.get("chosen")])
    records = [r for r in records if not r.get("chosen")]
    random = {r["init"]: r["results"] for r in records if r["name"].startswith("random body")}
    pixels = next((r["results"] for r in records if r["name"] == "raw pixels"), {})
    rows = []
    for r in records:
        if "overrides" not in r:
            continue
        res, own = r["results"], random.get(r["init"])
        rows.append(dict(
            name=r["name"], overrides=r["overrides"], epochs=r["epochs"], steps=r["steps"],
            wall_s=r["cost"]["wall_s"], server_tflop=r["cost"]["server_flops"] / 1e12,
            probes={f"{p} {f}": _cell(res, p, f) for p, f in frozen},
            finetune={f: 100 * m["accuracy"] for f, m in res.get("finetune", {}).items()},
            gain_over_random=None if own is None else {
                f"{p} {f}": _cell(res, p, f) - _cell(own, p, f) for p, f in frozen},
            old_feature=None if "old_feature" not in r else {
                f"{p} {f}": _cell(r["old_feature"], p, f) for p, f in frozen if p == "linear"}))
    baselines = {"raw pixels": {f"{p} {f}": _cell(pixels, p, f) for p, f in frozen}} \
        if pixels else {}
    for init, res in random.items():
        baselines[f"random body ({init} init)"] = _accuracies(config, res)
    return dict(seed=config.recipe.seed, partition=config.recipe.partition,
                probes=[f"{p} {f}" for p, f in frozen],
                reference=rows[0]["name"] if rows else None, rows=rows, baselines=baselines,
                chosen=chosen)


def _accuracies(config, results: dict) -> dict:
    """`{"linear 0.01": %, ..., "finetune 0.01": %}` of one run's results."""
    return {f"{p} {f}": _cell(results, p, f) for p, f in probes(config)} | {
        f"finetune {f}": 100 * m["accuracy"] for f, m in results.get("finetune", {}).items()}


def chosen_summary(config, records: list[dict]) -> dict | None:
    """The chosen recipe (`config.recipe.chosen`) on its seeds: per seed, its accuracies, its
    random body's and raw pixels'; over the seeds done, each one's mean and standard
    deviation, and of the gains (paired by seed) over the random body and raw pixels. None
    before any of its runs."""
    if not records:
        return None
    by_seed = {}
    for r in records:
        by_seed.setdefault(r["seed"], {})[r["kind"]] = _accuracies(config, r["results"])
    seeds = sorted(s for s, kinds in by_seed.items() if len(kinds) == 3)

    def mean_std(values: list[float]) -> dict:
        return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1))
                    if len(values) > 1 else None)

    def stats(kind: str, minus: str | None = None) -> dict:
        first = by_seed[seeds[0]] if seeds else {}
        keys = [k for k in first.get(kind, {}) if minus is None or k in first[minus]]
        return {k: mean_std([by_seed[s][kind][k] - (by_seed[s][minus][k] if minus else 0.0)
                           for s in seeds]) for k in keys}

    return dict(overrides=config.recipe.chosen, seeds=seeds,
                per_seed={str(s): by_seed[s] for s in sorted(by_seed)},
                smsd=stats("smsd"), random=stats("random"), pixels=stats("pixels"),
                gain_over_random=stats("smsd", "random"), gain_over_pixels=stats("smsd", "pixels"))


def _num(value: float, sign: bool = False) -> str:
    """A table cell: one decimal, or "-" for a value not measured."""
    return "-" if np.isnan(value) else f"{value:+.1f}" if sign else f"{value:.1f}"


def _baselines(summary: dict) -> list[tuple[str, dict]]:
    """The baselines in the tables' order, also from JSON (whose keys come sorted): raw
    pixels, then the random bodies by name."""
    return sorted(summary["baselines"].items(), key=lambda kv: (kv[0] != "raw pixels", kv[0]))


def _title(key: str) -> str:
    probe, fraction = key.split()
    return f"{probe} {100 * float(fraction):g}%"


def markdown(summary: dict) -> str:
    keys = summary["probes"]
    tuned = sorted({f for r in summary["rows"] for f in r["finetune"]}, key=float)
    head = ("| setting | overrides | epochs | round min | " + " | ".join(map(_title, keys))
            + "".join(f" | fine-tune {100 * float(f):g}%" for f in tuned)
            + " | min gain over random |")
    lines = [f"# Recipe: single changes from `{summary['reference']}` (seed {summary['seed']}, "
             f"{summary['partition']} sites)", "", head,
             "|---" * (5 + len(keys) + len(tuned)) + "|"]
    nan = float("nan")
    for r in summary["rows"]:
        gains = r["gain_over_random"]
        cells = " | ".join(_num(r["probes"][k]) for k in keys)
        tunes = "".join(f" | {_num(r['finetune'].get(f, nan))}" for f in tuned)
        lines.append(f"| {r['name']} | `{r['overrides'] or '-'}` | {r['epochs']:.2f} | "
                     f"{r['wall_s'] / 60:.1f} | {cells}{tunes} | "
                     f"{_num(min(gains.values()) if gains else nan, sign=True)} |")
    for name, cells in _baselines(summary):
        probe_cells = " | ".join(_num(cells[k]) for k in keys)
        tunes = "".join(f" | {_num(cells.get(f'finetune {f}', nan))}" for f in tuned)
        lines.append(f"| {name} | | | | {probe_cells}{tunes} | |")
    for r in summary["rows"]:
        if r["old_feature"]:
            lines += ["", f"Linear probe of `{r['name']}` on the final class token (the old "
                      f"feature) instead of DINO's: " + ", ".join(
                          f"{_title(k)} {v:.1f}" for k, v in r["old_feature"].items()) + "."]
    lines += ["", "Accuracy (%) on the test images; 'min gain over random' is the smallest "
              "gain of the frozen probes over the random body of the same init; round min is "
              "the single round's wall time (sites and server) on this machine."]
    if summary.get("chosen"):
        lines += [""] + _chosen_markdown(summary["chosen"])
    return "\n".join(lines) + "\n"


def _chosen_markdown(chosen: dict) -> list[str]:
    """The chosen recipe's table: mean +/- standard deviation over its seeds."""
    keys = list(chosen["smsd"])
    cell = lambda s, sign=False: "-" if s is None else _num(s["mean"], sign) + (
        "" if s["std"] is None else f" ± {s['std']:.1f}")
    seeds = ", ".join(map(str, chosen["seeds"]))
    lines = [f"## The chosen recipe, `{chosen['overrides']}`, on seeds {seeds}", "",
             "| | " + " | ".join(_title(k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, part, sign in (("SMSD", "smsd", False), ("random body", "random", False),
                             ("raw pixels", "pixels", False),
                             ("gain over the random body", "gain_over_random", True),
                             ("gain over raw pixels", "gain_over_pixels", True)):
        lines.append(f"| {name} | " + " | ".join(cell(chosen[part].get(k), sign)
                                                 for k in keys) + " |")
    return lines + ["", "Mean ± standard deviation over the seeds (each seed: its own split, "
                    "keys and labelled subsets); gains paired by seed."]


def figure(summary: dict):
    fig = report.new_figure(figsize=(max(6.0, 0.9 * len(summary["rows"]) + 2), 4.5))
    ax = fig.subplots()
    names = [r["name"] for r in summary["rows"]]
    x = np.arange(len(names))
    keys = summary["probes"]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r["probes"][key] for r in summary["rows"]],
               width, label=_title(key))
    largest = max((k for k in keys if k.startswith("linear")), key=lambda k: float(k.split()[1]))
    for name, cells in _baselines(summary):
        ax.axhline(cells[largest], linestyle="--", linewidth=1,
                   color="black" if name == "raw pixels" else "gray",
                   label=f"{name}, {_title(largest)}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("single-change ablations of the CPU recipe")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def run_recipe(config, workdir: Layout | str | Path) -> dict:
    """Runs (or resumes) every run of `plan(config)`; writes results/recipe.*."""
    layout = Layout.of(workdir)
    root = layout.root / "recipe"
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    runs, kept = study.spread(config, plan(config), PLAN_KEYS, config.recipe.resume_from)
    records = study.run_plan(runs, root,
                             lambda run, run_dir: _execute(config, run, root, train, test),
                             name="recipe", deadline_s=60 * config.recipe.deadline_minutes,
                             kept=kept)
    summary = dict(summarise(config, records), runs=records)
    files.write_results(layout.results, "recipe", summary, markdown(summary), figure(summary))
    return summary
