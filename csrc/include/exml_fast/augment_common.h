// Host/device helpers shared by the CPU and CUDA kernels of
// exml_fast::augment_with_params and its backward: argument checks, the memory
// layout the op computes in, and the per-sample parameters reduced to the
// small ranges the index math needs.
//
// The op is a pure gather. Per sample n with params (dy, dx, flip, oy, ox)
// and padding p, output pixel (i, j) reads
//   u = i + oy - p, v = j + ox - p            (pad-crop; 0 outside [0,H)x[0,W))
//   v' = flip ? W - 1 - v : v                 (horizontal flip)
//   x[(u - dy) mod H, (v' - dx) mod W]        (torch.roll by (dy, dx))
// Distinct outputs read distinct inputs, so the adjoint (the backward) is the
// inverse gather: input pixel (a, b) receives grad[i, j] with
//   i = ((a + dy) mod H) - (oy - p), q = (b + dx) mod W, j = (flip ? W-1-q : q) - (ox - p)
// when (i, j) lies inside the image, else 0.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace exml_fast {

enum class AugmentLayout {
  kNCHW,          // contiguous
  kChannelsLast,  // channels_last-dense (and not NCHW-contiguous)
};

// Largest pad and spatial size the index math supports (32-bit on the GPU).
constexpr int64_t kAugmentMaxExtent = std::numeric_limits<int32_t>::max() / 4;

inline void check_augment_args(const at::Tensor& x, const at::Tensor& params, int64_t pad,
                               const char* op, const char* xname) {
  TORCH_CHECK(x.dim() == 4, op, ": ", xname, " must have shape (N, C, H, W); got ", x.dim(),
              " dims with sizes ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", xname,
              " must be float32, float64, float16 or bfloat16; got ", x.scalar_type());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == x.size(0) && params.size(1) == 5, op,
              ": params must have shape (N, 5) = (", x.size(0), ", 5) holding (dy, dx, flip, oy, ox)"
              " per sample; got ", params.sizes());
  TORCH_CHECK(at::isIntegralType(params.scalar_type(), /*includeBool=*/false), op,
              ": params must be an integer tensor (int32 or int64); got ", params.scalar_type());
  TORCH_CHECK(params.device() == x.device(), op, ": params is on ", params.device(), " but ",
              xname, " is on ", x.device());
  TORCH_CHECK(pad >= 0 && pad <= kAugmentMaxExtent, op, ": pad must be in [0, ",
              kAugmentMaxExtent, "]; got ", pad);
  TORCH_CHECK(x.size(2) <= kAugmentMaxExtent && x.size(3) <= kAugmentMaxExtent, op, ": ", xname,
              " height and width must be at most ", kAugmentMaxExtent, "; got ", x.sizes());
}

// The layout the op computes in and returns (the fake kernel applies the same
// rule): NCHW when x is contiguous, channels_last when x is channels_last-dense,
// otherwise NCHW after one copy. `storage` is x or that copy.
inline AugmentLayout augment_layout(const at::Tensor& x, at::Tensor& storage) {
  if (x.is_contiguous()) {
    storage = x;
    return AugmentLayout::kNCHW;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    storage = x;
    return AugmentLayout::kChannelsLast;
  }
  storage = x.contiguous();
  return AugmentLayout::kNCHW;
}

inline at::MemoryFormat memory_format_of(AugmentLayout layout) {
  return layout == AugmentLayout::kChannelsLast ? at::MemoryFormat::ChannelsLast
                                                : at::MemoryFormat::Contiguous;
}

// One sample's parameters in the ranges the kernels use: dy in [0, H),
// dx in [0, W), offy = oy - p and offx = ox - p clamped to [-H, H] and
// [-W, W] (any offset beyond reads only padding, as the clamped one does).
// Any integer params are well defined: shifts wrap, a nonzero flip flips.
struct AugmentSample {
  int32_t dy, dx, flip, offy, offx;
};

C10_HOST_DEVICE inline int64_t augment_mod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

C10_HOST_DEVICE inline int32_t augment_offset(int64_t o, int64_t pad, int64_t extent) {
  // pad and extent are at most kAugmentMaxExtent, so pad +- extent cannot overflow.
  if (o <= pad - extent) return static_cast<int32_t>(-extent);
  if (o >= pad + extent) return static_cast<int32_t>(extent);
  return static_cast<int32_t>(o - pad);
}

C10_HOST_DEVICE inline AugmentSample augment_sample(int64_t dy, int64_t dx, int64_t flip,
                                                    int64_t oy, int64_t ox, int64_t pad,
                                                    int64_t h, int64_t w) {
  AugmentSample s;
  s.dy = static_cast<int32_t>(augment_mod(dy, h));
  s.dx = static_cast<int32_t>(augment_mod(dx, w));
  s.flip = flip != 0 ? 1 : 0;
  s.offy = augment_offset(oy, pad, h);
  s.offx = augment_offset(ox, pad, w);
  return s;
}

}  // namespace exml_fast
