"""The comparison study (`--mode=study`): SMSD against its baselines on the same data.

    from smsd_jax.study import run_study   # config.study -> results/study.{json,md}, PNGs

`comparison.py` plans and runs every method, seed and ablation (resumable); `summary.py`
turns the runs' records into means over seeds, tables and figures.
"""

from smsd_jax.study.comparison import run_study

__all__ = ["run_study"]
