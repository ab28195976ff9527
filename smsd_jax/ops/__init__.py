"""Pure functional ops of SMSD: masked sampling, permutation encryption, token noise, DINO math.

No Flax, no I/O. Every function is `jit`/`vmap`-safe and keyed by `jax.random` keys.

    import jax, smsd_jax.ops as ops
    sent, positions = ops.encrypt(jax.random.key(0), tokens, keep=0.5)  # [B, N, D] -> [B, K, D]
"""

from smsd_jax.ops.dino import (dino_loss, ema, linear_warmup, teacher_entropy, update_center,
                               update_site_centers, warmup_cosine)
from smsd_jax.ops.masking import encrypt, mask_sample, num_kept, permute, unpermute
from smsd_jax.ops.noise import add_token_noise, clip_tokens, gaussian_dp, token_scale

__all__ = [
    "add_token_noise", "clip_tokens", "dino_loss", "ema", "encrypt", "gaussian_dp",
    "linear_warmup", "mask_sample", "num_kept", "permute", "teacher_entropy", "token_scale",
    "unpermute", "update_center", "update_site_centers", "warmup_cosine",
]
