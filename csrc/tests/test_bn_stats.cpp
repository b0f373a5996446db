// C++ tests of exml_fast::bn_stats and exml_fast::_bn_stats_backward, called
// through the dispatcher exactly as torch.ops.exml_fast.* calls them, against
// ATen computed in float64 from the same input values.
//
// Only per-op ATen headers are included (not ATen/ATen.h or torch/torch.h):
// this file compiles in a fraction of the time.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "harness.h"

namespace {

using StatsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);
using BackwardSig =
    at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("exml_fast::bn_stats", "")
                             .typed<StatsSig>();
  return op.call(x);
}

at::Tensor bn_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                             const at::Tensor& x, const at::Tensor& mean) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("exml_fast::_bn_stats_backward", "")
                             .typed<BackwardSig>();
  return op.call(grad_mean, grad_var, x, mean);
}

// Standard normal float32 samples cast to `dtype`: the cast values are the
// test input, and the reference is computed from them, so the inputs are exact.
at::Tensor randn(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  return at::randn(sizes, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

std::vector<int64_t> reduced_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

struct Tol {
  double rtol;
  double atol;
};
// fp32 accumulation over up to ~1e5 elements: observed errors are ~1e-7; a
// sum-of-squares variance or a float16 accumulator misses these by far.
constexpr Tol kFp32{1e-5, 1e-5};
constexpr Tol kFp64{1e-12, 1e-12};
// fp16/bf16 inputs are exact in the fp32 accumulator, so the error is the fp32
// one; the looser bound leaves room for a different summation order.
constexpr Tol kHalfIn{1e-4, 1e-4};

void expect_close(const at::Tensor& actual, const at::Tensor& expected, Tol tol,
                  const std::string& what, const char* file, int line) {
  if (actual.sizes() != expected.sizes()) {
    exml_test::fail(file, line, what, ": sizes ", actual.sizes(), " != expected ",
                    expected.sizes());
  }
  const at::Tensor a = actual.cpu().to(at::kDouble);
  const at::Tensor e = expected.cpu().to(at::kDouble);
  const at::Tensor diff = a.sub(e).abs();
  const at::Tensor bound = e.abs().mul(tol.rtol).add(tol.atol);
  // le() is false for NaN, so a NaN anywhere fails.
  if (!diff.le(bound).all().item<bool>()) {
    const int64_t i = diff.sub(bound).nan_to_num(1e300).flatten().argmax().item<int64_t>();
    exml_test::fail(file, line, what, ": not close (rtol ", tol.rtol, ", atol ", tol.atol,
                    "); worst at flat index ", i, ": got ", a.flatten()[i].item<double>(),
                    ", expected ", e.flatten()[i].item<double>(), "; max abs diff ",
                    diff.max().item<double>());
  }
}
#define EXPECT_CLOSE(a, e, tol, what) expect_close(a, e, tol, what, __FILE__, __LINE__)

// Runs bn_stats on x and compares with ATen in float64; returns (mean, var).
std::tuple<at::Tensor, at::Tensor> check_stats(const at::Tensor& x, Tol tol,
                                               const std::string& what) {
  auto [mean, var] = bn_stats(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  EXML_CHECK(mean.scalar_type() == acc && var.scalar_type() == acc, what, ": result dtypes ",
             mean.scalar_type(), ", ", var.scalar_type(), " for input ", x.scalar_type());
  EXML_CHECK(mean.device() == x.device() && var.device() == x.device(), what,
             ": results on ", mean.device(), " for input on ", x.device());
  const at::Tensor xd = x.cpu().to(at::kDouble);
  const auto dims = reduced_dims(x);
  EXPECT_CLOSE(mean, xd.mean(dims), tol, what + " mean");
  EXPECT_CLOSE(var, xd.var(dims, /*unbiased=*/false), tol, what + " var");
  return {mean, var};
}

// dx = grad_mean / M + 2 grad_var (x - mean) / M in float64, M = numel / C.
at::Tensor reference_backward(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                              const at::Tensor& x, const at::Tensor& mean) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  auto per_channel = [&](const at::Tensor& t) { return t.cpu().to(at::kDouble).reshape(shape); };
  const double m = static_cast<double>(x.numel() / x.size(1));
  const at::Tensor xd = x.cpu().to(at::kDouble);
  return per_channel(grad_mean).div(m).add(
      xd.sub(per_channel(mean)).mul(per_channel(grad_var)).mul(2.0 / m));
}

// Runs the backward on x with gradients of size ~M so that dx is O(1), checks
// dtype, sizes and strides (dx keeps x's memory format) and the values.
void check_backward(const at::Tensor& x, Tol tol, const std::string& what) {
  const int64_t c = x.size(1);
  const double m = static_cast<double>(x.numel() / c);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_mean = randn({c}, acc).mul(m).to(x.device());
  const at::Tensor grad_var = randn({c}, acc).mul(m / 2).to(x.device());
  const at::Tensor mean = std::get<0>(bn_stats(x));
  const at::Tensor dx = bn_stats_backward(grad_mean, grad_var, x, mean);
  EXML_CHECK(dx.scalar_type() == x.scalar_type(), what, ": dx dtype ", dx.scalar_type(),
             " for x ", x.scalar_type());
  EXML_CHECK(dx.device() == x.device(), what, ": dx on ", dx.device());
  EXML_CHECK(dx.sizes() == x.sizes(), what, ": dx sizes ", dx.sizes());
  if (x.is_non_overlapping_and_dense()) {
    EXML_CHECK(dx.strides() == x.strides(), what, ": dx strides ", dx.strides(),
               " differ from x's ", x.strides());
  }
  EXPECT_CLOSE(dx, reference_backward(grad_mean, grad_var, x, mean), tol, what + " dx");
}

#define EXPECT_C10_ERROR(stmt, needle) EXML_EXPECT_THROWS(c10::Error, stmt, needle)

const char* const kOps[] = {"exml_fast::bn_stats", "exml_fast::_bn_stats_backward",
                            "exml_fast::frozen_bn_stats", "exml_fast::_frozen_bn_stats_backward"};

}  // namespace

// ---------------------------------------------------------------------------
// CPU

EXML_TEST(registration) {
  for (const char* name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    EXML_CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), name, " has no CPU kernel");
  }
  const auto stats = c10::Dispatcher::singleton().findSchemaOrThrow(kOps[0], "");
  EXML_CHECK(stats.schema().returns().size() == 2, stats.schema());
}

EXML_TEST(nchw_fp32) {
  at::manual_seed(1);
  const at::Tensor x = randn({8, 5, 7, 9});
  check_stats(x, kFp32, "(8, 5, 7, 9)");
  check_stats(x.mul(3.0).add(-2.0), kFp32, "3x - 2");
  // Runs longer than one cache block (4096 elements).
  check_stats(randn({3, 4, 71, 67}), kFp32, "(3, 4, 71, 67)");
}

// A large mean over a small spread: E[x^2] - E[x]^2 in fp32 loses every digit
// here; the blocked two-pass + Chan merge must not.
EXML_TEST(nchw_large_offset_fp32) {
  at::manual_seed(2);
  const at::Tensor x = randn({4, 3, 70, 70}).add(1000.0);
  check_stats(x, {1e-4, 1e-4}, "1000 + randn, NCHW");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), {1e-4, 1e-4},
              "1000 + randn, channels_last");
}

EXML_TEST(channels_last_fp32) {
  at::manual_seed(3);
  const at::Tensor x = randn({6, 7, 5, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  EXML_CHECK(!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  check_stats(x, kFp32, "channels_last (6, 7, 5, 3)");
  // Enough rows (64 * 32 * 32) for several parallel tasks and their merge.
  check_stats(randn({64, 3, 32, 32}).contiguous(at::MemoryFormat::ChannelsLast), kFp32,
              "channels_last (64, 3, 32, 32)");
  // A batch slice of a channels_last tensor is still channels-last dense.
  const at::Tensor base = randn({8, 16, 6, 6}).contiguous(at::MemoryFormat::ChannelsLast);
  check_stats(base.slice(0, 2, 7), kFp32, "channels_last batch slice");
}

EXML_TEST(channels_last_matches_nchw) {
  at::manual_seed(4);
  const at::Tensor x = randn({5, 9, 11, 13});
  auto [m1, v1] = bn_stats(x);
  auto [m2, v2] = bn_stats(x.contiguous(at::MemoryFormat::ChannelsLast));
  // Same data, same fp32 arithmetic up to summation order.
  constexpr Tol kSameData{1e-6, 1e-6};
  EXPECT_CLOSE(m2, m1, kSameData, "channels_last vs NCHW mean");
  EXPECT_CLOSE(v2, v1, kSameData, "channels_last vs NCHW var");
}

EXML_TEST(matrix_2d) {
  at::manual_seed(5);
  check_stats(randn({1000, 17}), kFp32, "(1000, 17)");
  // Many rows, few channels: several parallel tasks.
  check_stats(randn({30000, 3}), kFp32, "(30000, 3)");
  // Column-major storage: neither layout, read through a copy.
  check_stats(randn({17, 250}).t(), kFp32, "(250, 17) transposed");
}

EXML_TEST(seq_3d) {
  at::manual_seed(6);
  const at::Tensor x = randn({4, 6, 33});
  check_stats(x, kFp32, "(4, 6, 33)");
  // (N, C, L) with channels innermost in memory.
  const at::Tensor nlc = x.transpose(1, 2).contiguous().transpose(1, 2);
  check_stats(nlc, kFp32, "(4, 6, 33) channels-last storage");
}

EXML_TEST(volume_5d) {
  at::manual_seed(7);
  const at::Tensor x = randn({2, 3, 4, 5, 6});
  check_stats(x, kFp32, "(2, 3, 4, 5, 6)");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast3d), kFp32, "channels_last_3d");
}

EXML_TEST(batch_one) {
  at::manual_seed(8);
  check_stats(randn({1, 4, 9, 11}), kFp32, "(1, 4, 9, 11)");
  // One element per channel: the mean is the element, the variance exactly 0.
  const at::Tensor x = randn({1, 8});
  auto [mean, var] = check_stats(x, kFp32, "(1, 8)");
  EXML_CHECK(mean.equal(x[0]), "the mean of one element is not that element");
  EXML_CHECK(var.eq(0).all().item<bool>(), "the variance of one element is not 0");
}

EXML_TEST(spatial_1x1) {
  at::manual_seed(9);
  const at::Tensor x = randn({16, 8, 1, 1});
  check_stats(x, kFp32, "(16, 8, 1, 1)");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), kFp32, "(16, 8, 1, 1) cl");
  check_stats(randn({16, 8, 1, 1, 1}), kFp32, "(16, 8, 1, 1, 1)");
}

EXML_TEST(noncontiguous_slice) {
  at::manual_seed(10);
  const at::Tensor base = randn({6, 10, 9, 8});
  const at::Tensor x = base.slice(1, 1, 9, 2).slice(3, 2, 7);  // (6, 4, 9, 5)
  EXML_CHECK(!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast));
  const at::Tensor before = x.clone();
  check_stats(x, kFp32, "strided slice");
  EXML_CHECK(x.equal(before), "bn_stats modified its input");
  // Dense but neither NCHW nor channels_last.
  check_stats(randn({4, 3, 5, 7}).transpose(2, 3), kFp32, "H/W transposed");
}

EXML_TEST(fp64) {
  at::manual_seed(11);
  const at::Tensor x = randn({5, 4, 6, 7}, at::kDouble);
  check_stats(x, kFp64, "fp64 NCHW");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), kFp64, "fp64 channels_last");
  check_stats(randn({300, 5}, at::kDouble), kFp64, "fp64 (300, 5)");
}

EXML_TEST(fp16) {
  at::manual_seed(12);
  const at::Tensor x = randn({8, 6, 10, 12}, at::kHalf);
  check_stats(x, kHalfIn, "fp16 NCHW");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), kHalfIn, "fp16 channels_last");
  check_stats(randn({500, 7}, at::kHalf), kHalfIn, "fp16 (500, 7)");
  // Values whose squares overflow fp16 (> 65504): the accumulator must be fp32.
  check_stats(randn({4, 3, 8, 8}).mul(300.0).to(at::kHalf), kHalfIn, "fp16 large values");
}

EXML_TEST(bf16) {
  at::manual_seed(13);
  const at::Tensor x = randn({8, 6, 10, 12}, at::kBFloat16);
  check_stats(x, kHalfIn, "bf16 NCHW");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), kHalfIn, "bf16 channels_last");
  check_stats(randn({2, 3, 4, 5, 6}, at::kBFloat16), kHalfIn, "bf16 5-D");
}

EXML_TEST(backward_nchw_fp32) {
  at::manual_seed(14);
  check_backward(randn({8, 5, 7, 9}), kFp32, "NCHW");
  check_backward(randn({2, 3, 4, 5, 6}), kFp32, "5-D");
  check_backward(randn({4, 6, 33}), kFp32, "3-D");
}

EXML_TEST(backward_channels_last_fp32) {
  at::manual_seed(15);
  const at::Tensor x = randn({6, 7, 5, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  check_backward(x, kFp32, "channels_last");
  const at::Tensor mean = std::get<0>(bn_stats(x));
  const at::Tensor dx = bn_stats_backward(mean, mean, x, mean);
  EXML_CHECK(dx.is_contiguous(at::MemoryFormat::ChannelsLast), "dx strides ", dx.strides());
  check_backward(randn({2, 3, 4, 5, 6}).contiguous(at::MemoryFormat::ChannelsLast3d), kFp32,
                 "channels_last_3d");
}

EXML_TEST(backward_matrix_fp64) {
  at::manual_seed(16);
  check_backward(randn({300, 5}, at::kDouble), kFp64, "fp64 (300, 5)");
  check_backward(randn({3, 4, 5, 6}, at::kDouble), kFp64, "fp64 NCHW");
  check_backward(randn({1, 8}, at::kDouble), kFp64, "fp64 (1, 8)");
}

EXML_TEST(backward_fp16) {
  at::manual_seed(17);
  // dx is rounded to the input's precision: 2^-11 relative for fp16, 2^-8 for bf16.
  check_backward(randn({4, 6, 9, 10}, at::kHalf), {2e-3, 2e-3}, "fp16 NCHW");
  check_backward(randn({4, 6, 9, 10}, at::kHalf).contiguous(at::MemoryFormat::ChannelsLast),
                 {2e-3, 2e-3}, "fp16 channels_last");
  check_backward(randn({4, 6, 9, 10}, at::kBFloat16), {1e-2, 1e-2}, "bf16 NCHW");
}

EXML_TEST(backward_noncontiguous) {
  at::manual_seed(18);
  const at::Tensor x = randn({6, 10, 9, 8}).slice(1, 1, 9, 2).slice(3, 2, 7);
  check_backward(x, kFp32, "strided slice");
  check_backward(randn({17, 250}).t(), kFp32, "(250, 17) transposed");
}

EXML_TEST(error_integer_dtype) {
  const at::Tensor xi = at::randint(0, 10, {4, 3, 5, 5}, at::TensorOptions().dtype(at::kLong));
  EXPECT_C10_ERROR(bn_stats(xi), "float32, float64, float16 or bfloat16");
  EXPECT_C10_ERROR(bn_stats(xi.to(at::kInt)), "float32, float64, float16 or bfloat16");
  EXPECT_C10_ERROR(bn_stats(xi.to(at::kBool)), "float32, float64, float16 or bfloat16");
  const at::Tensor g = at::zeros({3});
  EXPECT_C10_ERROR(bn_stats_backward(g, g, xi, g), "float32, float64, float16 or bfloat16");
}

EXML_TEST(error_ndim) {
  EXPECT_C10_ERROR(bn_stats(randn({7})), "must have shape");
  EXPECT_C10_ERROR(bn_stats(randn({2, 3, 2, 2, 2, 2})), "must have shape");
  EXPECT_C10_ERROR(bn_stats(randn({})), "must have shape");
  const at::Tensor g = at::zeros({7});
  EXPECT_C10_ERROR(bn_stats_backward(g, g, randn({7}), g), "must have shape");
}

EXML_TEST(error_empty) {
  EXPECT_C10_ERROR(bn_stats(randn({0, 3, 4, 4})), "no elements");
  EXPECT_C10_ERROR(bn_stats(randn({2, 3, 0})), "no elements");
  EXPECT_C10_ERROR(bn_stats(randn({2, 0, 5})), "at least one channel");
  EXPECT_C10_ERROR(bn_stats(randn({0, 0})), "at least one channel");
  const at::Tensor g = at::zeros({3});
  EXPECT_C10_ERROR(bn_stats_backward(g, g, randn({0, 3, 4, 4}), g), "no elements");
}

EXML_TEST(error_backward_shapes) {
  const at::Tensor x = randn({4, 3, 5, 5});
  const at::Tensor g = at::zeros({3});
  const at::Tensor bad = at::zeros({4});
  EXPECT_C10_ERROR(bn_stats_backward(bad, g, x, g), "grad_mean must have shape");
  EXPECT_C10_ERROR(bn_stats_backward(g, bad, x, g), "grad_var must have shape");
  EXPECT_C10_ERROR(bn_stats_backward(g, g, x, bad), ": mean must have shape");
  EXPECT_C10_ERROR(bn_stats_backward(g.reshape({1, 3}), g, x, g), "grad_mean must have shape");
}

// ---------------------------------------------------------------------------
// CUDA: registered with ctest only when built with EXML_FAST_CUDA=ON; every case
// but the first needs a GPU and skips (exit 77) without one.

namespace {

void require_cuda_device() {
#ifndef EXML_FAST_WITH_CUDA
  EXML_SKIP("exml_fast_ops was built without CUDA kernels (EXML_FAST_CUDA=OFF)");
#else
  if (!at::hasCUDA()) EXML_SKIP("no CUDA device visible");
#endif
}

}  // namespace

EXML_TEST(cuda_kernel_registered) {
#ifndef EXML_FAST_WITH_CUDA
  EXML_SKIP("exml_fast_ops was built without CUDA kernels (EXML_FAST_CUDA=OFF)");
#else
  for (const char* name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    EXML_CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::CUDA), name, " has no CUDA kernel");
  }
#endif
}

EXML_TEST(cuda_nchw_fp32) {
  require_cuda_device();
  at::manual_seed(21);
  check_stats(randn({8, 5, 33, 17}).cuda(), kFp32, "cuda NCHW");
  check_stats(randn({3, 4, 71, 67}).cuda(), kFp32, "cuda (3, 4, 71, 67)");
  check_stats(randn({4, 3, 70, 70}).add(1000.0).cuda(), {1e-4, 1e-4}, "cuda 1000 + randn");
  check_stats(randn({1, 8}).cuda(), kFp32, "cuda (1, 8)");
  check_stats(randn({16, 8, 1, 1}).cuda(), kFp32, "cuda (16, 8, 1, 1)");
}

EXML_TEST(cuda_channels_last_fp16) {
  require_cuda_device();
  at::manual_seed(22);
  const at::Tensor x = randn({16, 32, 14, 14}, at::kHalf).cuda();
  check_stats(x, kHalfIn, "cuda fp16 NCHW");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast), kHalfIn, "cuda fp16 channels_last");
  check_stats(randn({64, 3, 32, 32}).cuda().contiguous(at::MemoryFormat::ChannelsLast), kFp32,
              "cuda fp32 channels_last (64, 3, 32, 32)");
}

EXML_TEST(cuda_bf16_5d) {
  require_cuda_device();
  at::manual_seed(23);
  const at::Tensor x = randn({2, 4, 3, 5, 6}, at::kBFloat16).cuda();
  check_stats(x, kHalfIn, "cuda bf16 5-D");
  check_stats(x.contiguous(at::MemoryFormat::ChannelsLast3d), kHalfIn, "cuda bf16 cl3d");
  check_stats(randn({5, 4, 6, 7}, at::kDouble).cuda(), kFp64, "cuda fp64");
}

EXML_TEST(cuda_matches_cpu) {
  require_cuda_device();
  at::manual_seed(24);
  const std::vector<at::Tensor> xs = {
      randn({100000, 3}),
      randn({2, 64, 56, 56}),
      randn({2, 64, 56, 56}).contiguous(at::MemoryFormat::ChannelsLast),
      randn({6, 10, 9, 8}).slice(1, 1, 9, 2).slice(3, 2, 7),
      randn({3, 5, 200}),
  };
  for (const at::Tensor& x : xs) {
    auto [mc, vc] = bn_stats(x);
    auto [mg, vg] = bn_stats(x.cuda());
    const std::string what = exml_test::str("sizes ", x.sizes(), " strides ", x.strides());
    EXPECT_CLOSE(mg, mc, kFp32, what + " mean");
    EXPECT_CLOSE(vg, vc, kFp32, what + " var");
  }
}

EXML_TEST(cuda_backward) {
  require_cuda_device();
  at::manual_seed(25);
  check_backward(randn({8, 5, 7, 9}).cuda(), kFp32, "cuda NCHW");
  check_backward(randn({6, 7, 5, 3}).cuda().contiguous(at::MemoryFormat::ChannelsLast), kFp32,
                 "cuda channels_last");
  check_backward(randn({300, 5}, at::kDouble).cuda(), kFp64, "cuda fp64 (300, 5)");
  check_backward(randn({4, 6, 9, 10}, at::kHalf).cuda(), {2e-3, 2e-3}, "cuda fp16");
  check_backward(randn({4, 6, 9, 10}, at::kBFloat16).cuda(), {1e-2, 1e-2}, "cuda bf16");
}

EXML_TEST(cuda_errors) {
  require_cuda_device();
  const at::Tensor xi =
      at::randint(0, 10, {4, 3, 5, 5}, at::TensorOptions().dtype(at::kLong)).cuda();
  EXPECT_C10_ERROR(bn_stats(xi), "float32, float64, float16 or bfloat16");
  EXPECT_C10_ERROR(bn_stats(randn({7}).cuda()), "must have shape");
  EXPECT_C10_ERROR(bn_stats(randn({0, 3, 4, 4}).cuda()), "no elements");
  const at::Tensor x = randn({4, 3, 5, 5}).cuda();
  const at::Tensor g = at::zeros({3}).cuda();
  EXPECT_C10_ERROR(bn_stats_backward(at::zeros({3}), g, x, g), "one device");
}
