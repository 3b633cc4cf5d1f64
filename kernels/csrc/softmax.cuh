// Online softmax, written once for every decode kernel.
//
// Fragment convention (mma.m16n8k16's C and wgmma's D alike): a lane holds two rows (g and g + 8
// of its warp's 16, g = lane / 4) and, per 8-key tile n, registers 4n..4n+3 =
// (row 0, key 8n + 2t), (row 0, key 8n + 2t + 1), (row 1, key 8n + 2t), (row 1, key 8n + 2t + 1),
// t = lane % 4. The four lanes of a quad share the two rows.
#pragma once
#include <math_constants.h>

#include "config.h"
#include "tile_ops.h"

namespace kvpager {

struct OnlineSoftmax {
  float row_max[2];  // running max of each row in log2 units (scores * scale_log2); -inf before any key
  float row_sum[2];  // this lane's share of each row's sum of exp2(score - row_max)

  __device__ __forceinline__ void reset() {
    row_max[0] = row_max[1] = -CUDART_INF_F;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // Scores -> log2 units; when `mask`, keys at or past a row's limit -> -inf (first_key: the key of
  // register 0). Returns each row's max over the fragment and the quad.
  template <int N>
  __device__ __forceinline__ static void to_log2(float (&s)[N], float scale_log2, bool mask, int first_key,
                                                 int t, const int (&limit)[2], float (&page_max)[2]) {
    page_max[0] = page_max[1] = -CUDART_INF_F;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int row = (i >> 1) & 1;
      float v = s[i] * scale_log2;
      if (mask && first_key + (i / 4) * kMmaN + 2 * t + (i & 1) >= limit[row]) v = -CUDART_INF_F;
      s[i] = v;
      page_max[row] = fmaxf(page_max[row], v);
    }
    page_max[0] = quad_max(page_max[0]);
    page_max[1] = quad_max(page_max[1]);
  }

  // Moves the running max to include `page_max`. alpha rescales what was accumulated so far;
  // base is the exponent origin of the new probabilities (0 while a row has seen no key, so
  // exp2(-inf - base) = 0 and nothing becomes NaN).
  __device__ __forceinline__ void advance(const float (&page_max)[2], float (&alpha)[2], float (&base)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m = fmaxf(row_max[i], page_max[i]);
      base[i] = m == -CUDART_INF_F ? 0.f : m;
      alpha[i] = exp2f(row_max[i] - base[i]);
      row_max[i] = m;
    }
  }

  // s := exp2(s - base); row_sum := row_sum * alpha + the fragment's row sums.
  template <int N>
  __device__ __forceinline__ void exponentiate(float (&s)[N], const float (&base)[2], const float (&alpha)[2]) {
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int row = (i >> 1) & 1;
      s[i] = exp2f(s[i] - base[row]);
      sum[row] += s[i];
    }
    row_sum[0] = row_sum[0] * alpha[0] + sum[0];
    row_sum[1] = row_sum[1] * alpha[1] + sum[1];
  }

  // Multiplies an accumulator fragment (same convention) by its rows' factors.
  template <int N>
  __device__ __forceinline__ static void rescale(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] *= alpha[(i >> 1) & 1];
  }
};

// Row maxima across the `groups` warps (or warpgroups) that share rows: each quad leader writes its
// group's value for its rows into exchange[group * block_m + row], one CTA barrier, then every
// lane reads all groups. Callers separate two exchanges through the same array by a barrier.
__device__ __forceinline__ void cta_row_max(float* exchange, int group, int groups, int block_m,
                                            const int (&rows)[2], int t, float (&value)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (t == 0) exchange[group * block_m + rows[i]] = value[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float m = -CUDART_INF_F;
    for (int c = 0; c < groups; ++c) m = fmaxf(m, exchange[c * block_m + rows[i]]);
    value[i] = m;
  }
}

// The barrier of a row exchange: the whole CTA, unless a kernel has threads that take no part
// (the FP8 seesaw's converter warpgroup) and passes a named barrier of its own.
struct CtaSync {
  __device__ __forceinline__ static void sync() { __syncthreads(); }
};

// Full row sums: this lane's shares summed over the quad, then over the groups (as cta_row_max).
template <typename Sync = CtaSync>
__device__ __forceinline__ void cta_row_sum(float* exchange, int group, int groups, int block_m,
                                            const int (&rows)[2], int t, const float (&share)[2],
                                            float (&total)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float s = quad_sum(share[i]);
    if (t == 0) exchange[group * block_m + rows[i]] = s;
  }
  Sync::sync();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = 0.f;
    for (int c = 0; c < groups; ++c) l += exchange[c * block_m + rows[i]];
    total[i] = l;
  }
}

// Packs a probability fragment into Elem pairs: out[k] = (s[2k], s[2k+1]) * scale of its row, i.e.
// for tile n out[2n] = row 0's pair, out[2n + 1] = row 1's. Two consecutive tiles (k16) are then
// exactly wgmma's register A fragment {out[4j], out[4j+1], out[4j+2], out[4j+3]}.
template <typename Elem, int N>
__device__ __forceinline__ void pack_fragment(const float (&s)[N], uint32_t (&out)[N / 2], const float (&scale)[2]) {
#pragma unroll
  for (int k = 0; k < N / 2; ++k) out[k] = ElemOps<Elem>::pack(s[2 * k] * scale[k & 1], s[2 * k + 1] * scale[k & 1]);
}

// Stores a packed fragment into a swizzled P tile (`row_bytes` per row; 16-byte chunk first_chunk
// + n holds tile n), where an MMA reads it as its A operand.
template <int M>
__device__ __forceinline__ void store_packed(char* sP, int row_bytes, const int (&rows)[2], int first_chunk, int t,
                                             const uint32_t (&packed)[M]) {
#pragma unroll
  for (int k = 0; k < M; ++k)
    *reinterpret_cast<uint32_t*>(sP + swizzled(rows[k & 1], first_chunk + k / 2, row_bytes) + 4 * t) = packed[k];
}

}  // namespace kvpager
