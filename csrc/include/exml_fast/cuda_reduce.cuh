// Warp and block reductions shared by the CUDA kernels (device code only).
//
// Every reduction here runs in a fixed order, so a kernel built on them is
// deterministic (no atomics). The value type T is the caller's accumulation
// type (float, double, or a struct such as Stats<double> with a custom op and
// shuffle): nothing here widens or narrows it.
//
// Requirements, for every function:
//   - all 32 lanes of each calling warp take part (full-mask shuffles): a warp
//     may leave a kernel early only as a whole;
//   - the block functions are called by every thread of the block (they hold
//     __syncthreads()); kThreads is the block's thread count
//     (blockDim.x * blockDim.y * blockDim.z, 1-D or 2-D blocks alike), a
//     multiple of 32 and at most 1024, and `shared` holds kThreads / 32 values.
//
// Orders (floating-point sums depend on them):
//   - warp: a butterfly over lane distances 16, 8, 4, 2, 1; lane 0 ends with
//     ((v0 + v16) + (v8 + v24)) + ..., the same value a shuffle-down tree gives,
//     and every lane ends with the same bits;
//   - block: each warp reduces its lanes, then the warp totals are combined in
//     warp order, t0 op t1 op t2 ... (left to right).
//
// NaN: warp_max / block_max keep the larger by `b > a ? b : a`, so a NaN in the
// inputs need not come out (callers that must see NaN make it reach a sum).
#pragma once

#include <cuda_runtime.h>

namespace exml_fast {
namespace cuda_reduce {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return b > a ? b : a;
  }
};

// The default shuffle: any type __shfl_xor_sync takes (int, float, double, ...).
// A struct passes its own functor that shuffles member by member.
struct ShflXor {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& v, int lane_mask) const {
    return __shfl_xor_sync(kFullMask, v, lane_mask);
  }
};

// Index of the thread in its block, x fastest (1-D, 2-D and 3-D blocks).
__device__ __forceinline__ int block_thread_index() {
  return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x);
}

// Reduces v over each aligned group of Width lanes (Width a power of two <= 32);
// every lane of the group gets the result.
template <int Width = kWarpSize, typename T, typename Op, typename Shfl = ShflXor>
__device__ __forceinline__ T warp_reduce(T v, Op op, Shfl shfl = {}) {
  static_assert(Width >= 1 && Width <= kWarpSize && (Width & (Width - 1)) == 0,
                "warp_reduce: Width must be a power of two <= 32");
#pragma unroll
  for (int o = Width / 2; o > 0; o >>= 1) v = op(v, shfl(v, o));
  return v;
}

template <int Width = kWarpSize, typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce<Width>(v, Sum{});
}

template <int Width = kWarpSize, typename T>
__device__ __forceinline__ T warp_max(T v) {
  return warp_reduce<Width>(v, Max{});
}

// Reduces v over the block; every thread gets the result. `shared` (kThreads / 32
// values) may be passed to consecutive calls: each call waits for the readers
// of the previous one before writing.
template <int kThreads, typename T, typename Op, typename Shfl = ShflXor>
__device__ __forceinline__ T block_reduce(T v, T* shared, Op op, Shfl shfl = {}) {
  static_assert(kThreads % kWarpSize == 0 && kThreads >= kWarpSize && kThreads <= 1024,
                "block_reduce: the block must be 32 to 1024 threads, a multiple of 32");
  v = warp_reduce(v, op, shfl);
  if constexpr (kThreads > kWarpSize) {
    const int tid = block_thread_index();
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (tid % kWarpSize == 0) shared[tid / kWarpSize] = v;
    __syncthreads();
    T r = shared[0];
#pragma unroll
    for (int w = 1; w < kThreads / kWarpSize; ++w) r = op(r, shared[w]);
    v = r;
  }
  return v;
}

template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  return block_reduce<kThreads>(v, shared, Sum{});
}

template <int kThreads, typename T>
__device__ __forceinline__ T block_max(T v, T* shared) {
  return block_reduce<kThreads>(v, shared, Max{});
}

// N independent sums over the block at once (one pair of barriers for all):
// v[m] becomes the block's sum of v[m]. Only thread 0 gets the results (the
// other threads' v is left partial). `shared` holds kThreads / 32 rows of N;
// consecutive calls may share it, as for block_reduce.
template <int kThreads, int N, typename T>
__device__ __forceinline__ void block_sum_n(T (&v)[N], T (*shared)[N]) {
  static_assert(kThreads % kWarpSize == 0 && kThreads >= kWarpSize && kThreads <= 1024,
                "block_sum_n: the block must be 32 to 1024 threads, a multiple of 32");
#pragma unroll
  for (int m = 0; m < N; ++m) v[m] = warp_sum(v[m]);
  if constexpr (kThreads > kWarpSize) {
    const int tid = block_thread_index();
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (tid % kWarpSize == 0) {
#pragma unroll
      for (int m = 0; m < N; ++m) shared[tid / kWarpSize][m] = v[m];
    }
    __syncthreads();
    if (tid == 0) {
#pragma unroll
      for (int m = 0; m < N; ++m) {
        T s = shared[0][m];
        for (int w = 1; w < kThreads / kWarpSize; ++w) s += shared[w][m];
        v[m] = s;
      }
    }
  }
}

}  // namespace cuda_reduce
}  // namespace exml_fast
