"""Stage 3 as a command runs it (`--mode=downstream`): the body that came back, with the
site's head, on each task; the results table and JSON.
"""

from __future__ import annotations

from pathlib import Path

from smsd_jax import consortium, data, evaluation, export, files, keys, models, tasks
from smsd_jax.downstream import segmentation
from smsd_jax.downstream.protocol import evaluate_body, evaluate_pixels, result_key
from smsd_jax.errors import SMSDError
from smsd_jax.layout import Layout


def _cell(metrics: dict, metric: str) -> str:
    """A table cell: accuracy in percent, or a mean AUC."""
    return f"{100 * metrics['accuracy']:.1f}" if metric == "accuracy" else f"{metrics['auc']:.3f}"


def results_table(results: list[dict], fractions) -> str:
    """A Markdown table of accuracies (percent, one decimal): one row per result dict;
    multi-label results show the mean AUC over findings (three decimals), and each column
    title says so.

    Columns: linear, k-NN and fine-tune at each of `fractions`; a column that no result
    has is left out, a missing entry is shown as "-".
    """
    metric = evaluation.headline_metric(results)
    unit = "" if metric == "accuracy" else " mean AUC"
    columns = [(method, result_key(f), f"{title} {100 * f:g}%{unit}")
               for method, title in evaluation.PROBES.items()
               for f in fractions if any(result_key(f) in r.get(method, {}) for r in results)]
    lines = ["| features / method | " + " | ".join(c[2] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r in results:
        cells = [_cell(r[m][f], metric) if f in r.get(m, {}) else "-" for m, f, _ in columns]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage


def at_site(config, layout: Layout, body: models.ViTBody, params, site: int
            ) -> tuple[Path, models.ViTBody, dict]:
    """What site `site` fine-tunes: `(its head's folder, body, params)`. The consortium head
    and the body as it came back; with per-site heads the site's own head and the body with
    its stem alone (`models.site_body`)."""
    if bool(body.site_stems) != bool(config.model.per_site_heads):
        raise SMSDError(f"the body has site_stems={body.site_stems} but config.model."
                        f"per_site_heads={config.model.per_site_heads}; use the config the "
                        "body was trained with")
    body, params = models.site_body(body, params, site)
    return consortium.site_head(config, layout, site, draw=False), body, params



def evaluate_task(config, head_dir, body: models.ViTBody, body_params, *,
                  baselines: bool = False) -> tuple[list[dict], str]:
    """One task of stage 3 (`config.data` is what is labelled): the results of the body, after
    raw pixels and the random body with `baselines`, and their Markdown table."""
    train, test = data.load_source(config.data, "train"), data.load_source(config.data, "test")
    segment = data.is_segmentation(train)
    results = []
    if baselines:
        pixels = segmentation.evaluate_pixels if segment else evaluate_pixels
        results.append(pixels(config, train, test))
        results.append(evaluate_body(config, head_dir, body, None, train_source=train,
                                     test_source=test, name="random body"))
    results.append(evaluate_body(config, head_dir, body, body_params, train_source=train,
                                 test_source=test, name="SMSD body"))
    table = (segmentation.results_table(results) if segment else
             results_table(results, config.downstream.label_fractions))
    return results, table


def downstream_stage(config, layout: Layout, head_dir: str | Path | None = None,
                     body_dir: str | Path | None = None, baselines: bool = False) -> list:
    """Stage 3 at a site of the work directory `layout`: probes of the body it got back
    (`body_dir`, default `layout.body`) with its head (`head_dir`, default `layout.head`) on
    `config.data`, or on each of `config.downstream.tasks` (`smsd_jax.tasks`); with
    `baselines`, the random body and raw pixels first. Writes `results/downstream.json` (the
    rows of every task, each with its "task" name when there are tasks) and
    `results/results.md` (a table per task); returns the rows. With per-site heads the site
    is `config.downstream.site` (-1: site 0), with its own head and stem (`at_site`)."""
    body, params, body_meta = export.load_body(body_dir or layout.body)
    own_head, body, params = at_site(config, layout, body, params,
                                     max(config.downstream.site, 0))
    head_dir = head_dir or own_head
    results, sections = [], []
    for name, task in tasks.task_configs(config):
        with tasks.named(name):
            rows, table = evaluate_task(task, head_dir, body, params, baselines=baselines)
        results += [{**row, "task": name} for row in rows] if name else rows
        sections.append(f"## {tasks.title(name, task)}\n\n{table}" if name else table)
    text = "\n\n".join(sections)
    if body_meta.get("keys") == keys.DEMO:
        text += (f"\n\nThe body was trained on payloads made with {keys.DEMO}: anyone can "
                 "rebuild them. Reproducible; not for real data.")
    files.write_json(layout.downstream_json, results)
    files.write_text(layout.results / "results.md", text + "\n")
    print(text)
    return results