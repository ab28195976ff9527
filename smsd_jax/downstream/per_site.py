"""Each site on its own data (`--mode=downstream_per_site`): the body that came back, at every site.

After a single round (`--mode=simulate`, or the stages one by one), every site holds out a
share of its own images (`config.downstream.site_test_fraction` of each class, drawn with
the site's own stream), labels `config.downstream.label_fractions` of the rest (its own,
non-IID mix of classes), probes and fine-tunes the body on them exactly as
`downstream.evaluate_pretrained` does, and is tested on the global test split and on its
held-out images. The random body and raw pixels are measured the same way. The report gives
each site's results and their mean and standard deviation over sites, as federated-learning
papers report per-client accuracy:

    results = evaluate_sites(config, Layout("runs/quickstart"))
    # WORKDIR/results/sites.json and sites.md
"""

from __future__ import annotations

import time

import numpy as np

from smsd_jax import data, evaluation, export, files
from smsd_jax.downstream.probes import validation_split
from smsd_jax.downstream.protocol import evaluate_body, evaluate_pixels
from smsd_jax.downstream.stage import at_site
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout

JSON, MARKDOWN = "sites.json", "sites.md"
TESTS = {"global": "the global test split", "local": "the site's own held-out images"}
# Mixed into the seed of a site's held-out draw, so that it is not the validation draw.
_LOCAL_STREAM = 0x5173


def site_split(labels: np.ndarray, part: np.ndarray, fraction: float, seed: int,
               site: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's images `part` -> (sorted images it may label, sorted held-out test images):
    `fraction` of each of its classes held out (`downstream.validation_split`)."""
    if not 0.0 < fraction < 1.0:
        raise SMSDError(f"config.downstream.site_test_fraction={fraction} must be in (0, 1)")
    pool, held = validation_split(labels[part], fraction,
                                             seed + _LOCAL_STREAM * (site + 1))
    return np.sort(part[pool]), np.sort(part[held])


def _entries(result: dict, test: str) -> dict:
    """`{probe: {fraction: metrics}}` of one result on one test set."""
    source = result if test == "global" else result.get("local", {})
    return {p: source[p] for p in evaluation.PROBES if source.get(p)}


def summarize(sites: list[dict], metric: str) -> dict:
    """`{test: {body: {probe: {fraction: {"mean", "std", "per_site"}}}}}` over the sites."""
    out = {}
    for test in TESTS:
        for k, name in enumerate(r["name"] for r in sites[0]["results"]):
            rows = [_entries(s["results"][k], test) for s in sites]
            for probe, fractions in rows[0].items():
                for f in fractions:
                    values = [100 * row[probe][f][metric] for row in rows]
                    out.setdefault(test, {}).setdefault(name, {}).setdefault(probe, {})[f] = dict(
                        mean=float(np.mean(values)),
                        std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        per_site=values)
    return out


def markdown(report: dict) -> str:
    """One table per test set: a row per site and body, then the mean ± std over sites."""
    metric = report["metric"]
    bodies = [r["name"] for r in report["sites"][0]["results"]]  # JSON sorts the summary's keys
    unit = "accuracy %" if metric == "accuracy" else "mean AUC x 100"
    out = [f"# Each site on its own data ({unit})", "",
           f"{len(report['sites'])} sites; each holds out {100 * report['test_fraction']:g}% "
           "of its images (stratified), labels a share of the rest, and is tested on both "
           "sets. Rows: each site, then the mean ± std over sites."]
    for test, what in TESTS.items():
        table = report["summary"].get(test, {})
        if not table:
            continue
        cols = [(p, f) for p in evaluation.PROBES
                for f in sorted({f for probes in table.values() for f in probes.get(p, {})},
                                key=float)]
        titles = [f"{evaluation.PROBES[p]} {100 * float(f):g}%" for p, f in cols]
        cell = lambda probes, p, f, show: show(probes[p][f]) if f in probes.get(p, {}) else "-"
        out += ["", f"## Tested on {what}", "",
                "| site (images, held out) | body | " + " | ".join(titles) + " |",
                "|---|---|" + "---|" * len(cols)]
        for i, s in enumerate(report["sites"]):
            for body, probes in ((b, table[b]) for b in bodies):
                cells = [cell(probes, p, f, lambda c: f"{c['per_site'][i]:.1f}")
                         for p, f in cols]
                out.append(f"| {s['site']} ({s['images']}, {s['local_test']}) | {body} | "
                           + " | ".join(cells) + " |")
        for body, probes in ((b, table[b]) for b in bodies):
            cells = [cell(probes, p, f, lambda c: f"{c['mean']:.1f} ± {c['std']:.1f}")
                     for p, f in cols]
            out.append(f"| mean over sites | {body} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def evaluate_sites(config, layout: Layout) -> dict:
    """Every site's probes and fine-tuning of the body in `layout` (and of the random body and
    raw pixels), on its own data; writes `results/sites.json` and `sites.md`."""
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    if data.is_segmentation(train):
        raise SMSDError("--mode=downstream_per_site reports classification; segmentation runs "
                        "through --mode=downstream")
    parts, _ = data.load_partition(layout.partition)
    trained_body, trained, _ = export.load_body(layout.body)
    fraction = config.downstream.site_test_fraction
    sites, start = [], time.perf_counter()
    for k, part in enumerate(parts):
        pool, held = site_split(train.labels, np.asarray(part), fraction, config.seed, k)
        where = dict(candidates=pool, local_idx=held)
        print(f"site {k}: {len(part)} images, {len(held)} held out for its own test",
              flush=True)
        results = [evaluate_pixels(config, train, test, f"site {k} raw pixels",
                                              **where)]
        head_dir, body, params = at_site(config, layout, trained_body, trained, k)
        for name, body_params in (("random body", None), ("SMSD body", params)):
            results.append(evaluate_body(config, head_dir, body, body_params,
                                                    train_source=train, test_source=test,
                                                    name=f"site {k} {name}", **where))
        for r, name in zip(results, ("raw pixels", "random body", "SMSD body")):
            r["name"] = name
        sites.append(dict(site=k, images=int(len(part)), local_test=int(len(held)),
                          classes=np.bincount(train.labels[part],
                                              minlength=train.num_classes).tolist()
                          if not data.is_multilabel(train) else None,
                          results=results))
        print(f"site {k} done; {(time.perf_counter() - start) / 60:.1f} min so far", flush=True)
    metric = evaluation.headline_metric(sites[0]["results"])
    report = dict(metric=metric, test_fraction=fraction, sites=sites,
                  summary=summarize(sites, metric), wall_s=time.perf_counter() - start)
    files.write_json(layout.results / JSON, report)
    text = markdown(report)
    files.write_text(layout.results / MARKDOWN, text)
    print(text)
    return report
