// The end of a sequence segment, shared by the decode kernels: row limits for masking, and the
// normalised output of one lane's two rows, as final output or as a split's fp32 partial.
#pragma once
#include <math_constants.h>

#include "config.h"
#include "params.h"
#include "tile_ops.h"

namespace kvpager {

// Key j is visible to a row iff j < its limit; with causal, query s of s_q sees one key fewer
// than query s + 1 and the last sees the whole sequence. Rows past the last query get a limit
// too (their results are never stored).
__device__ __forceinline__ int row_limit(const DecodeParams& p, int seqlen, int mrow) {
  return p.causal ? seqlen - p.s_q + 1 + mrow / p.groups : seqlen;
}

// Writes one lane's share of row `mrow`: fragment tiles o[n] hold columns col0 + kTileCols * n +
// {0, 1} of its rows (o[n][2*half + c], half selects the lane's first or second row). row_max is in log2
// units, row_sum the full row sum. An empty row is +inf in the final lse, but -inf (no weight)
// as a partial, so the combine kernel can tell it apart.
template <typename Elem, int kTiles, int kTileCols = kMmaN>
__device__ __forceinline__ void write_row(const DecodeParams& p, int b, int hk, int mrow, int half,
                                          const float (&o)[kTiles][4], float row_max,
                                          float row_sum, int col0, bool writes_lse,
                                          int n_splits, int slot) {
  if (mrow >= p.rows) return;
  const bool empty = !(row_sum > 0.f);
  const float inv = empty ? 0.f : 1.f / row_sum;
  const float lse = empty ? (n_splits > 1 ? -CUDART_INF_F : CUDART_INF_F)
                          : (row_max + __log2f(row_sum)) * 0.69314718055994531f;
  const int s = mrow / p.groups;
  const int head = hk * p.groups + mrow % p.groups;
  if (n_splits <= 1) {
    Elem* out = static_cast<Elem*>(p.out) + (int64_t(b * p.s_q + s) * p.h_q + head) * kHeadDimV;
#pragma unroll
    for (int n = 0; n < kTiles; ++n)
      *reinterpret_cast<uint32_t*>(out + col0 + n * kTileCols) =
          ElemOps<Elem>::pack(o[n][2 * half] * inv, o[n][2 * half + 1] * inv);
    if (writes_lse) p.lse[(int64_t(b) * p.h_q + head) * p.s_q + s] = lse;
  } else {
    const int64_t slot_row = (int64_t(slot) * p.h_kv + hk) * p.rows + mrow;
    float* acc = p.out_accum + slot_row * kHeadDimV;
#pragma unroll
    for (int n = 0; n < kTiles; ++n)
      *reinterpret_cast<float2*>(acc + col0 + n * kTileCols) =
          make_float2(o[n][2 * half] * inv, o[n][2 * half + 1] * inv);
    if (writes_lse) p.lse_accum[slot_row] = lse;
  }
}

}  // namespace kvpager
