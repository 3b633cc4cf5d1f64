// Merges the fp32 partials of split sequences by their lse: out = sum_i exp(lse_i - lse) o_i,
// lse = log(sum_i exp(lse_i)). A unit of work is (sequence, kv head, block of 8 query rows,
// quarter of the 512 columns): one warp per row, so even a batch of one spreads over many SMs.
// Sequences with a single split were finished by the decode kernel and are skipped. Launched as a
// programmatic dependent of the decode kernel (decode_launch.cuh), so its launch overlaps the
// decode grid's tail.
// Two kernels (DecodeOptions::combine_one_wave): the default has one block per unit; the trial
// (s26, unmeasured) caps the grid at one wave of blocks that walk the units. The decode CTAs use
// every register of their SM, so no combine block starts before they exit, and at b 64 the 4,096
// units, nearly all of them unsplit, drain in several waves of block launches.
#pragma once
#include <cuda_runtime.h>
#include <math_constants.h>

#include "combine_units.h"
#include "config.h"
#include "params.h"
#include "tile_ops.h"

namespace kvpager {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The merged row's 4 columns of this lane, and (lane 0 of quarter 0) its lse.
template <typename Elem>
__device__ __forceinline__ void store_combined_row(const DecodeParams& p, int b, int hk, int mrow, int quarter,
                                                   int col, int lane, const float4& acc, float lse) {
  const int s = mrow / p.groups;
  const int head = hk * p.groups + mrow % p.groups;
  Elem* out = static_cast<Elem*>(p.out) + (int64_t(b * p.s_q + s) * p.h_q + head) * kHeadDimV;
  uint2 packed;
  packed.x = ElemOps<Elem>::pack(acc.x, acc.y);
  packed.y = ElemOps<Elem>::pack(acc.z, acc.w);
  *reinterpret_cast<uint2*>(out + col) = packed;
  if (lane == 0 && quarter == 0) p.lse[(int64_t(b) * p.h_q + head) * p.s_q + s] = lse;
}

// This warp's row mrow of sequence b, kv head hk, column quarter `quarter`, merged from its n splits
// (the default): the lse reduced from loads spread over the lanes, then each split's weight from its
// own lse load beside its partial's, 4 splits unrolled.
template <typename Elem>
__device__ __forceinline__ void combine_row_out(const DecodeParams& p, int b, int hk, int mrow, int quarter,
                                                int first, int n, int lane) {
  auto slot_row = [&](int i) { return (int64_t(first + i) * p.h_kv + hk) * p.rows + mrow; };
  float mx = -CUDART_INF_F;
  for (int i = lane; i < n; i += 32) mx = fmaxf(mx, p.lse_accum[slot_row(i)]);
  mx = warp_max(mx);
  float sum = 0.f;
  if (mx > -CUDART_INF_F)
    for (int i = lane; i < n; i += 32) sum += __expf(p.lse_accum[slot_row(i)] - mx);
  sum = warp_sum(sum);
  const bool empty = !(sum > 0.f);
  const float lse = empty ? CUDART_INF_F : mx + __logf(sum);

  // Lane owns 4 consecutive columns of this warp's quarter: one float4 per split, coalesced.
  const int col = quarter * (kHeadDimV / kCombineColSplits) + lane * 4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty) {
#pragma unroll 4
    for (int i = 0; i < n; ++i) {
      const float w = __expf(p.lse_accum[slot_row(i)] - lse);
      const float4 v = *reinterpret_cast<const float4*>(p.out_accum + slot_row(i) * kHeadDimV + col);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  store_combined_row<Elem>(p, b, hk, mrow, quarter, col, lane, acc, lse);
}

// The same row by the s26 trial (KVPAGER_COMBINE_LOADS=8|16): the first kDepth partials are loaded
// before the lse, which they do not depend on, so their latency hides under its reduction; lane k
// keeps split k's lse in a register and computes its weight once, which the accumulation takes by
// shuffle, so its only loads are the partials, kDepth at a time. The same arithmetic in the same
// order as the default: bit-identical results.
template <typename Elem, int kDepth>
__device__ __forceinline__ void combine_row_out_prefetched(const DecodeParams& p, int b, int hk, int mrow,
                                                           int quarter, int first, int n, int lane) {
  // Split i's lse and partial row: a base pointer and a stride (short code: it runs cold, once a call).
  const int64_t split_rows = int64_t(p.h_kv) * p.rows;
  const float* lse_row = p.lse_accum + (int64_t(first) * p.h_kv + hk) * p.rows + mrow;
  const int col = quarter * (kHeadDimV / kCombineColSplits) + lane * 4;
  const float* partial_row = p.out_accum + ((int64_t(first) * p.h_kv + hk) * p.rows + mrow) * kHeadDimV + col;
  auto lse_of = [&](int i) { return lse_row[i * split_rows]; };
  auto partial = [&](int i) { return *reinterpret_cast<const float4*>(partial_row + i * split_rows * kHeadDimV); };
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  float4 v[kDepth];
#pragma unroll
  for (int u = 0; u < kDepth; ++u) v[u] = u < n ? partial(u) : zero;

  const float lse_lane = lane < n ? lse_of(lane) : -CUDART_INF_F;  // splits past 32: read again
  float mx = -CUDART_INF_F;
  if (lane < n) mx = fmaxf(mx, lse_lane);
#pragma unroll 1
  for (int i = lane + 32; i < n; i += 32) mx = fmaxf(mx, lse_of(i));
  mx = warp_max(mx);
  float sum = 0.f;
  if (mx > -CUDART_INF_F) {
    if (lane < n) sum += __expf(lse_lane - mx);
#pragma unroll 1
    for (int i = lane + 32; i < n; i += 32) sum += __expf(lse_of(i) - mx);
  }
  sum = warp_sum(sum);
  const bool empty = !(sum > 0.f);
  const float lse = empty ? CUDART_INF_F : mx + __logf(sum);

  float4 acc = zero;
  if (!empty) {
    static_assert(32 % kDepth == 0, "a group of splits stays within one lane-per-split chunk");
    float w_mine = lane < n ? __expf(lse_lane - lse) : 0.f;
#pragma unroll 1
    for (int g = 0; g < n; g += kDepth) {  // splits g .. g + kDepth - 1, already in v
      if (g > 0 && g % 32 == 0) w_mine = g + lane < n ? __expf(lse_of(g + lane) - lse) : 0.f;
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
        const float wk = __shfl_sync(0xffffffffu, w_mine, (g + u) % 32);  // g + u: the same in every lane
        const float w = g + u < n ? wk : 0.f;
        acc.x += w * v[u].x;
        acc.y += w * v[u].y;
        acc.z += w * v[u].z;
        acc.w += w * v[u].w;
      }
      if (g + kDepth < n) {
#pragma unroll
        for (int u = 0; u < kDepth; ++u) v[u] = g + kDepth + u < n ? partial(g + kDepth + u) : zero;
      }
    }
  }
  store_combined_row<Elem>(p, b, hk, mrow, quarter, col, lane, acc, lse);
}

// The default: block (rows / 8 x 4, h_kv, batch) is one unit.
template <typename Elem>
__global__ void __launch_bounds__(kCombineThreads)
    mla_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int b = blockIdx.z, hk = blockIdx.y;
  // num_splits comes from the metadata kernel, finished before the decode grid started; the
  // decode grid's partials are read only after griddepcontrol.wait (a no-op without PDL).
  const int first = p.num_splits[b];
  const int n = p.num_splits[b + 1] - first;
  if (n <= 1) return;
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quarter = blockIdx.x % kCombineColSplits;
  const int mrow = (blockIdx.x / kCombineColSplits) * kCombineRowsPerBlock + warp;
  if (mrow >= p.rows) return;
  combine_row_out<Elem>(p, b, hk, mrow, quarter, first, n, lane);
}

// One unit of the walk: this warp's row of it (rows past p.rows have nothing to do).
template <typename Elem, int kLoads>
__device__ __forceinline__ void combine_unit(const DecodeParams& p, int unit, int units_per_sequence) {
  const CombineUnit u = combine_unit_at(unit, units_per_sequence, p.h_kv);
  const int mrow = u.row_block * kCombineRowsPerBlock + threadIdx.x / 32;
  if (mrow >= p.rows) return;
  const int first = p.num_splits[u.b], n = p.num_splits[u.b + 1] - first, lane = threadIdx.x % 32;
  if constexpr (kLoads == 4)
    combine_row_out<Elem>(p, u.b, u.hk, mrow, u.quarter, first, n, lane);
  else
    combine_row_out_prefetched<Elem, kLoads>(p, u.b, u.hk, mrow, u.quarter, first, n, lane);
}

// Block i walks units i, i + grid, i + 2 grid, ... (combine_walk_unit): 32 of them a round, lane k
// of every warp looking up the k-th one's split count, so a block whose units are all unsplit costs
// one load round. (Min. blocks 1: without it ptxas holds the 4-load kernel at 40 registers and
// spills 4 bytes; with it, 64 registers and no spill.)
template <typename Elem, int kLoads>
__global__ void __launch_bounds__(kCombineThreads, 1)
    mla_combine_walk_kernel(const __grid_constant__ DecodeParams p) {
  const int per_sequence = combine_units_per_sequence(p.h_kv, p.rows);
  const int units = p.batch * per_sequence;
  const int lane = threadIdx.x % 32;
  bool waited = false;
  for (int round = 0; combine_walk_unit(blockIdx.x, gridDim.x, round, 0) < units; ++round) {
    const int mine = combine_walk_unit(blockIdx.x, gridDim.x, round, lane);
    // num_splits comes from the metadata kernel, finished before the decode grid started.
    int n = 0;
    if (mine < units) {
      const int b = mine / per_sequence;
      n = p.num_splits[b + 1] - p.num_splits[b];
    }
    unsigned todo = __ballot_sync(0xffffffffu, n > 1);  // the same in every warp of the block
    if (todo != 0 && !waited) {
      // The decode grid's partials are read only after this (a no-op without PDL).
      asm volatile("griddepcontrol.wait;" ::: "memory");
      waited = true;
    }
    while (todo != 0) {
      const int k = __ffs(todo) - 1;
      todo &= todo - 1;
      combine_unit<Elem, kLoads>(p, combine_walk_unit(blockIdx.x, gridDim.x, round, k), per_sequence);
    }
  }
}

}  // namespace kvpager
