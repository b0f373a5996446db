"""Fused ops. Each runs the compiled CPU/CUDA kernel when exml_fast._C is
loaded and its pure-PyTorch reference (exml_fast.reference) otherwise."""

from exml_fast.ops.augment import augment, augment_with_params, draw_augment_params
from exml_fast.ops.bn_stats import bn_stats, bn_stats_loss
from exml_fast.ops.dirichlet import class_similarity, dirichlet_targets
from exml_fast.ops.ed_loss import ed_class_table, ed_loss
from exml_fast.ops.losses import js_divergence, kd_loss, soft_target_cross_entropy
from exml_fast.ops.priors import image_priors

__all__ = ["augment", "augment_with_params", "bn_stats", "bn_stats_loss", "class_similarity",
           "dirichlet_targets", "draw_augment_params", "ed_class_table", "ed_loss", "image_priors",
           "js_divergence", "kd_loss", "soft_target_cross_entropy"]
