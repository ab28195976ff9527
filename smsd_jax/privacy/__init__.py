"""Privacy of the payload, measured: attacks of an honest-but-curious server and the audit.

    from smsd_jax.privacy import attacks, leakage   # pure attacks; what they recover, scored
    from smsd_jax.privacy import run_privacy         # config.privacy -> results/privacy.*
"""

from smsd_jax.privacy import attacks, leakage
from smsd_jax.privacy.audit import run_privacy

__all__ = ["attacks", "leakage", "run_privacy"]
