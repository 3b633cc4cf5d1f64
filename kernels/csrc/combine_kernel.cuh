// Merges the fp32 partials of split sequences by their lse: out = sum_i exp(lse_i - lse) o_i,
// lse = log(sum_i exp(lse_i)). One warp per (sequence, kv head, query row, quarter of the 512
// columns), so even a batch of one spreads over many SMs; sequences with a single split were
// finished by the decode kernel and are skipped. Launched as a programmatic dependent of the
// decode kernel (decode_launch.cuh), so its launch overlaps the decode grid's tail.
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
  const int s = mrow / p.groups;
  const int head = hk * p.groups + mrow % p.groups;
  Elem* out = static_cast<Elem*>(p.out) + (int64_t(b * p.s_q + s) * p.h_q + head) * kHeadDimV;
  uint2 packed;
  packed.x = ElemOps<Elem>::pack(acc.x, acc.y);
  packed.y = ElemOps<Elem>::pack(acc.z, acc.w);
  *reinterpret_cast<uint2*>(out + col) = packed;
  if (lane == 0 && quarter == 0) p.lse[(int64_t(b) * p.h_q + head) * p.s_q + s] = lse;
}

}  // namespace kvpager
