"""The comparison study (`--mode=study`): SMSD against its baselines on the same data.

    from smsd_jax.study import run_study   # config.study -> results/study.{json,md}, PNGs
    from smsd_jax.study import run_curve   # config.curve -> results/curve.{json,md,png}

`comparison.py` plans and runs every method, seed and ablation (resumable); `summary.py`
turns the runs' records into means over seeds, tables and figures. `curve.py` runs the
methods at increasing pre-training budgets: the learning curve.
"""

from smsd_jax.study.comparison import run_study
from smsd_jax.study.curve import run_curve

__all__ = ["run_curve", "run_study"]
