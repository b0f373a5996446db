// CUDA kernels of exml_fast::bn_stats, exml_fast::frozen_bn_stats and their backwards.
//
// Numerical method (forward, one read of x). A thread accumulates, over the
// elements it reads, the sums shifted by the first element k it read:
// s1 = sum(x - k), s2 = sum((x - k)^2), in fp32 (fp64 for fp64 x). A shift taken
// from the thread's own elements keeps the fp32 sums accurate whatever the
// channel's mean, and chains stay short (one wave of blocks shares the work, so
// a thread sees about numel / (2048 * SMs) elements). The sums become a double
// (count, mean, M2) triple (from_shifted_sums), merged with Chan's formula
// (welford.h) across the block in a fixed order (cuda_reduce.cuh), then across
// the blocks of a channel in a fixed order: deterministic, and the same
// partition for bn_stats and frozen_bn_stats, whose statistics are therefore
// bit for bit equal. Results are rounded to fp32 (fp64 for fp64 x) at the end.
// frozen_bn_stats writes y = x * scale_c + shift_c (in the accumulation dtype,
// rounded once to x's dtype) from the values the statistics read, in registers.
//
// Geometry (classify, bn_common.h): NCHW-dense x is N * C rows of S contiguous
// elements, row (n, c) at (n * C + c) * S; channels-last-dense x (and (N, C)
// matrices) is an (M, C) row-major matrix, M = N * S.
//   NCHW: grid (C, P); block (c, p) walks items [p * chunk, (p + 1) * chunk) of
//     channel c's N * S / V items (V-element vectors), enumerated n-major: item j
//     is column j % (S / V) of row n = j / (S / V). A thread computes its first
//     (n, column) with one division and then steps by 256 items by adding
//     precomputed (256 / (S/V), 256 % (S/V)) with one carry: no per-element
//     division. Consecutive threads read consecutive vectors of a row, whatever S.
//   channels_last: grid (T, P) over channel tiles of at most 64 bytes of a row
//     (TX lanes of V channels, TX a power of two) and row parts; block (t, p) is
//     TX x (256 / TX) threads, lane tx owning channels t * TX * V + tx * V + [0, V)
//     in every row of part p it visits (rows ty, ty + 256 / TX, ...), so its
//     shifts, sums, scale and shift stay in registers.
//   Vector loads (16 bytes along NCHW rows; 2 channels, 1 for fp64, across
//   channels_last rows) are used only when every vector is aligned: x (and y,
//   grad_y, dx) aligned to the vector and S (C) a multiple of V; otherwise the
//   same kernels run with V = 1. A thread issues up to 4 loads (16 bytes) before
//   it uses them (sweep).
// Launch: 256-thread blocks, __launch_bounds__(256, 8): at most 32 registers, so
// 8 blocks (2048 threads) are resident per SM (ptxas -v: no spills in the loops
// with 32-bit indices; 64-bit indices, for 2^31 elements and more, are compiled
// for 4 blocks). A grid is one wave of 8 * SMs blocks (SM count cached per
// device, cuda_launch.h) split between the channels (tiles): P = (8 * SMs) / C
// parts each (rounded down: no second, partial wave), at most 1024, and at
// least two vectors (rows) per thread.
//
// Finalisation in the last block, two levels, no second kernel. With P > 1,
// each block writes its per-channel (count, mean, M2) to a workspace; parts form
// groups of 32; the last block of a group to finish (an atomic counter per
// (unit, group), unit = channel or tile) merges the group's 32 partials (one
// warp per channel, lane i holding part i, a fixed butterfly), and the last
// group of a unit merges the <= 32 group partials into mean and var. A last
// block thus reads at most 32 partials per channel, however many blocks share
// a channel. Release/acquire: each writer fences (__threadfence) before its
// block counts, and the last block fences again and reads partials with ld.cg.
// The counters live in the per-call workspace (torch's caching allocator) and
// are zeroed by one cudaMemsetAsync on the op's stream (skipped when P = 1):
// per-call memory is never shared by two streams or two captured graphs, and a
// memset is a node that CUDA graphs capture and replay. A self-resetting
// persistent counter would save that ~1 us node but would be one counter for
// every stream and every graph that captured it.
//
// Backward is one elementwise sweep over the forward's geometry, so a thread's
// channel (NCHW: the block's; channels_last: its lane's V) is fixed and its
// coefficients are loaded once: dx = [grad_y * scale_c +] a_c + b_c * (x - mean_c)
// with a_c = grad_mean_c / M and b_c = 2 * grad_var_c / M (subtracting the mean
// first avoids cancellation when |mean| >> std); grad_y is read in x's layout.
//
// Bandwidth: the forward reads x once (and writes y), the backward reads x
// (and grad_y) and writes dx, each byte once; with 2048 threads per SM and 16
// bytes in flight per thread (32 KB per SM, above the ~25 KB an H200's
// bandwidth-latency product asks), the loops should run near copy bandwidth on
// calls of 100 MB and more. Small calls are bound by the launch, the memset and
// the finalisation tail (two dependent merges of <= 32 partials, ~1-2 us).
//
// Only the ATen/c10 headers needed are included: compile time on small
// machines is dominated by torch headers, and ATen/cuda/CUDAContext.h would
// also pull in cuBLAS/cuSPARSE headers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "exml_fast/bn_common.h"
#include "exml_fast/cuda_launch.h"
#include "exml_fast/cuda_reduce.cuh"
#include "exml_fast/welford.h"

namespace exml_fast {
namespace {

constexpr int kThreads = 256;                    // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 8;                  // 8 x 256 = 2048 resident threads per SM
constexpr int kGroup = 32;                       // partials merged by one warp
constexpr int64_t kMaxParts = int64_t{kGroup} * kGroup;  // two merge levels
constexpr int kTileBytes = 64;                   // channels_last: bytes of a row per tile
constexpr int kMaxTileC = 32;                    // channels per tile, at most (2-byte dtypes)
constexpr int kMinItemsPerThread = 2;            // a part gives each thread at least this many

// Merged statistics are always double: few merges, no precision loss when
// partial means differ by much less than they are large.
using MStats = Stats<double>;

struct MergeOp {
  __device__ __forceinline__ MStats operator()(const MStats& a, const MStats& b) const {
    return merge(a, b);
  }
};

struct ShflXorStats {
  __device__ __forceinline__ MStats operator()(const MStats& s, int lane_mask) const {
    MStats r;
    r.n = __shfl_xor_sync(cuda_reduce::kFullMask, s.n, lane_mask);
    r.mean = __shfl_xor_sync(cuda_reduce::kFullMask, s.mean, lane_mask);
    r.m2 = __shfl_xor_sync(cuda_reduce::kFullMask, s.m2, lane_mask);
    return r;
  }
};

__device__ __forceinline__ MStats empty_stats() { return MStats{0.0, 0.0, 0.0}; }

// V elements loaded or stored as one (aligned) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

// Vector widths: NCHW rows take 16-byte vectors (the elements of one vector
// share a channel and one accumulator); a channels_last lane takes 2 channels
// (8 bytes of fp32, 4 of fp16/bf16; fp64 one), each with its own shift, sums,
// scale and shift: more would spill the loop at 32 registers.
template <typename scalar_t>
constexpr int kRowVec = 16 / static_cast<int>(sizeof(scalar_t));
template <typename scalar_t>
constexpr int kChanVec = sizeof(scalar_t) >= 8 ? 1 : 2;

// Loads in flight per thread: 16 bytes (one vector, or up to 4 narrower
// loads). With 2048 threads per SM that is 32 KB per SM in flight, above what
// an H200's bandwidth-latency product asks (~25 KB); more would cost registers
// beyond the 32 that 2048 threads per SM leave. `bytes`: what one step loads.
__host__ __device__ constexpr int unroll_for(int bytes) {
  return bytes >= 16 ? 1 : bytes >= 4 ? 16 / bytes : 4;
}

// Resident blocks per SM the kernels are compiled for (__launch_bounds__): 8
// (2048 threads, at most 32 registers) with 32-bit indices; 4 with 64-bit
// indices (tensors of 2^31 elements and more), whose index arithmetic would
// otherwise spill in the loops.
template <typename index_t>
constexpr int kMinBlocks = sizeof(index_t) == 4 ? kBlocksPerSm : kBlocksPerSm / 2;

// -- finalisation -------------------------------------------------------------

template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* var;
  __device__ __forceinline__ void write(int64_t c, const MStats& s) const {
    mean[c] = static_cast<acc_t>(s.mean);
    var[c] = static_cast<acc_t>(s.n > 0.0 ? s.m2 / s.n : 0.0);
  }
};

// The cross-block merge of one launch (see the header). A unit is what one
// block's statistics cover: one channel (NCHW) or one tile of channels.
struct Finish {
  MStats* part = nullptr;      // [C][parts]: each block's statistics (parts > 1)
  MStats* group = nullptr;     // [C][groups]: each group's statistics (groups > 1)
  unsigned* count = nullptr;   // [units][groups] arrivals per group, then [units] per unit
  int parts = 1;               // blocks per unit (gridDim.y), <= kMaxParts
  int groups = 1;              // ceil(parts / kGroup), <= kGroup
  int64_t units = 0;
};

__device__ __forceinline__ MStats load_cg(const MStats* p) {
  const double* d = reinterpret_cast<const double*>(p);
  return MStats{__ldcg(d), __ldcg(d + 1), __ldcg(d + 2)};
}

// Called by every thread of the block (it holds __syncthreads): counts the
// block's arrival at `counter` and returns, to every thread, whether the block
// arrived last of `expected`. Each thread's global writes before the call are
// fenced before the count (release); the last block fences after it (acquire).
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == expected - 1u;
  __syncthreads();
  // Every thread reads `last` before it can reach the first barrier of a later
  // call, the only place thread 0 writes it again.
  const bool is_last = last;
  if (is_last) __threadfence();
  return is_last;
}

// Merges, for each channel c0 + q (q < nch), the `cnt` <= 32 statistics
// src[(c0 + q) * ld + first + i], i < cnt, in a fixed order, and hands the
// result to sink(c, stats). One warp per channel; every thread of the block calls.
template <typename Sink>
__device__ __forceinline__ void merge_columns(const MStats* src, int64_t ld, int64_t first, int cnt,
                                              int64_t c0, int nch, Sink sink) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int q = static_cast<int>(threadIdx.x) / 32; q < nch; q += kWarps) {  // warp-uniform
    MStats s = empty_stats();
    if (lane < cnt) s = load_cg(src + (c0 + q) * ld + first + lane);
    s = cuda_reduce::warp_reduce(s, MergeOp{}, ShflXorStats{});
    if (lane == 0) sink(c0 + q, s);
  }
}

// Every thread of block `p` of unit `unit` calls this once its block's statistics
// are reduced: the thread with `holder` true holds `st`, the block's statistics
// of channel c0 + q (one holder per q < nch). Writes mean and var of the unit's
// channels if this block completes them.
template <typename acc_t>
__device__ void finish(const Finish& f, const StatsOut<acc_t>& out, int64_t unit, int64_t c0,
                       int nch, int p, bool holder, int q, const MStats& st) {
  if (f.parts == 1) {  // the block saw whole channels
    if (holder) out.write(c0 + q, st);
    return;
  }
  if (holder) f.part[(c0 + q) * f.parts + p] = st;
  const int g = p / kGroup;
  const int g_first = g * kGroup;
  const int g_size = min(kGroup, f.parts - g_first);
  if (!arrive_last(f.count + unit * f.groups + g, static_cast<unsigned>(g_size))) return;
  if (f.groups == 1) {
    merge_columns(f.part, f.parts, g_first, g_size, c0, nch,
                  [&](int64_t c, const MStats& s) { out.write(c, s); });
    return;
  }
  merge_columns(f.part, f.parts, g_first, g_size, c0, nch,
                [&](int64_t c, const MStats& s) { f.group[c * f.groups + g] = s; });
  if (!arrive_last(f.count + f.units * f.groups + unit, static_cast<unsigned>(f.groups))) return;
  merge_columns(f.group, f.groups, 0, f.groups, c0, nch,
                [&](int64_t c, const MStats& s) { out.write(c, s); });
}

// -- iteration ----------------------------------------------------------------

// The optional outputs of the forward: frozen BatchNorm's y = x * scale_c + shift_c.
template <typename scalar_t>
struct AffineOut {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* y = nullptr;  // nullptr: statistics only (bn_stats)
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
};

// NCHW geometry, counted in V-element vectors.
template <typename index_t>
struct RowGeom {
  index_t c_len;     // C
  index_t sv;        // vectors per row, S / V
  index_t items;     // vectors per channel, N * sv
  index_t chunk;     // vectors per block (the last part of a channel may have fewer)
  index_t step_n;    // kThreads / sv
  index_t step_col;  // kThreads % sv
};

// Walks the vectors of channel c that thread threadIdx.x of part p visits:
// j = p * chunk + threadIdx.x, j + 256, ... below the part's end, as (row n,
// column col); offset() is the vector's index in x.
template <typename index_t>
struct RowCursor {
  index_t j, end, n, col;
  index_t c, c_len, sv, step_n, step_col;
  __device__ __forceinline__ RowCursor(const RowGeom<index_t>& g, index_t c_, index_t p)
      : c(c_), c_len(g.c_len), sv(g.sv), step_n(g.step_n), step_col(g.step_col) {
    const index_t begin = p * g.chunk;  // < items: the grid has ceil(items / chunk) parts
    end = g.items - begin > g.chunk ? begin + g.chunk : g.items;
    j = begin + threadIdx.x;
    n = j / sv;  // once per thread
    col = j - n * sv;
  }
  __device__ __forceinline__ bool valid() const { return j < end; }
  __device__ __forceinline__ index_t offset() const { return (n * c_len + c) * sv + col; }
  __device__ __forceinline__ void advance() {
    j += kThreads;
    n += step_n;
    col += step_col;
    if (col >= sv) {  // step_col < sv, so one carry
      col -= sv;
      ++n;
    }
  }
};

// channels_last geometry: an (M, C) matrix, counted in V-channel vectors.
template <typename index_t>
struct ColGeom {
  index_t cv;     // vectors per row, C / V
  index_t rows;   // M
  index_t chunk;  // rows per block (the last part may have fewer)
  int tx_shift;   // log2(TX): TX lanes across a tile's vectors, 256 / TX rows at a time
  int tile_c;     // channels per tile, TX * V (<= kMaxTileC)
};

// The rows r = p * chunk + ty, + 256 / TX, ... of part p that lane (tx, ty) visits;
// offset() is the index of vector `cvec` of row r.
template <typename index_t>
struct ColCursor {
  index_t r, end, step, cv, cvec;
  __device__ __forceinline__ ColCursor(const ColGeom<index_t>& g, index_t cvec_, index_t p, int ty)
      : step(static_cast<index_t>(kThreads >> g.tx_shift)), cv(g.cv), cvec(cvec_) {
    const index_t begin = p * g.chunk;  // < rows
    end = g.rows - begin > g.chunk ? begin + g.chunk : g.rows;
    r = begin + static_cast<index_t>(ty);
  }
  __device__ __forceinline__ bool valid() const { return r < end; }
  __device__ __forceinline__ index_t offset() const { return r * cv + cvec; }
  __device__ __forceinline__ void advance() { r += step; }
};

// Runs load(offset) for up to U visited vectors, then use(value, offset) for each:
// the U loads are issued before their values are needed.
template <int U, typename Cursor, typename Load, typename Use>
__device__ __forceinline__ void sweep(Cursor& cur, Load load, Use use) {
  using Off = decltype(cur.offset());
  using Item = decltype(load(Off{}));
  while (cur.valid()) {
    Off off[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = cur.valid();
      off[u] = cur.offset();
      cur.advance();
    }
    Item v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) v[u] = load(off[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) use(v[u], off[u]);
    }
  }
}

template <typename scalar_t, int V, typename index_t>
__device__ __forceinline__ Vec<scalar_t, V> load_vec(const scalar_t* p, index_t vec_offset) {
  return reinterpret_cast<const Vec<scalar_t, V>*>(p)[vec_offset];
}

template <typename scalar_t, int V, typename index_t>
__device__ __forceinline__ void store_vec(scalar_t* p, index_t vec_offset, const Vec<scalar_t, V>& v) {
  reinterpret_cast<Vec<scalar_t, V>*>(p)[vec_offset] = v;
}

// -- forward ------------------------------------------------------------------

template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<index_t>)
    forward_rows_kernel(const scalar_t* __restrict__ x, AffineOut<scalar_t> out_y,
                        RowGeom<index_t> g, Finish f, StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  constexpr int U = unroll_for(sizeof(VecT));
  const index_t c = blockIdx.x;
  const index_t p = blockIdx.y;
  RowCursor<index_t> cur(g, c, p);
  acc_t k = 0;
  if (cur.valid()) k = static_cast<acc_t>(x[cur.offset() * V]);
  acc_t s1 = 0, s2 = 0;
  index_t cnt = 0;
  scalar_t* const y = out_y.y;
  const acc_t sc = y != nullptr ? out_y.scale[c] : acc_t(0);
  const acc_t sh = y != nullptr ? out_y.shift[c] : acc_t(0);
  sweep<U>(
      cur, [&](index_t off) { return load_vec<scalar_t, V>(x, off); },
      [&](const VecT& v, index_t off) {
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const acc_t d = static_cast<acc_t>(v.val[l]) - k;
          s1 += d;
          s2 += d * d;
        }
        cnt += V;
        if (y != nullptr) {
          VecT w;
#pragma unroll
          for (int l = 0; l < V; ++l) w.val[l] = static_cast<scalar_t>(static_cast<acc_t>(v.val[l]) * sc + sh);
          store_vec<scalar_t, V>(y, off, w);
        }
      });
  MStats st = from_shifted_sums<double>(static_cast<double>(cnt), k, s1, s2);
  __shared__ MStats warp_stats[kWarps];
  st = cuda_reduce::block_reduce<kThreads>(st, warp_stats, MergeOp{}, ShflXorStats{});
  finish(f, out, static_cast<int64_t>(c), static_cast<int64_t>(c), 1, static_cast<int>(p),
         threadIdx.x == 0, 0, st);
}

template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<index_t>)
    forward_cols_kernel(const scalar_t* __restrict__ x, AffineOut<scalar_t> out_y,
                        ColGeom<index_t> g, Finish f, StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  constexpr int U = unroll_for(sizeof(VecT));
  const int tx = static_cast<int>(threadIdx.x) & ((1 << g.tx_shift) - 1);
  const int ty = static_cast<int>(threadIdx.x) >> g.tx_shift;
  const index_t tile = blockIdx.x;
  const index_t p = blockIdx.y;
  const index_t cvec = (tile << g.tx_shift) + static_cast<index_t>(tx);
  const bool active = cvec < g.cv;
  ColCursor<index_t> cur(g, cvec, p, ty);
  // Rows this lane visits (the same for its V channels).
  const index_t cnt = active && cur.valid() ? (cur.end - cur.r + cur.step - 1) / cur.step : 0;
  acc_t k[V], s1[V], s2[V], sc[V], sh[V];
#pragma unroll
  for (int l = 0; l < V; ++l) k[l] = s1[l] = s2[l] = sc[l] = sh[l] = acc_t(0);
  scalar_t* const y = out_y.y;
  if (active) {
    if (cur.valid()) {
      const VecT first = load_vec<scalar_t, V>(x, cur.offset());
#pragma unroll
      for (int l = 0; l < V; ++l) k[l] = static_cast<acc_t>(first.val[l]);
    }
    if (y != nullptr) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sc[l] = out_y.scale[cvec * V + l];
        sh[l] = out_y.shift[cvec * V + l];
      }
    }
    sweep<U>(
        cur, [&](index_t off) { return load_vec<scalar_t, V>(x, off); },
        [&](const VecT& v, index_t off) {
#pragma unroll
          for (int l = 0; l < V; ++l) {
            const acc_t d = static_cast<acc_t>(v.val[l]) - k[l];
            s1[l] += d;
            s2[l] += d * d;
          }
          if (y != nullptr) {
            VecT w;
#pragma unroll
            for (int l = 0; l < V; ++l) {
              w.val[l] = static_cast<scalar_t>(static_cast<acc_t>(v.val[l]) * sc[l] + sh[l]);
            }
            store_vec<scalar_t, V>(y, off, w);
          }
        });
  }
  // Merge the lanes of each channel: first the rows within a warp (lanes tx,
  // tx + TX, ...: a butterfly over lane distances 16 .. TX), then the warps.
  __shared__ MStats tile_stats[kWarps][kMaxTileC];
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int tx_count = 1 << g.tx_shift;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    MStats st = from_shifted_sums<double>(static_cast<double>(cnt), k[l], s1[l], s2[l]);
    for (int o = 16; o >= tx_count; o >>= 1) st = merge(st, ShflXorStats{}(st, o));  // warp-uniform
    if (lane < tx_count) tile_stats[warp][tx * V + l] = st;  // lane == tx here
  }
  __syncthreads();
  // Thread (q, w) = (tid / 8, tid % 8) holds warp w's statistics of channel q of
  // the tile; 8-lane butterflies merge the warps.
  const int q = static_cast<int>(threadIdx.x) / kWarps;
  const int w = static_cast<int>(threadIdx.x) % kWarps;
  static_assert(kThreads / kWarps == kMaxTileC, "one 8-lane group per tile channel");
  MStats st = q < g.tile_c ? tile_stats[w][q] : empty_stats();
  st = cuda_reduce::warp_reduce<kWarps>(st, MergeOp{}, ShflXorStats{});
  const int64_t c0 = static_cast<int64_t>(tile) * g.tile_c;
  const int64_t c_len = static_cast<int64_t>(g.cv) * V;
  const int nch = c_len - c0 < g.tile_c ? static_cast<int>(c_len - c0) : g.tile_c;
  finish(f, out, static_cast<int64_t>(tile), c0, nch, static_cast<int>(p), w == 0 && q < nch, q, st);
}

// -- backward -----------------------------------------------------------------

template <typename acc_t>
struct BackwardCoef {
  const acc_t* grad_mean;
  const acc_t* grad_var;
  const acc_t* mean;
  const acc_t* scale;  // frozen_bn_stats: grad_y's factor; nullptr without grad_y
  acc_t inv_m;         // 1 / M
};

template <typename scalar_t, int V>
struct XandGy {
  Vec<scalar_t, V> x, gy;
};

// x's vector at `off`, and grad_y's when there is one (frozen_bn_stats).
template <typename scalar_t, int V, typename index_t>
__device__ __forceinline__ XandGy<scalar_t, V> load_x_gy(const scalar_t* x, const scalar_t* gy, index_t off) {
  XandGy<scalar_t, V> v{};  // gy stays zero (and defined) without a grad_y
  v.x = load_vec<scalar_t, V>(x, off);
  if (gy != nullptr) v.gy = load_vec<scalar_t, V>(gy, off);
  return v;
}

// One element of dx: a + b (x - m) [+ grad_y * s], rounded once to x's dtype.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t dx_of(scalar_t x, scalar_t gy, bool has_gy, acc_t a, acc_t b, acc_t m,
                                          acc_t s) {
  const acc_t stat = a + b * (static_cast<acc_t>(x) - m);
  return static_cast<scalar_t>(has_gy ? static_cast<acc_t>(gy) * s + stat : stat);
}

template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<index_t>)
    backward_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                         scalar_t* __restrict__ dx, BackwardCoef<at::opmath_type<scalar_t>> cf,
                         RowGeom<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  constexpr int U = unroll_for(2 * sizeof(VecT));  // x and grad_y
  const index_t c = blockIdx.x;
  RowCursor<index_t> cur(g, c, blockIdx.y);
  const acc_t a = cf.grad_mean[c] * cf.inv_m;
  const acc_t b = acc_t(2) * cf.grad_var[c] * cf.inv_m;
  const acc_t m = cf.mean[c];
  const acc_t s = gy != nullptr ? cf.scale[c] : acc_t(0);
  sweep<U>(
      cur, [&](index_t off) { return load_x_gy<scalar_t, V>(x, gy, off); },
      [&](const XandGy<scalar_t, V>& v, index_t off) {
        VecT o;
#pragma unroll
        for (int l = 0; l < V; ++l) o.val[l] = dx_of(v.x.val[l], v.gy.val[l], gy != nullptr, a, b, m, s);
        store_vec<scalar_t, V>(dx, off, o);
      });
}

template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<index_t>)
    backward_cols_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                         scalar_t* __restrict__ dx, BackwardCoef<at::opmath_type<scalar_t>> cf,
                         ColGeom<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  constexpr int U = unroll_for(2 * sizeof(VecT));  // x and grad_y
  const int tx = static_cast<int>(threadIdx.x) & ((1 << g.tx_shift) - 1);
  const int ty = static_cast<int>(threadIdx.x) >> g.tx_shift;
  const index_t cvec = (static_cast<index_t>(blockIdx.x) << g.tx_shift) + static_cast<index_t>(tx);
  if (cvec >= g.cv) return;  // no barrier or shuffle below
  ColCursor<index_t> cur(g, cvec, blockIdx.y, ty);
  acc_t a[V], b[V], m[V], s[V];
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const index_t c = cvec * V + l;
    a[l] = cf.grad_mean[c] * cf.inv_m;
    b[l] = acc_t(2) * cf.grad_var[c] * cf.inv_m;
    m[l] = cf.mean[c];
    s[l] = gy != nullptr ? cf.scale[c] : acc_t(0);
  }
  sweep<U>(
      cur, [&](index_t off) { return load_x_gy<scalar_t, V>(x, gy, off); },
      [&](const XandGy<scalar_t, V>& v, index_t off) {
        VecT o;
#pragma unroll
        for (int l = 0; l < V; ++l) {
          o.val[l] = dx_of(v.x.val[l], v.gy.val[l], gy != nullptr, a[l], b[l], m[l], s[l]);
        }
        store_vec<scalar_t, V>(dx, off, o);
      });
}

// -- host ---------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned_to(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// 32-bit indexing when every index of a vector or element, and every index sum,
// stays below 2^31.
bool fits_u32(const at::Tensor& x) {
  return x.numel() < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

struct Split {
  int64_t parts;  // blocks per unit
  int64_t chunk;  // items per block
};

// Splits the `items` of each of `units` units between blocks: as many as keep the
// grid within one wave (8 blocks per SM), at most kMaxParts, each block giving
// every thread at least kMinItemsPerThread of `items_per_step` items per step.
Split split_units(int64_t units, int64_t items, int64_t items_per_step, int device) {
  const int64_t wave = int64_t{kBlocksPerSm} * cached_sm_count(device);
  int64_t parts = std::max<int64_t>(1, wave / units);
  parts = std::min({parts, kMaxParts,
                    std::max<int64_t>(1, items / (items_per_step * kMinItemsPerThread))});
  const int64_t chunk = ceil_div(items, parts);
  return {ceil_div(items, chunk), chunk};  // no part starts past the end
}

// The workspace of a launch with `parts` blocks per unit (none when 1). `work`
// keeps it alive until the launch is queued; the caching allocator orders its
// reuse after this stream's kernels.
Finish make_finish(int64_t c_len, int64_t units, int64_t parts, const at::Tensor& like,
                   at::Tensor& work, cudaStream_t stream) {
  Finish f;
  f.parts = static_cast<int>(parts);
  f.groups = static_cast<int>(ceil_div(parts, kGroup));
  f.units = units;
  if (parts == 1) return f;
  const int64_t n_part = c_len * parts;
  const int64_t n_group = f.groups > 1 ? c_len * f.groups : 0;
  const int64_t n_count = units * (f.groups + 1);
  const int64_t doubles = (n_part + n_group) * 3 + ceil_div(n_count, 2);
  work = at::empty({doubles}, like.options().dtype(at::kDouble));
  double* base = work.mutable_data_ptr<double>();
  f.part = reinterpret_cast<MStats*>(base);
  f.group = n_group > 0 ? f.part + n_part : nullptr;
  f.count = reinterpret_cast<unsigned*>(base + (n_part + n_group) * 3);
  C10_CUDA_CHECK(cudaMemsetAsync(f.count, 0, static_cast<size_t>(n_count) * sizeof(unsigned), stream));
  return f;
}

template <typename index_t>
RowGeom<index_t> row_geom(const BnGeometry& g, int v, const Split& sp) {
  const int64_t sv = g.s / v;
  return RowGeom<index_t>{static_cast<index_t>(g.c), static_cast<index_t>(sv),
                          static_cast<index_t>(g.n * sv), static_cast<index_t>(sp.chunk),
                          static_cast<index_t>(kThreads / sv), static_cast<index_t>(kThreads % sv)};
}

// channels_last tiles for vectors of v elements of `elem` bytes: TX = the
// smallest power of two covering the row's vectors, at most a 64-byte tile.
struct Tiling {
  int tx_shift;
  int tile_c;
  int64_t tiles;
};

Tiling col_tiling(int64_t c_len, int v, int elem) {
  const int64_t cv = c_len / v;
  const int tx_max = kTileBytes / (v * elem);
  int shift = 0;
  while ((1 << shift) < tx_max && (int64_t{1} << shift) < cv) ++shift;
  const int tile_c = (1 << shift) * v;
  TORCH_CHECK(tile_c <= kMaxTileC, "bn_stats (CUDA): internal error, tile of ", tile_c, " channels");
  return {shift, tile_c, ceil_div(c_len, tile_c)};
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  AffineOut<scalar_t> y;
  acc_t* mean;
  acc_t* var;
};

template <typename scalar_t, int V, typename index_t>
void launch_forward_rows(const ForwardArgs<scalar_t>& a, const BnGeometry& g, const at::Tensor& x,
                         cudaStream_t stream) {
  const Split sp = split_units(g.c, g.n * (g.s / V), kThreads, x.get_device());
  at::Tensor work;
  const Finish f = make_finish(g.c, g.c, sp.parts, x, work, stream);
  TORCH_CHECK(g.c <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels (", g.c, ")");
  forward_rows_kernel<scalar_t, V, index_t>
      <<<dim3(static_cast<unsigned>(g.c), static_cast<unsigned>(sp.parts)), kThreads, 0, stream>>>(
          a.x, a.y, row_geom<index_t>(g, V, sp), f, {a.mean, a.var});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V, typename index_t>
void launch_forward_cols(const ForwardArgs<scalar_t>& a, const BnGeometry& g, const at::Tensor& x,
                         cudaStream_t stream) {
  const Tiling t = col_tiling(g.c, V, sizeof(scalar_t));
  const int64_t rows = g.reduced();
  const Split sp = split_units(t.tiles, rows, kThreads >> t.tx_shift, x.get_device());
  at::Tensor work;
  const Finish f = make_finish(g.c, t.tiles, sp.parts, x, work, stream);
  TORCH_CHECK(t.tiles <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels (", g.c, ")");
  const ColGeom<index_t> geom{static_cast<index_t>(g.c / V), static_cast<index_t>(rows),
                              static_cast<index_t>(sp.chunk), t.tx_shift, t.tile_c};
  forward_cols_kernel<scalar_t, V, index_t>
      <<<dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(sp.parts)), kThreads, 0, stream>>>(
          a.x, a.y, geom, f, {a.mean, a.var});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Vector loads need every vector aligned: the base pointers, and rows (NCHW:
// S elements; channels_last: C) made of whole vectors.
template <int V, typename scalar_t>
bool can_vectorise(const BnGeometry& g, std::initializer_list<const void*> ptrs) {
  const int64_t run = g.layout == BnLayout::kChannelsFirst ? g.s : g.c;
  if (run % V != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return aligned_to(p, sizeof(scalar_t) * V); });
}

template <typename scalar_t, typename index_t>
void launch_forward(const ForwardArgs<scalar_t>& a, const BnGeometry& g, const at::Tensor& x,
                    cudaStream_t stream) {
  if (g.layout == BnLayout::kChannelsFirst) {
    constexpr int V = kRowVec<scalar_t>;
    if (can_vectorise<V, scalar_t>(g, {a.x, a.y.y})) {
      launch_forward_rows<scalar_t, V, index_t>(a, g, x, stream);
    } else {
      launch_forward_rows<scalar_t, 1, index_t>(a, g, x, stream);
    }
  } else {
    constexpr int V = kChanVec<scalar_t>;
    if (can_vectorise<V, scalar_t>(g, {a.x, a.y.y})) {
      launch_forward_cols<scalar_t, V, index_t>(a, g, x, stream);
    } else {
      launch_forward_cols<scalar_t, 1, index_t>(a, g, x, stream);
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* x;
  const scalar_t* gy;  // nullptr: bn_stats' backward
  scalar_t* dx;
  BackwardCoef<at::opmath_type<scalar_t>> cf;
};

template <typename scalar_t, int V, typename index_t>
void launch_backward_rows(const BackwardArgs<scalar_t>& a, const BnGeometry& g, int device,
                          cudaStream_t stream) {
  const Split sp = split_units(g.c, g.n * (g.s / V), kThreads, device);
  TORCH_CHECK(g.c <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels (", g.c, ")");
  backward_rows_kernel<scalar_t, V, index_t>
      <<<dim3(static_cast<unsigned>(g.c), static_cast<unsigned>(sp.parts)), kThreads, 0, stream>>>(
          a.x, a.gy, a.dx, a.cf, row_geom<index_t>(g, V, sp));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V, typename index_t>
void launch_backward_cols(const BackwardArgs<scalar_t>& a, const BnGeometry& g, int device,
                          cudaStream_t stream) {
  const Tiling t = col_tiling(g.c, V, sizeof(scalar_t));
  const int64_t rows = g.reduced();
  const Split sp = split_units(t.tiles, rows, kThreads >> t.tx_shift, device);
  TORCH_CHECK(t.tiles <= std::numeric_limits<int32_t>::max(), "bn_stats: too many channels (", g.c, ")");
  const ColGeom<index_t> geom{static_cast<index_t>(g.c / V), static_cast<index_t>(rows),
                              static_cast<index_t>(sp.chunk), t.tx_shift, t.tile_c};
  backward_cols_kernel<scalar_t, V, index_t>
      <<<dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(sp.parts)), kThreads, 0, stream>>>(
          a.x, a.gy, a.dx, a.cf, geom);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_backward(const BackwardArgs<scalar_t>& a, const BnGeometry& g, int device,
                     cudaStream_t stream) {
  if (g.layout == BnLayout::kChannelsFirst) {
    constexpr int V = kRowVec<scalar_t>;
    if (can_vectorise<V, scalar_t>(g, {a.x, a.gy, a.dx})) {
      launch_backward_rows<scalar_t, V, index_t>(a, g, device, stream);
    } else {
      launch_backward_rows<scalar_t, 1, index_t>(a, g, device, stream);
    }
  } else {
    constexpr int V = kChanVec<scalar_t>;
    if (can_vectorise<V, scalar_t>(g, {a.x, a.gy, a.dx})) {
      launch_backward_cols<scalar_t, V, index_t>(a, g, device, stream);
    } else {
      launch_backward_cols<scalar_t, 1, index_t>(a, g, device, stream);
    }
  }
}

// Statistics of x (storage: dense after classify), and y when `y` is defined.
void forward_cuda(const at::Tensor& x, const BnGeometry& g, at::Tensor& mean, at::Tensor& var,
                  const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), {}, mean.mutable_data_ptr<acc_t>(),
                            var.mutable_data_ptr<acc_t>()};
    if (y.defined()) {
      a.y = AffineOut<scalar_t>{y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
                                shift.const_data_ptr<acc_t>()};
    }
    if (fits_u32(x)) {
      launch_forward<scalar_t, uint32_t>(a, g, x, stream);
    } else {
      launch_forward<scalar_t, int64_t>(a, g, x, stream);
    }
  });
}

// dx in x's (dense) layout; gy, when defined, in x's layout too.
void backward_cuda(const at::Tensor& x, const BnGeometry& g, const at::Tensor& grad_mean,
                   const at::Tensor& grad_var, const at::Tensor& mean, const at::Tensor& gy,
                   const at::Tensor& scale, at::Tensor& dx) {
  const auto acc_type = acc_scalar_type(x);
  const at::Tensor gm = grad_mean.to(acc_type).contiguous();
  const at::Tensor gv = grad_var.to(acc_type).contiguous();
  const at::Tensor mu = mean.to(acc_type).contiguous();
  const at::Tensor sc = scale.defined() ? scale.contiguous() : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> a{
        x.const_data_ptr<scalar_t>(), gy.defined() ? gy.const_data_ptr<scalar_t>() : nullptr,
        dx.mutable_data_ptr<scalar_t>(),
        BackwardCoef<acc_t>{gm.const_data_ptr<acc_t>(), gv.const_data_ptr<acc_t>(),
                            mu.const_data_ptr<acc_t>(),
                            sc.defined() ? sc.const_data_ptr<acc_t>() : nullptr,
                            acc_t(1) / static_cast<acc_t>(g.reduced())}};
    if (fits_u32(x)) {
      launch_backward<scalar_t, uint32_t>(a, g, x.get_device(), stream);
    } else {
      launch_backward<scalar_t, int64_t>(a, g, x.get_device(), stream);
    }
  });
}

void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): x must be a CUDA tensor; got one on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in) {
  const char* op = "exml_fast::bn_stats";
  check_bn_input(x_in, op);
  check_cuda_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  auto opts = x.options().dtype(acc_scalar_type(x));
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  forward_cuda(x, g, mean, var, {}, {}, {});
  return {mean, var};
}

at::Tensor bn_stats_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                  const at::Tensor& x_in, const at::Tensor& mean) {
  const char* op = "exml_fast::_bn_stats_backward";
  check_bn_input(x_in, op);
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  check_cuda_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  at::Tensor dx = at::empty_like(x);
  backward_cuda(x, g, grad_mean, grad_var, mean, {}, {}, dx);
  return dx_for_input(x_in, x, dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_stats_cuda(const at::Tensor& x_in,
                                                                    const at::Tensor& scale_in,
                                                                    const at::Tensor& shift_in) {
  const char* op = "exml_fast::frozen_bn_stats";
  check_bn_input(x_in, op);
  check_cuda_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  const auto acc_type = acc_scalar_type(x);
  check_per_channel(scale_in, "scale", x, acc_type, op);
  check_per_channel(shift_in, "shift", x, acc_type, op);
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  auto opts = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({g.c}, opts);
  at::Tensor var = at::empty({g.c}, opts);
  at::Tensor y = at::empty_like(x);  // x's layout (classify made it dense)
  forward_cuda(x, g, mean, var, y, scale, shift);
  return {dx_for_input(x_in, x, y), mean, var};
}

at::Tensor frozen_bn_stats_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_mean,
                                         const at::Tensor& grad_var, const at::Tensor& x_in,
                                         const at::Tensor& mean, const at::Tensor& scale) {
  const char* op = "exml_fast::_frozen_bn_stats_backward";
  check_bn_input(x_in, op);
  check_bn_backward_args(grad_mean, grad_var, x_in, mean);
  check_frozen_grad_y(grad_y, x_in, op);
  check_cuda_input(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x;
  const BnGeometry g = classify(x_in, x);
  check_per_channel(scale, "scale", x, acc_scalar_type(x), op);
  const at::Tensor gy = in_layout_of(grad_y, x);
  at::Tensor dx = at::empty_like(x);
  backward_cuda(x, g, grad_mean, grad_var, mean, gy, scale, dx);
  return dx_for_input(x_in, x, dx);
}

}  // namespace
}  // namespace exml_fast

TORCH_LIBRARY_IMPL(exml_fast, CUDA, m) {
  m.impl("bn_stats", &exml_fast::bn_stats_cuda);
  m.impl("_bn_stats_backward", &exml_fast::bn_stats_backward_cuda);
  m.impl("frozen_bn_stats", &exml_fast::frozen_bn_stats_cuda);
  m.impl("_frozen_bn_stats_backward", &exml_fast::frozen_bn_stats_backward_cuda);
}
