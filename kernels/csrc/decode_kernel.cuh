// The split-KV MLA decode kernel on mma.sync, for 16- and 32-row blocks (rows = s_q * h_q / h_kv
// <= 32: memory-bound). One CTA per (part of the batch's work, kv head, block of query rows). For
// every sequence segment in its part it streams the segment's 64-token latent pages through two
// shared-memory buffers (cp.async, zero-filled past the sequence end) and runs online softmax with
// tensor-core MMAs: S = Q K^T over 576 columns, O += P V over the first 512 columns of the same
// page. Unsplit sequences write the final output; split ones write fp32 partials + lse for the
// combine kernel.
//
// Warp roles: 8 warps = RowGroups x ColGroups (MmaSyncTraits). A warp owns 16 query rows, a slice
// of the page's keys for S, and a slice of O's 512 columns, whose fp32 accumulator lives in its
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
#include "traits.h"

namespace kvpager {

template <typename Elem, int BLOCK_M>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_kernel(const __grid_constant__ DecodeParams p) {
  using S = MmaSyncTraits<BLOCK_M>;
  extern __shared__ __align__(1024) char smem[];
  auto& plan = *reinterpret_cast<typename S::SharedMemoryPlan*>(smem);
  char* sQ = plan.q;
  char* sK = plan.page[0];
  char* sP = plan.p;

  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = warp / S::kColGroups, cg = warp % S::kColGroups;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: rows g, g+8; cols 2t, 2t+1

  const uint32_t q_base = smem_addr(sQ), k_base = smem_addr(sK), p_base = smem_addr(sP);
  // ldmatrix lane addressing (see the fragment layouts of mma.m16n8k16):
  const int a_row = rg * kMmaM + (lane % 16);  // A operand (Q, P): rows 0-15, chunk +0/+1
  const int a_chunk = lane / 16;
  const int kb_row = cg * S::kKeysPerWarp + (lane % 8) + (lane / 16) * 8;  // B of S: key rows
  const int kb_chunk = (lane / 8) % 2;
  const int v_row = (lane % 8) + ((lane / 8) % 2) * 8;  // B of PV (transposed): key rows
  const int v_chunk = lane / 16;
  const int my_row[2] = {rg * kMmaM + g, rg * kMmaM + g + 8};  // local rows of this lane's values

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int b = seg.b, seqlen = seg.seqlen, ps = seg.first_page, pe = seg.end_page;

    cute::cp_async_wait<0>();
    __syncthreads();  // the previous segment is done with every buffer
    load_segment_start<Elem, BLOCK_M, RowSwizzled>(p, sQ, sK, b, hk, m_block, ps, pe, seqlen);

    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_limit(p, seqlen, m_block * BLOCK_M + my_row[i]);
    const int min_limit = row_limit(p, seqlen, m_block * BLOCK_M);  // the block's first row sees the fewest keys

    float o[S::kOutTiles * 4];
#pragma unroll
    for (int n = 0; n < S::kOutTiles * 4; ++n) o[n] = 0.f;
    OnlineSoftmax sm;
    sm.reset();

    for (int pg = ps; pg < pe; ++pg) {
      cute::cp_async_wait<1>();
      __syncthreads();  // page pg (and Q) landed for every thread's copies
      const int buf = (pg - ps) & 1;
      const uint32_t kbuf = k_base + buf * kPageBytes;

      // S = Q K^T for this warp's rows and keys.
      float s[S::kKeyTiles * 4];
#pragma unroll
      for (int n = 0; n < S::kKeyTiles * 4; ++n) s[n] = 0.f;
#pragma unroll 4
      for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
        uint32_t a[4];
        ldsm_x4(q_base + swizzled(a_row, kk * 2 + a_chunk, kRowBytes), a);
        if constexpr (S::kKeyTiles == 1) {
          uint32_t bk[2];
          ldsm_x2(kbuf + swizzled(kb_row, kk * 2 + kb_chunk, kRowBytes), bk);
          mma_16x8x16<Elem>(s, 0, a, bk[0], bk[1]);
        } else {
#pragma unroll
          for (int j = 0; j < S::kKeyTiles / 2; ++j) {
            uint32_t bk[4];
            ldsm_x4(kbuf + swizzled(kb_row + j * 16, kk * 2 + kb_chunk, kRowBytes), bk);
            mma_16x8x16<Elem>(s, 2 * j, a, bk[0], bk[1]);
            mma_16x8x16<Elem>(s, 2 * j + 1, a, bk[2], bk[3]);
          }
        }
      }

      // Scale (masking only pages that reach past some row's limit); row max across the warps.
      float page_max[2], alpha[2], base[2];
      OnlineSoftmax::to_log2(s, p.scale_log2, (pg + 1) * kPageSize > min_limit,
                             pg * kPageSize + cg * S::kKeysPerWarp, t, limit, page_max);
      cta_row_max(plan.row_exchange, cg, S::kColGroups, BLOCK_M, my_row, t, page_max);
      sm.advance(page_max, alpha, base);

      // P = exp2(S - max) into shared memory (bf16/fp16) for the P V product.
      sm.exponentiate(s, base, alpha);
      uint32_t packed[S::kKeyTiles * 2];
      const float one[2] = {1.f, 1.f};
      pack_fragment<Elem>(s, packed, one);
      store_packed(sP, S::kPRowBytes, my_row, cg * S::kKeysPerWarp / kChunkElems, t, packed);
      OnlineSoftmax::rescale(o, alpha);
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
          mma_16x8x16<Elem>(o, 2 * j, a, bv[0], bv[1]);
          mma_16x8x16<Elem>(o, 2 * j + 1, a, bv[2], bv[3]);
        }
      }
      __syncthreads();  // every read of this buffer and of P is done: refill it
      if (pg + 2 < pe) load_page<Elem, RowSwizzled>(p, sK + buf * kPageBytes, b, hk, pg + 2, seqlen);
      cute::cp_async_fence();
    }

    if (sched.last()) allow_dependent_launch();

    // ---- epilogue: finish the row sums, normalise, write final output or a partial ----
    float total[2];
    cta_row_sum(plan.row_exchange, cg, S::kColGroups, BLOCK_M, my_row, t, sm.row_sum, total);
    float(&o_tiles)[S::kOutTiles][4] = reinterpret_cast<float(&)[S::kOutTiles][4]>(o);
#pragma unroll
    for (int i = 0; i < 2; ++i)
      write_row<Elem>(p, b, hk, m_block * BLOCK_M + my_row[i], i, o_tiles, sm.row_max[i], total[i],
                      cg * S::kColsPerWarp + 2 * t, cg == 0 && t == 0, seg.num_splits, seg.split_slot);
  }
}

}  // namespace kvpager
