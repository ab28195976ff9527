"""Privacy of the payload, measured: attacks of an honest-but-curious server and the audit;
and, for sites that add the Gaussian mechanism, its (epsilon, delta) per image.

    from smsd_jax.privacy import attacks, leakage   # pure attacks; what they recover, scored
    from smsd_jax.privacy import accountant         # (epsilon, delta) of ops.gaussian_dp
    from smsd_jax.privacy import run_privacy         # config.privacy -> results/privacy.*
    from smsd_jax.privacy import run_frontier        # config.frontier -> results/frontier.*
    from smsd_jax.privacy import run_site_heads      # per-site heads: accuracy and leaks
"""

from smsd_jax.privacy import accountant, attacks, leakage
from smsd_jax.privacy.audit import run_privacy
from smsd_jax.privacy.frontier import run_frontier
from smsd_jax.privacy.site_heads import run_site_heads

__all__ = ["accountant", "attacks", "leakage", "run_frontier", "run_privacy", "run_site_heads"]
