r"""A/B of the server step's speed: two checkouts (or two settings) timed side by side.

    git worktree add /tmp/main main        # or any clone of the baseline
    python -m benchmarks.step_ab --a=/tmp/main --out=benchmarks/results/step_ab_cpu.json
    python -m benchmarks.step_ab --a=. --a_env=XLA_FLAGS=--xla_cpu_use_onednn=true \
        --out=/tmp/onednn.json           # one checkout, two XLA settings

Runs `benchmarks/profile_step.py --timing_only` (this checkout's copy, placed into each side
so both measure with the same code) in a fresh process per repeat, A and B in turn
(A B A B ...), each with its own checkout first on PYTHONPATH and its own extra environment.
The ratio B/A is taken pair by pair, so a drift of the machine's speed during the run
cancels. Writes JSON: each side's images/s per repeat and their medians, the pairwise ratios
and their median, and the commands.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

_A = flags.DEFINE_string("a", None, "Checkout A (the baseline).", required=True)
_B = flags.DEFINE_string("b", str(ROOT), "Checkout B (default: this one).")
_A_ENV = flags.DEFINE_list("a_env", [], "NAME=VALUE pairs added to A's environment.")
_B_ENV = flags.DEFINE_list("b_env", [], "NAME=VALUE pairs added to B's environment.")
_CONFIG = flags.DEFINE_string("config", "configs/quickstart.py", "Config (in each checkout).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Pairs of runs.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per run.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/step_ab_cpu.json", "JSON to write.")


def _env(root: Path, pairs: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    for pair in pairs:
        name, _, value = pair.partition("=")
        env[name] = f"{env.get(name, '')} {value}".strip() if name == "XLA_FLAGS" else value
    return env


def run_once(root: Path, pairs: list[str], script: Path) -> float:
    """Images/s of one fresh process timing the step in checkout `root`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        subprocess.run([sys.executable, str(script), f"--config={_CONFIG.value}",
                        f"--steps={_STEPS.value}", "--timing_only", f"--out={out}"],
                       cwd=root, env=_env(root, pairs), check=True, capture_output=True)
        return json.loads(out.read_text())["images_per_s"]


def main(argv) -> None:
    del argv
    sides = {"a": (Path(_A.value).resolve(), _A_ENV.value),
             "b": (Path(_B.value).resolve(), _B_ENV.value)}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "profile_step.py"  # the same measuring code on both sides
        shutil.copy(ROOT / "benchmarks" / "profile_step.py", script)
        rates = {"a": [], "b": []}
        for i in range(_REPEATS.value):
            for side, (root, pairs) in sides.items():
                rates[side].append(run_once(root, pairs, script))
            print(f"pair {i + 1}/{_REPEATS.value}: A {rates['a'][-1]:.1f}, "
                  f"B {rates['b'][-1]:.1f} images/s", flush=True)
    ratios = [b / a for a, b in zip(rates["a"], rates["b"])]
    git = lambda root: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                      capture_output=True, text=True).stdout.strip()
    doc = dict(date=datetime.date.today().isoformat(), config=_CONFIG.value, steps=_STEPS.value,
               cores=os.cpu_count(),
               a=dict(root=str(sides["a"][0]), commit=git(sides["a"][0]), env=sides["a"][1],
                      images_per_s=rates["a"], median=statistics.median(rates["a"])),
               b=dict(root=str(sides["b"][0]), commit=git(sides["b"][0]), env=sides["b"][1],
                      images_per_s=rates["b"], median=statistics.median(rates["b"])),
               ratios_b_over_a=ratios, median_ratio=statistics.median(ratios))
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"B/A = {doc['median_ratio']:.3f} (median of {len(ratios)} pairs; A "
          f"{doc['a']['median']:.1f}, B {doc['b']['median']:.1f} images/s) -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
