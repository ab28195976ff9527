"""The experiments: studies of the method, run from a checkout (`python -m launch.main`), as
configs/ and benchmarks/ are; the installed package `smsd_jax` holds the method itself.

    study.py            --mode=study           SMSD against fine-tune only, FedAvg-DINO and
                                               centralized DINO (study_tables.py: its tables)
    curve.py            --mode=curve           the learning curve: one long run, probed at
                                               its checkpoints
    privacy_audit.py    --mode=privacy         every attack on payloads, setting by setting
    frontier.py         --mode=frontier        accuracy beside the attacks, per privacy setting
    per_site_heads.py   --mode=per_site_heads  per-site heads against one shared head
    recipe.py           --mode=recipe          single-change ablations of the CPU recipe
    results_doc.py      (python -m)            docs/results.md's tables, from results/*.md

Each mode's runner is imported when it runs, so `--help` answers without loading JAX.
"""

from __future__ import annotations

import importlib


def _runner(module: str, function: str):
    def run(config, layout):
        return getattr(importlib.import_module(f"experiments.{module}"), function)(config, layout)
    return run


# mode -> (what it runs, fn(config, layout)): `smsd_jax.cli.main`'s experiments.
MODES = {
    "study": ("SMSD against fine-tune only, FedAvg-DINO and centralized DINO (config.study)",
              _runner("study", "run_study")),
    "curve": ("the learning curve: one long single round, its teacher probed at checkpoints "
              "(config.curve)", _runner("curve", "run_curve")),
    "privacy": ("attacks of an honest-but-curious server on payloads (config.privacy)",
                _runner("privacy_audit", "run_privacy")),
    "frontier": ("the privacy-utility frontier: accuracy and attacks for each privacy setting "
                 "(config.frontier)", _runner("frontier", "run_frontier")),
    "per_site_heads": ("per-site heads against one shared head: accuracy at the same budget, "
                       "and what one leaked head reveals of every site's payload "
                       "(config.heads)", _runner("per_site_heads", "run_site_heads")),
    "recipe": ("single-change ablations of the training recipe at the quickstart's budget "
               "(config.recipe)", _runner("recipe", "run_recipe")),
}
