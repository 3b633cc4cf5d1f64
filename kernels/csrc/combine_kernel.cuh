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

// One warp's merge. Latency, not bandwidth, bounds it (a small batch's few MB of partials sit in
// L2), so the loads are batched: the first kCombineBatch partial rows are requested together with
// the lse values, and each later batch in one go, so n splits cost 1 + (n - 1) / kCombineBatch
// memory round trips instead of one per four splits (s20). Lane l keeps split l's weight; later
// splits (n > 32) read theirs again.
template <typename Elem, int kCombineBatch>
__global__ void __launch_bounds__(kCombineThreads)
    mla_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int b = blockIdx.z, hk = blockIdx.y;
  // num_splits comes from the metadata kernel, finished before the decode grid started; the
  // decode grid's partials are read only after griddepcontrol.wait (a no-op without PDL).
  const int first = p.num_splits[b];
  const int n = p.num_splits[b + 1] - first;
  if (n <= 1) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quarter = blockIdx.x % kCombineColSplits;
  const int mrow = (blockIdx.x / kCombineColSplits) * kCombineRowsPerBlock + warp;
  if (mrow >= p.rows) return;
  const int col = quarter * (kHeadDimV / kCombineColSplits) + lane * 4;  // a float4 per lane and split
  const int64_t stride = int64_t(p.h_kv) * p.rows;                      // from one split's row to the next
  const float* lse_at = p.lse_accum + int64_t(first) * stride + int64_t(hk) * p.rows + mrow;
  const float* part_at = p.out_accum + (int64_t(first) * stride + int64_t(hk) * p.rows + mrow) * kHeadDimV + col;
  asm volatile("griddepcontrol.wait;" ::: "memory");

  float4 v[kCombineBatch];
  auto load_batch = [&](int i0) {
#pragma unroll
    for (int k = 0; k < kCombineBatch; ++k)
      v[k] = i0 + k < n ? *reinterpret_cast<const float4*>(part_at + (i0 + k) * stride * kHeadDimV)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  load_batch(0);
  const float lse_lane = lane < n ? lse_at[lane * stride] : -CUDART_INF_F;
  float mx = lse_lane;
  for (int i = lane + 32; i < n; i += 32) mx = fmaxf(mx, lse_at[i * stride]);
  mx = warp_max(mx);
  float sum = 0.f;
  if (mx > -CUDART_INF_F) {
    sum = __expf(lse_lane - mx);
    for (int i = lane + 32; i < n; i += 32) sum += __expf(lse_at[i * stride] - mx);
  }
  sum = warp_sum(sum);
  const bool empty = !(sum > 0.f);
  const float lse = empty ? CUDART_INF_F : mx + __logf(sum);
  const float w_lane = __expf(lse_lane - lse);  // 0 for lanes past n and for an empty row

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i0 = 0; i0 < n; i0 += kCombineBatch) {
    if (i0 > 0) load_batch(i0);
#pragma unroll
    for (int k = 0; k < kCombineBatch; ++k) {
      const int i = i0 + k;
      if (i >= n) break;
      const float w = i < 32 ? __shfl_sync(0xffffffffu, w_lane, i) : __expf(lse_at[i * stride] - lse);
      acc.x += w * v[k].x;
      acc.y += w * v[k].y;
      acc.z += w * v[k].z;
      acc.w += w * v[k].w;
    }
  }
  if (empty) acc = make_float4(0.f, 0.f, 0.f, 0.f);  // no key anywhere: zeros, as the decode kernel writes
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
