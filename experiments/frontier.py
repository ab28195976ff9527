"""The privacy-utility frontier (`--mode=frontier`): what each privacy setting costs in
accuracy, beside what the attacks recover from it.

Every setting of `config.frontier.settings` is a name and config overrides ("model.head_dim=16
site.token_noise=0.1"). For each, two measurements of the same settings:

- utility: the whole single round (head, payloads, server, probes of the teacher) at the
  config's budget and seed, as `--mode=simulate` runs it: linear probe and k-NN at
  `downstream.label_fractions`, fine-tuning at `downstream.finetune_fractions`;
- privacy: every attack of the audit (`audit.evaluate_point`) on a payload made with the
  setting's head width, position std, keep and noise, with the head public and secret.

Each setting is a folder with its `run.json` (`comparison.run_plan`: its utility record and
its attacks), so a stopped frontier resumes; `config.frontier.deadline_minutes` starts no
setting after that long. Writes `WORKDIR/results/frontier.{json,md,png}`; the JSON keeps every
setting's record, and `config.frontier.resume_from=<that JSON>` takes the settings it records
(of the same config: `comparison.fingerprint`) instead of running them again, so a frontier
can be spread over machines or days.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from smsd_jax import data, files, models, ops
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout
from smsd_jax.privacy import dp_accountant
from experiments import privacy_audit as audit
from experiments import study as comparison

# config.frontier keys that only say which runs the frontier holds or when it stops.
PLAN_KEYS = tuple(f"frontier.{k}" for k in ("settings", "deadline_minutes", "resume_from"))


# ---------------------------------------------------------------- settings


def parse_overrides(text: str) -> dict[str, str]:
    """"model.head_dim=16 site.token_noise=0.1" -> {"model.head_dim": "16", ...} (spaces or
    commas between the pairs; "" is no change)."""
    pairs = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SMSDError(f"config.frontier.settings has {item!r} in {text!r}; write "
                            "section.key=value pairs, e.g. model.head_dim=16")
        pairs[key] = value
    return pairs


def _typed(old, value: str, key: str):
    """`value` (text) as the type of the config's current value `old`."""
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        return type(old)(value)
    except (TypeError, ValueError):
        raise SMSDError(f"config.frontier.settings sets {key}={value!r}, which is not a "
                        f"{type(old).__name__} like its current value {old!r}") from None


def setting_config(config, overrides: str):
    """`config` with `overrides` applied (each key must exist; values keep its type)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        for key, value in parse_overrides(overrides).items():
            *path, leaf = key.split(".")
            node = c
            for part in path:
                node = node.get(part) if hasattr(node, "get") else None
                if node is None:
                    break
            if node is None or leaf not in node:
                raise SMSDError(f"config.frontier.settings sets {key}, which the config does "
                                "not have; use an existing key such as model.head_dim")
            node[leaf] = _typed(node[leaf], value, key)
    return c


def plan(config) -> list[dict]:
    """The frontier's runs, in the order given: `{"name", "overrides", "dir"}`."""
    settings = [tuple(s) for s in config.frontier.settings]
    names = [name for name, _ in settings]
    if len(set(names)) != len(names):
        raise SMSDError(f"config.frontier.settings repeats a name: {names}")
    for name, overrides in settings:
        setting_config(config, overrides)  # fail early on a bad setting
    return [dict(name=name, overrides=overrides, dir=name) for name, overrides in settings]


def audit_point(config) -> dict:
    """The audit's point for a setting's config: its token width, position std, keep and
    noise in absolute units: `site.token_noise` times the token scale of a head of that
    width, or, with the Gaussian mechanism, its noise std `dp_noise_multiplier * dp_clip` on
    tokens clipped to `dp_clip` (`ops.gaussian_dp`)."""
    dim, site = models.token_width(config), config.site
    if site.dp_clip > 0:
        noise_std = float(site.dp_noise_multiplier * site.dp_clip)
    else:
        head = models.ViTHead(config.data.image_size, config.model.patch_size, dim,
                              config.model.pos_std)
        size, channels = config.data.image_size, config.data.channels
        params = head.init(jax.random.key(config.privacy.head_seed),
                           jnp.zeros((1, size, size, channels)))["params"]
        noise_std = float(site.token_noise * ops.token_scale(params))
    point = dict(setting="both", sweep="frontier", dim=dim, pos_std=config.model.pos_std,
                 keep=config.site.keep, noise_std=noise_std, dp_clip=float(config.site.dp_clip),
                 dp_noise_multiplier=float(config.site.dp_noise_multiplier),
                 constant_patches=config.model.constant_patches,
                 blank_range=config.model.blank_range)
    point["label"] = (f"both D{dim} pos{point['pos_std']:g} keep{point['keep']:g} "
                      f"noise{noise_std:.3g}" + (f" dp{point['dp_clip']:g}x"
                                                 f"{point['dp_noise_multiplier']:g}"
                                                 if point["dp_clip"] else "")
                      + audit.blank_label(point))
    return point


# ---------------------------------------------------------------- the runs


def _utility(config, run: dict, run_dir: Path, train, test) -> dict:
    c = setting_config(comparison.seeded(config, config.frontier.seed,
                                          config.frontier.partition), run["overrides"])
    record = comparison.run_method(c, "smsd", run_dir, train, test)
    return dict(record, name=run["name"], overrides=run["overrides"])


def _privacy(config, run: dict, prepared) -> dict:
    """The audit's attacks on the setting's payload."""
    c = setting_config(config, run["overrides"])
    point = audit_point(c)
    t = time.perf_counter()
    hd = audit.setup_head(c, prepared, point)
    result = audit.evaluate_point(c, prepared, hd, point, 1000 * c.seed)
    rows = {head: dict(result["shared"], **result[head], head=head) for head in audit.HEADS}
    out = dict(point=point, rows=rows, seconds=time.perf_counter() - t)
    print(f"frontier {run['name']}: attacks in {out['seconds']:.0f} s; secret head: positions "
          f"{100 * rows['secret']['position_accuracy']:.1f}% "
          f"({rows['secret']['position_attack']}), PSNR {rows['secret']['psnr']:.2f} dB",
          flush=True)
    return out


def run_frontier(config, workdir: Layout | str | Path) -> dict:
    """Runs (or resumes) every setting's utility run and attacks; writes the frontier."""
    layout = Layout.of(workdir)
    root = layout.root / "frontier"
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    prepared = audit.prepare(config)

    def execute(run: dict, run_dir: Path) -> dict:
        record = _utility(config, run, run_dir, train, test)
        return dict(record, privacy=_privacy(config, run, prepared))

    runs, kept = comparison.spread(config, plan(config), PLAN_KEYS, config.frontier.resume_from)
    records = comparison.run_plan(runs, root, execute, name="frontier",
                                  deadline_s=60 * config.frontier.deadline_minutes, kept=kept)
    summary = dict(summarize(config, records), runs=records)
    files.write_results(layout.results, "frontier", summary, markdown(summary), figure(summary))
    return summary


# ---------------------------------------------------------------- summary


def _accuracy(results: dict, probe: str, fraction: str) -> float | None:
    entry = results.get(probe, {}).get(fraction)
    return None if entry is None else float(entry["accuracy"])


def summarize(config, records: list[dict]) -> dict:
    """One point per setting: its accuracies, its best attacks (head secret and public), its
    upload per image and, with the Gaussian mechanism, its epsilon per image."""
    fractions = [f"{f:g}" for f in config.downstream.label_fractions]
    tuned = [f"{f:g}" for f in config.downstream.finetune_fractions]
    points = []
    for record in records:
        privacy = record["privacy"]
        c = setting_config(config, record["overrides"])
        k = ops.num_kept((config.data.image_size // c.model.patch_size) ** 2, c.site.keep)
        secret, public = privacy["rows"]["secret"], privacy["rows"]["public"]
        epsilon = (dp_accountant.image_epsilon(c.site.dp_delta, c.site.dp_noise_multiplier, k,
                                            c.site.num_samples) if c.site.dp_clip > 0 else None)
        points.append(dict(
            name=record["name"], overrides=record["overrides"], token_width=privacy["point"]["dim"],
            payload_bytes_per_image=int(c.site.num_samples * k * privacy["point"]["dim"]
                                        * np.dtype(c.site.payload_dtype).itemsize),
            epsilon=epsilon, delta=c.site.dp_delta if epsilon is not None else None,
            accuracy={f"{p} {f}": _accuracy(record["results"], p, f)
                      for p in ("linear", "knn") for f in fractions}
            | {f"finetune {f}": _accuracy(record["results"], "finetune", f) for f in tuned},
            secret=dict(position_accuracy=secret["position_accuracy"],
                        position_attack=secret["position_attack"], psnr=secret["psnr"],
                        ssim=secret["ssim"], reconstruction_attack=secret["reconstruction_attack"],
                        grouping=audit.best_grouping(secret.get("grouping"))),
            public=dict(position_accuracy=public["position_accuracy"], psnr=public["psnr"],
                        ssim=public["ssim"]),
            chance_accuracy=secret["chance_accuracy"], mean_image=secret["mean_image"],
            seconds=record.get("seconds", 0.0)))  # the utility run and the attacks
    return dict(setup=dict(images=config.data.subset or "all", sites=config.data.num_sites,
                           partition=config.frontier.partition, seed=config.frontier.seed,
                           model=config.model.size, server_epochs=config.server.epochs,
                           batch=config.server.batch_size, label_fractions=fractions,
                           finetune_fractions=tuned),
                points=points, wall_s=float(sum(p["seconds"] for p in points)))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict) -> str:
    """The frontier as a table: a row per setting, accuracy beside the best attacks."""
    s, points = summary["setup"], summary["points"]
    columns = list(points[0]["accuracy"]) if points else []
    lines = [f"# Privacy-utility frontier: ViT {s['model']}, {s['images']} images, "
             f"{s['sites']} {s['partition']} sites, {s['server_epochs']:g} server epochs at "
             f"batch {s['batch']}, seed {s['seed']}", "",
             "Accuracy (%) of the teacher on the test split; attacks of an honest-but-curious "
             "server (the audit's, results/privacy.md) on a payload made with the same "
             "settings: best grouping of tokens by position (groups unnamed, matched "
             "one-to-one; over the tokens that carry a position), best position accuracy "
             "(positions named) and best reconstruction, head secret (and public).", "",
             "| setting | overrides | D | bytes / image | " + " | ".join(columns)
             + " | grouping % secret | positions % secret (attack) | PSNR dB / SSIM secret "
               "| positions % public "
               "| PSNR public | epsilon |",
             "|---|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|"]
    for p in points:
        sec, pub = p["secret"], p["public"]
        eps = "-" if p["epsilon"] is None else f"{p['epsilon']:.3g} (delta {p['delta']:g})"
        lines.append(
            f"| {p['name']} | `{p['overrides'] or 'default'}` | {p['token_width']} | "
            f"{p['payload_bytes_per_image']} | "
            + " | ".join(_pct(p["accuracy"][col]) for col in columns)
            + f" | {_pct(sec.get('grouping'))} | {_pct(sec['position_accuracy'])} "
              f"({sec['position_attack']}) | "
              f"{sec['psnr']:.2f} / {sec['ssim']:.3f} | {_pct(pub['position_accuracy'])} | "
              f"{pub['psnr']:.2f} | {eps} |")
    if points:
        ref = points[0]
        lines += ["", f"Chance position accuracy {_pct(ref['chance_accuracy'])}%; the public "
                  f"mean image: PSNR {ref['mean_image']['psnr']:.2f} dB, SSIM "
                  f"{ref['mean_image']['ssim']:.3f} (the guess without the payload)."]
    lines += ["", f"Run time: {summary['wall_s'] / 60:.1f} min on this machine."]
    return "\n".join(lines) + "\n"


def figure(summary: dict, probe: str = "linear 0.1") -> Figure:
    """Two panels, one point per setting: best secret-head position accuracy, and best
    secret-head PSNR, against the `probe` accuracy; chance and the mean image as lines."""
    points = [p for p in summary["points"] if p["accuracy"].get(probe) is not None]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((axes[0], lambda p: 100 * p["secret"]["position_accuracy"],
               "best position accuracy, head secret (%)",
               lambda ref: 100 * ref["chance_accuracy"], "chance"),
              (axes[1], lambda p: p["secret"]["psnr"], "best reconstruction PSNR, head secret (dB)",
               lambda ref: ref["mean_image"]["psnr"], "public mean image"))
    for ax, y, ylabel, baseline, what in panels:
        for p in points:
            x = 100 * p["accuracy"][probe]
            ax.scatter(x, y(p))
            ax.annotate(p["name"], (x, y(p)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if points:
            ax.axhline(baseline(points[0]), color="gray", linestyle="--", label=what)
            ax.legend(fontsize=7)
        ax.set_xlabel(f"{probe.split()[0]} probe accuracy, {100 * float(probe.split()[1]):g}% "
                      "labels (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("privacy-utility frontier (one point per setting; right and low is better)")
    return fig
