"""Fused ops. Each runs the compiled CPU/CUDA kernel when exml_fast._C is
loaded and its pure-PyTorch reference (exml_fast.reference) otherwise.

How an op is registered (the rule every module here follows):

- The schema of `exml_fast::<op>` is defined in C++ (csrc/ops/<op>.cpp); its
  backward is an op of its own, `exml_fast::_<op>_backward`, with CPU and CUDA
  kernels like the forward's.
- `exml_fast/ops/<op>.py` holds the public wrapper and a `_register()` that
  gives every compiled op, the backward ops included, a fake kernel
  (`torch.library.register_fake`, so `torch.compile` traces it) and wires the
  forward to `_<op>_backward` with `torch.library.register_autograd`. A
  backward op that has no derivative of its own registers an autograd that
  raises (double backward refused with a clear error, never silently wrong).
- `_register()` runs only when `_C` loaded (`if _ext.has_ops(): _register()`):
  importing the package never fails for want of the compiled library.
- The one sanctioned exception: an op whose per-call cost is small enough that
  the Python autograd path would dominate it registers its forward's autograd
  in C++ instead (an Autograd-key kernel in csrc/ops/<op>.cpp that calls
  `_<op>_backward` through the dispatcher), and says so in both files. The
  fake kernels stay here. Today: soft_target_cross_entropy, kd_loss,
  js_divergence (csrc/ops/soft_target_losses.cpp), ed_loss
  (csrc/ops/ed_loss.cpp), and tanh and window_pool (csrc/ops/tanh.cpp,
  csrc/ops/window_pool.cpp: LeNet's layers, called many times per step on
  small activations; their backward ops' refusing autograd is in C++ too).
- One op is a composite of ATen ops, with no compiled kernel and no
  registration: `upsample2x_conv3x3` (ops/upsample_conv.py) saves arithmetic,
  not memory passes (nearest 2× upsampling + a 3×3 convolution as four 2×2
  convolutions of the small input), so PyTorch's own ops run it on every
  device and autograd and `torch.compile` come with them.
"""

from exml_fast.ops.augment import augment, augment_with_params, draw_augment_params
from exml_fast.ops.bn_match_loss import bn_match_loss
from exml_fast.ops.bn_stats import bn_stats, bn_stats_loss, frozen_bn_stats
from exml_fast.ops.class_similarity import class_similarity
from exml_fast.ops.dirichlet import dirichlet_targets
from exml_fast.ops.ed_loss import ed_class_table, ed_loss
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.ops.image_priors import image_priors
from exml_fast.ops.soft_target_losses import js_divergence, kd_loss, soft_target_cross_entropy
from exml_fast.ops.tanh import fast_tanh, tanh
from exml_fast.ops.upsample_conv import upsample2x_conv3x3
from exml_fast.ops.window_pool import fast_pooling, window_pool

__all__ = ["augment", "augment_with_params", "bn_match_loss", "bn_stats", "bn_stats_loss", "class_similarity",
           "dirichlet_targets", "draw_augment_params", "ed_class_table", "ed_loss", "frozen_bn_stats", "image_priors",
           "fast_layers", "fast_pooling", "fast_tanh", "js_divergence", "kd_loss", "soft_target_cross_entropy", "tanh",
           "upsample2x_conv3x3", "window_pool"]
