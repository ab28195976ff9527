"""Flax modules of the split ViT: `ViTHead` (site), `ViTBody` (server), `DINOHead`, tails."""

from smsd_jax.models.vit import (CONSTANT_PATCHES, INITS, LINEAR_FEATURES, PRESETS, Attention,
                                 Block, DINOHead, DINONet, ImageDINONet, SiteStems, ViTBody,
                                 ViTClassifier, ViTHead, blank_patches, body_from_config,
                                 dino_head_from_config, dino_net_from_config, head_from_config,
                                 image_dino_net_from_config, linear_probe_features, patchify,
                                 preset, resize_pos_embed, site_body, token_width)

__all__ = ["CONSTANT_PATCHES", "INITS", "LINEAR_FEATURES", "PRESETS", "Attention", "Block",
           "DINOHead", "DINONet", "ImageDINONet", "SiteStems", "ViTBody", "ViTClassifier",
           "ViTHead", "blank_patches", "body_from_config", "dino_head_from_config",
           "dino_net_from_config",
           "head_from_config", "image_dino_net_from_config", "linear_probe_features",
           "patchify", "preset", "resize_pos_embed", "site_body", "token_width"]
