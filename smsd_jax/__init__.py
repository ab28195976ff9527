"""smsd_jax: single-round self-supervised masked sampling distillation for Vision Transformers.

`smsd_jax.ops` holds the pure functional ops and `smsd_jax.models` the Flax modules; the
three stages of the method are `smsd_jax.site`, `smsd_jax.server` and `smsd_jax.downstream`.
"""

__version__ = "0.1.0"
