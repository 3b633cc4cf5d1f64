// Merges the fp32 partials of split sequences by their lse: out = sum_i exp(lse_i - lse) o_i,
// lse = log(sum_i exp(lse_i)). A unit of work is (sequence, kv head, block of 8 query rows,
// quarter of the 512 columns): one warp per row, so even a batch of one spreads over many SMs.
// Sequences with a single split were finished by the decode kernel and are skipped.
// Launched as a programmatic dependent of the decode kernel (decode_launch.cuh), so its launch
// overlaps the decode grid's tail. The grid is either one block per unit or capped at one wave of
// blocks that walk the units (DecodeOptions::combine_one_wave): the decode CTAs use every
// register of their SM, so no combine block starts before they exit, and at b 64 the 4,096 units,
// nearly all of them empty, would otherwise drain in several waves of block launches.
#pragma once
#include <cuda_runtime.h>
#include <math_constants.h>

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

// Units of one sequence: kv heads x 8-row blocks x column quarters.
__host__ __device__ inline int combine_units_per_sequence(const DecodeParams& p) {
  return p.h_kv * ceil_div(p.rows, kCombineRowsPerBlock) * kCombineColSplits;
}

// Accumulates w_i * o_i over the n splits of one row into acc (lane: 4 columns).
// kLoads 4: each split's weight from its own lse load, 4 splits unrolled. kLoads 8: lane k computes
// the weight of split k once and the loop takes it by shuffle, so its only loads are the partials,
// 8 in flight before the first FMA (more registers: fewer blocks an SM).
template <int kLoads, typename SlotRow>
__device__ __forceinline__ float4 combine_row(const DecodeParams& p, SlotRow slot_row, int n, float lse, int col,
                                              int lane) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kLoads == 4) {
#pragma unroll 4
    for (int i = 0; i < n; ++i) {
      const float w = __expf(p.lse_accum[slot_row(i)] - lse);
      const float4 v = *reinterpret_cast<const float4*>(p.out_accum + slot_row(i) * kHeadDimV + col);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  } else {
    for (int i0 = 0; i0 < n; i0 += 32) {
      const int chunk = min(32, n - i0);
      const float w_mine = lane < chunk ? __expf(p.lse_accum[slot_row(i0 + lane)] - lse) : 0.f;
      for (int k0 = 0; k0 < chunk; k0 += kLoads) {
        float4 v[kLoads];
        float w[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int k = k0 + u;  // the same in every lane
          const float wk = __shfl_sync(0xffffffffu, w_mine, k % 32);
          w[u] = k < chunk ? wk : 0.f;
          v[u] = k < chunk ? *reinterpret_cast<const float4*>(p.out_accum + slot_row(i0 + k) * kHeadDimV + col)
                           : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          acc.x += w[u] * v[u].x;
          acc.y += w[u] * v[u].y;
          acc.z += w[u] * v[u].z;
          acc.w += w[u] * v[u].w;
        }
      }
    }
  }
  return acc;
}

// One unit: this warp's row of it (rows past p.rows have nothing to do).
template <typename Elem, int kLoads>
__device__ __forceinline__ void combine_unit(const DecodeParams& p, int unit, int units_per_sequence) {
  const int b = unit / units_per_sequence;
  const int in_seq = unit % units_per_sequence;
  const int per_head = units_per_sequence / p.h_kv;
  const int hk = in_seq / per_head;
  const int quarter = in_seq % kCombineColSplits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mrow = (in_seq % per_head) / kCombineColSplits * kCombineRowsPerBlock + warp;
  if (mrow >= p.rows) return;
  const int first = p.num_splits[b];
  const int n = p.num_splits[b + 1] - first;

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
  const float4 acc = empty ? make_float4(0.f, 0.f, 0.f, 0.f) : combine_row<kLoads>(p, slot_row, n, lse, col, lane);
  const int s = mrow / p.groups;
  const int head = hk * p.groups + mrow % p.groups;
  Elem* out = static_cast<Elem*>(p.out) + (int64_t(b * p.s_q + s) * p.h_q + head) * kHeadDimV;
  uint2 packed;
  packed.x = ElemOps<Elem>::pack(acc.x, acc.y);
  packed.y = ElemOps<Elem>::pack(acc.z, acc.w);
  *reinterpret_cast<uint2*>(out + col) = packed;
  if (lane == 0 && quarter == 0) p.lse[(int64_t(b) * p.h_q + head) * p.s_q + s] = lse;
}

// Block i walks units i, i + grid, i + 2 grid, ...: 32 of them at a time, lane k of every warp
// looking up unit k's split count, so a block whose units are all unsplit costs one load round.
template <typename Elem, int kLoads>
__global__ void __launch_bounds__(kCombineThreads)
    mla_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int per_sequence = combine_units_per_sequence(p);
  const int units = p.batch * per_sequence;
  const int lane = threadIdx.x % 32;
  bool waited = false;
  for (int base = blockIdx.x; base < units; base += 32 * gridDim.x) {
    const int mine = base + lane * gridDim.x;
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
      combine_unit<Elem, kLoads>(p, base + k * gridDim.x, per_sequence);
    }
  }
}

}  // namespace kvpager
