"""Privacy of the payload: the attacks an honest-but-curious server can run, what they recover,
scored; and, for sites that add the Gaussian mechanism, its (epsilon, delta) per image.

    from smsd_jax.privacy import attacks, leakage   # pure attacks; what they recover, scored
    from smsd_jax.privacy import dp_accountant      # (epsilon, delta) of ops.gaussian_dp

The studies that run these attacks on payloads (the privacy audit, the frontier, per-site
heads) are in the checkout's experiments/.
"""

from smsd_jax.privacy import attacks, dp_accountant, leakage

__all__ = ["attacks", "dp_accountant", "leakage"]
