"""Fine-tune only: no pre-training at all, the baseline any pre-training must beat.

The head and the body stay at their random initialisation (drawn downstream from
`config.seed`, as for every method); the site trains them on its labels alone. Nothing is
sent or received and no FLOPs are spent before the downstream stage.
"""

from __future__ import annotations

from smsd_jax import models
from smsd_jax.baselines.image_dino import Pretrained


def pretrain_none(config, num_sites: int) -> Pretrained:
    """A `Pretrained` with no parameters (`None`: random init downstream) and zero cost."""
    return Pretrained(head=models.head_from_config(config), head_params=None,
                      body=models.body_from_config(config), body_params=None, images_seen=0,
                      steps=0, server_flops=0.0, client_flops_per_site=[0.0] * num_sites,
                      upload_bytes_per_site=[0] * num_sites,
                      download_bytes_per_site=[0] * num_sites, wall_s=0.0, history=[])
