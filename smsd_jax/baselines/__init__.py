"""The baselines SMSD is compared with on the same data (METHOD.md, "Baselines"): image DINO
on raw images, federated (`pretrain_fedavg`, FedAvg-DINO) or pooled
(`pretrain_centralized`, centralized DINO). Fine-tune only is `downstream.finetune` from a
random initialisation.

    from smsd_jax import baselines
    pre = baselines.pretrain_fedavg(config, source, site_indices, seed=0)
    model = models.ViTClassifier(pre.head, pre.body, num_classes)
"""

from smsd_jax.baselines.centralized import pretrain_centralized
from smsd_jax.baselines.fedavg import at_clock, pretrain_fedavg, weighted_average
from smsd_jax.baselines.image_dino import Pretrained, views_fn_from_config

__all__ = ["Pretrained", "at_clock", "pretrain_centralized", "pretrain_fedavg",
           "views_fn_from_config", "weighted_average"]
