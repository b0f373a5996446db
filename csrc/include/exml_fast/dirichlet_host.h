// Host-side argument checks shared by the CPU and CUDA kernels of
// exml_fast::dirichlet_sample and exml_fast::_philox4x32_10.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace exml_fast {

inline void check_dirichlet_args(const at::Tensor& concentration, const at::Tensor& key,
                                  const char* op) {
  TORCH_CHECK(concentration.dim() == 2, op,
              ": concentration must be a 2-D (B, K) matrix; got sizes ", concentration.sizes());
  TORCH_CHECK(at::isFloatingType(concentration.scalar_type()), op,
              ": concentration must be float32, float64, float16 or bfloat16; got ",
              concentration.scalar_type());
  TORCH_CHECK(concentration.size(1) >= 1, op,
              ": concentration must have at least one column (K >= 1); got sizes ",
              concentration.sizes());
  TORCH_CHECK(concentration.size(1) <= UINT32_MAX, op, ": K must be below 2^32; got ",
              concentration.size(1));
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 1, op,
              ": key must be a 1-element int64 tensor; got ", key.scalar_type(), " with ",
              key.numel(), " elements");
  TORCH_CHECK(key.device() == concentration.device(), op, ": key is on ", key.device(),
              " but concentration is on ", concentration.device());
}

inline void check_philox_args(const at::Tensor& counters, const at::Tensor& key, const char* op) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              op, ": counters must be an (N, 4) int64 tensor; got ", counters.scalar_type(),
              " of sizes ", counters.sizes());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 1, op,
              ": key must be a 1-element int64 tensor; got ", key.scalar_type(), " with ",
              key.numel(), " elements");
  TORCH_CHECK(key.device() == counters.device(), op, ": key is on ", key.device(),
              " but counters are on ", counters.device());
}

}  // namespace exml_fast
