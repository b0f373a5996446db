// Host-side argument checks shared by the CPU and CUDA kernels of
// exml_fast::dirichlet_sample and exml_fast::_philox4x32_10, and the key a CPU
// generator gives a call (both kernels draw it the same way).
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <mutex>
#include <optional>

namespace exml_fast {

inline void check_dirichlet_args(const at::Tensor& concentration,
                                  const std::optional<at::Tensor>& key,
                                  const std::optional<at::Generator>& generator, const char* op) {
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
  if (key.has_value()) {
    TORCH_CHECK(!generator.has_value(), op, ": pass a key or a generator, not both");
    TORCH_CHECK(key->scalar_type() == at::kLong && key->numel() == 1, op,
                ": key must be a 1-element int64 tensor; got ", key->scalar_type(), " with ",
                key->numel(), " elements");
    TORCH_CHECK(key->device() == concentration.device(), op, ": key is on ", key->device(),
                " but concentration is on ", concentration.device());
  }
  if (generator.has_value()) {
    const c10::Device gd = generator->device(), cd = concentration.device();
    // torch.Generator("cuda") has no index (the current device's): it matches cuda:N.
    TORCH_CHECK(gd.is_cpu() || (gd.type() == cd.type() &&
                                (!gd.has_index() || !cd.has_index() || gd.index() == cd.index())),
                op,
                ": generator is on ", gd, " but concentration is on ", cd, "; pass a generator on ",
                cd, ", a CPU generator, or None");
  }
}

// The key of one call drawn from a CPU generator: what
// torch.randint(-2^63, 2^63 - 1, (1,), generator=gen) draws (ATen's
// uniform_int_from_to: random64() mod (2^64 - 1), shifted by -2^63), so a
// seed gives the samples it gave when the wrapper drew the key in Python. The
// CUDA kernel draws a CPU generator's key with this too: the same seed then
// gives the CPU kernel's samples.
inline int64_t draw_key(at::CPUGeneratorImpl* gen) {
  std::lock_guard<std::mutex> lock(gen->mutex_);
  constexpr uint64_t kRange = ~uint64_t{0};  // (2^63 - 1) - (-2^63)
  return static_cast<int64_t>(gen->random64() % kRange + (uint64_t{1} << 63));
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
