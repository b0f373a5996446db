"""Fused ops. Each runs the compiled CPU/CUDA kernel when exml_fast._C is
loaded and its pure-PyTorch reference (exml_fast.reference) otherwise.

How an op is registered (the rule every module here follows):

- The schema of `exml_fast::<op>` is defined in C++ (csrc/ops/<op>.cpp); its
  backward is an op of its own, `exml_fast::_<op>_backward`, with CPU and CUDA
  kernels like the forward's.
- `exml_fast/ops/<op>.py` holds the public wrapper and a `_register()` that
  gives every compiled op, the backward ops included, a fake kernel
  (`torch.library.register_fake`, so `torch.compile` traces it).
- `_register()` runs only when `_C` loaded (`if _ext.has_ops(): _register()`):
  importing the package never fails for want of the compiled library.
- The autograd is in C++: an Autograd-key kernel in csrc/ops/<op>.cpp (a
  `torch::autograd::Function` that calls `_<op>_backward` through the
  dispatcher), for every differentiable op. A synthesis step calls these ops once per layer
  and step, and a Python autograd node per call (tens of host microseconds)
  cost more than their kernels take on a GPU (issue 41; before-and-after in
  benches/results/dispatch_counts_cpu*.md). A backward op's own autograd
  kernel refuses a second derivative with a clear error (never silently
  wrong); `augment_with_params` and its backward are each other's
  derivative, so every order works there. The helpers they share (`find_op`,
  `refuse_double_backward`) are in csrc/include/exml_fast/autograd_ops.h.
- One op has a compiled kernel on the CPU only: `class_similarity` (on other
  devices its wrapper runs the reference composite — cuBLAS GEMM and row
  reductions, no host sync; it runs once per expert, where a kernel of ours
  could not beat that by the 1.5× issue 41 asks).
- `dirichlet_sample` (behind `dirichlet_targets`) has no gradient (the
  wrapper detaches) and so no autograd kernel; it takes a `Generator?` and
  draws its key in C++ (on CUDA inside the kernel, from the generator's
  Philox state).
- One op is a composite of ATen ops, with no compiled kernel and no
  registration: `upsample2x_conv3x3` (ops/upsample_conv.py) saves arithmetic,
  not memory passes (nearest 2× upsampling + a 3×3 convolution as four 2×2
  convolutions of the small input), so PyTorch's own ops run it on every
  device and autograd and `torch.compile` come with them. It caches its tap
  matrices per (device, dtype) and a no-gradient weight's combined kernels
  per weight version, never under torch.compile tracing or CUDA graph
  capture.
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
