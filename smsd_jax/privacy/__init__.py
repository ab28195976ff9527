"""Privacy of the payload: attacks of an honest-but-curious server, their metrics, the study.

    from smsd_jax.privacy import attacks, metrics
    from smsd_jax.privacy.study import run_privacy  # config.privacy -> workdir/results/privacy.*
"""

from smsd_jax.privacy import attacks, metrics

__all__ = ["attacks", "metrics"]
