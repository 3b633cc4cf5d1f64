// The split-KV MLA decode kernel: one CTA per (part of the batch's work, kv head, block of query
// rows). For every sequence segment in its part it streams the segment's 64-token latent pages
// through two shared-memory buffers (cp.async, zero-filled past the sequence end) and runs
// online softmax with tensor-core MMAs: S = Q K^T over 576 columns, O += P V over the first 512
// columns of the same page. Unsplit sequences write the final output; split ones write fp32
// partials + lse for the combine kernel.
//
// Warp roles: 8 warps = RowGroups x ColGroups (TileShape). A warp owns 16 query rows, a slice of
// the page's keys for S, and a slice of O's 512 columns, whose fp32 accumulator lives in its
// registers for the whole segment. Warps sharing rows agree on the running row max through
// shared memory each page, so all of them rescale identically (exact online softmax).
#pragma once
#include <cuda_runtime.h>
#include <math_constants.h>

#include "config.h"
#include "epilogue.cuh"
#include "params.h"
#include "softmax.cuh"
#include "tile_loads.cuh"
#include "tile_scheduler.cuh"
#include "tile_ops.h"

namespace kvpager {

// ---- the kernel -----------------------------------------------------------------------------

template <typename Elem, int BLOCK_M>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_kernel(const __grid_constant__ DecodeParams p) {
  using S = TileShape<BLOCK_M>;
  extern __shared__ __align__(1024) char smem[];
  char* sQ = smem + S::kSmemQ;
  char* sK = smem + S::kSmemK;
  char* sP = smem + S::kSmemP;
  float* sRed = reinterpret_cast<float*>(smem + S::kSmemRed);

  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp / S::kColGroups, cg = warp % S::kColGroups;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: rows g, g+8; cols 2t, 2t+1

  const PartWork work = part_work(p, part);

  const uint32_t q_base = smem_addr(sQ), k_base = smem_addr(sK), p_base = smem_addr(sP);
  // ldmatrix lane addressing (see the fragment layouts of mma.m16n8k16):
  const int a_row = rg * kMmaM + (lane % 16);  // A operand (Q, P): rows 0-15, chunk +0/+1
  const int a_chunk = lane / 16;
  const int kb_row = cg * S::kKeysPerWarp + (lane % 8) + (lane / 16) * 8;  // B of S: key rows
  const int kb_chunk = (lane / 8) % 2;
  const int v_row = (lane % 8) + ((lane / 8) % 2) * 8;  // B of PV (transposed): key rows
  const int v_chunk = lane / 16;
  const int my_row[2] = {rg * kMmaM + g, rg * kMmaM + g + 8};  // local rows of this lane's values

  for (int b = work.begin_b; b <= work.end_b; ++b) {
    const Segment seg = segment_of(p, work, b);
    const int seqlen = seg.seqlen, ps = seg.first_page, pe = seg.end_page;

    cute::cp_async_wait<0>();
    __syncthreads();  // the previous segment is done with every buffer
    load_segment_start<Elem, BLOCK_M, RowSwizzled>(p, sQ, sK, b, hk, m_block, ps, pe, seqlen);

    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_limit(p, seqlen, m_block * BLOCK_M + my_row[i]);
    const int min_limit = row_limit(p, seqlen, 0);  // query 0 sees the fewest keys

    float o[S::kOutTiles][4];
#pragma unroll
    for (int n = 0; n < S::kOutTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};  // in log2 units (scores * scale_log2)
    float row_sum[2] = {0.f, 0.f};                     // this lane's share of the row sums

    for (int pg = ps; pg < pe; ++pg) {
      cute::cp_async_wait<1>();
      __syncthreads();  // page pg (and Q) landed for every thread's copies
      const int buf = (pg - ps) & 1;
      const uint32_t kbuf = k_base + buf * kPageBytes;

      // S = Q K^T for this warp's rows and keys.
      float s[S::kKeyTiles][4];
#pragma unroll
      for (int n = 0; n < S::kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll 4
      for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
        uint32_t a[4];
        ldsm_x4(q_base + swizzled(a_row, kk * 2 + a_chunk, kRowBytes), a);
        if constexpr (S::kKeyTiles == 1) {
          uint32_t bk[2];
          ldsm_x2(kbuf + swizzled(kb_row, kk * 2 + kb_chunk, kRowBytes), bk);
          mma_16x8x16<Elem>(s[0], a, bk[0], bk[1]);
        } else {
#pragma unroll
          for (int j = 0; j < S::kKeyTiles / 2; ++j) {
            uint32_t bk[4];
            ldsm_x4(kbuf + swizzled(kb_row + j * 16, kk * 2 + kb_chunk, kRowBytes), bk);
            mma_16x8x16<Elem>(s[2 * j], a, bk[0], bk[1]);
            mma_16x8x16<Elem>(s[2 * j + 1], a, bk[2], bk[3]);
          }
        }
      }

      // Scale; mask only on pages that reach past some row's limit.
      const bool needs_mask = (pg + 1) * kPageSize > min_limit;
      float page_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
      for (int n = 0; n < S::kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[n][e] * p.scale_log2;
          if (needs_mask) {
            const int key = pg * kPageSize + cg * S::kKeysPerWarp + n * kMmaN + 2 * t + (e & 1);
            if (key >= limit[e >> 1]) v = -CUDART_INF_F;
          }
          s[n][e] = v;
          page_max[e >> 1] = fmaxf(page_max[e >> 1], v);
        }
      }
      // Row max across the quad, then across the warps that share these rows.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        page_max[i] = quad_max(page_max[i]);
        if (t == 0) sRed[cg * BLOCK_M + my_row[i]] = page_max[i];
      }
      __syncthreads();
      float alpha[2], base[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float m = row_max[i];
#pragma unroll
        for (int c = 0; c < S::kColGroups; ++c) m = fmaxf(m, sRed[c * BLOCK_M + my_row[i]]);
        base[i] = m == -CUDART_INF_F ? 0.f : m;  // a fully masked row so far: exp2(-inf) = 0
        alpha[i] = exp2f(row_max[i] - base[i]);
        row_max[i] = m;
      }

      // P = exp2(S - max) into shared memory (bf16/fp16) for the P V product.
      float page_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < S::kKeyTiles; ++n)
        store_prob_tile<Elem>(sP, S::kPRowBytes, my_row, (cg * S::kKeysPerWarp + n * kMmaN) / kChunkElems,
                              t, s[n][0], s[n][1], s[n][2], s[n][3], base, page_sum);
#pragma unroll
      for (int i = 0; i < 2; ++i) row_sum[i] = row_sum[i] * alpha[i] + page_sum[i];
#pragma unroll
      for (int n = 0; n < S::kOutTiles; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
      __syncthreads();  // P complete

      // O += P V, V = the first 512 columns of the page.
#pragma unroll 1
      for (int kk = 0; kk < kPageSize / kMmaK; ++kk) {
        uint32_t a[4];
        ldsm_x4(p_base + swizzled(a_row, kk * 2 + a_chunk, S::kPRowBytes), a);
#pragma unroll
        for (int j = 0; j < S::kOutTiles / 2; ++j) {
          uint32_t bv[4];
          const int chunk = (cg * S::kColsPerWarp + j * 16) / kChunkElems + v_chunk;
          ldsm_x4_trans(kbuf + swizzled(kk * kMmaK + v_row, chunk, kRowBytes), bv);
          mma_16x8x16<Elem>(o[2 * j], a, bv[0], bv[1]);
          mma_16x8x16<Elem>(o[2 * j + 1], a, bv[2], bv[3]);
        }
      }
      __syncthreads();  // every read of this buffer and of P is done: refill it
      if (pg + 2 < pe) load_page<Elem, RowSwizzled>(p, sK + buf * kPageBytes, b, hk, pg + 2, seqlen);
      cute::cp_async_fence();
    }

    // ---- epilogue: finish the row sums, normalise, write final output or a partial ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = quad_sum(row_sum[i]);
      if (t == 0) sRed[cg * BLOCK_M + my_row[i]] = sum;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = 0.f;
#pragma unroll
      for (int c = 0; c < S::kColGroups; ++c) l += sRed[c * BLOCK_M + my_row[i]];
      write_row<Elem>(p, b, hk, m_block * BLOCK_M + my_row[i], i, o, row_max[i], l,
                      cg * S::kColsPerWarp + 2 * t, cg == 0 && t == 0, seg.num_splits, seg.split_slot);
    }
  }
}

}  // namespace kvpager
