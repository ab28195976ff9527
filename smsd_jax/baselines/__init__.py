"""The baselines SMSD is compared with on the same data (docs/method.md, "Baselines"), each a
`Pretrained` ViT with its costs:

- `pretrain_none` (finetune_only.py): no pre-training; random head and body, fine-tuned;
- `pretrain_fedavg` (fedavg.py): FedAvg-DINO, image DINO at each site, weights averaged;
- `pretrain_centralized` (centralized.py): centralized DINO on the pooled raw images.

    from smsd_jax import baselines
    pre = baselines.pretrain_fedavg(config, source, site_indices, seed=0)
    model = models.ViTClassifier(pre.head, pre.body, num_classes)

`image_dino.py` is the image DINO they share (multi-crop views in `multicrop.py`).
"""

from smsd_jax.baselines.centralized import pretrain_centralized
from smsd_jax.baselines.fedavg import at_clock, pretrain_fedavg, weighted_average
from smsd_jax.baselines.finetune_only import pretrain_none
from smsd_jax.baselines.image_dino import Pretrained, views_fn_from_config

__all__ = ["Pretrained", "at_clock", "pretrain_centralized", "pretrain_fedavg", "pretrain_none",
           "views_fn_from_config", "weighted_average"]
