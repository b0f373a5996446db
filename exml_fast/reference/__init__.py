"""Pure-PyTorch versions of every exml_fast op, with the same signatures.

They are the test oracle, the benchmark baseline and the fallback when the
compiled library is not available. They mirror the public implementations
the fused kernels replace, defects in speed included.
"""

from exml_fast.reference.augment import (augment, augment_with_params, augment_with_params_loop, batch_augment_public,
                                         draw_augment_params)
from exml_fast.reference.bn_match_loss import bn_match_loss
from exml_fast.reference.bn_stats import bn_stats, bn_stats_loss, frozen_bn_stats
from exml_fast.reference.class_similarity import class_similarity
from exml_fast.reference.dirichlet import dirichlet_targets
from exml_fast.reference.ed_loss import ed_loss
from exml_fast.reference.image_priors import default_blur_sigma, gaussian_kernel2d, image_priors, tv_l2
from exml_fast.reference.public.deepinversion import public_deepinversion
from exml_fast.reference.soft_target_losses import js_divergence, kd_loss, soft_target_cross_entropy
from exml_fast.reference.upsample_conv import upsample2x_conv3x3

__all__ = ["augment", "augment_with_params", "augment_with_params_loop", "batch_augment_public",
           "bn_match_loss", "bn_stats", "bn_stats_loss", "class_similarity",
           "default_blur_sigma", "dirichlet_targets", "draw_augment_params", "ed_loss", "frozen_bn_stats",
           "gaussian_kernel2d", "image_priors", "js_divergence", "kd_loss", "public_deepinversion",
           "soft_target_cross_entropy", "tv_l2", "upsample2x_conv3x3"]
