// Global -> shared loads of the decode kernels (cp.async, 16 bytes a thread a copy), for either
// shared-memory layout of a [rows x 576] tile:
//   RowSwizzled   : rows of 1152 B, 16-byte chunks XORed with (row % 8)      (mma.sync kernel)
//   BlockSwizzled : 9 blocks of [rows x 64] halfs, wgmma's 128-byte swizzle   (wgmma kernel)
#pragma once
#include "config.h"
#include "params.h"
#include "tile_ops.h"
#include "wgmma_ops.h"

namespace kvpager {

struct RowSwizzled {
  __device__ __forceinline__ static uint32_t offset(int /*rows*/, int row, int chunk) {
    return swizzled(row, chunk, kRowBytes);
  }
};

struct BlockSwizzled {
  __device__ __forceinline__ static uint32_t offset(int rows, int row, int chunk) {
    return blocked_offset(rows, row, chunk);
  }
};

// The BLOCK_M query rows of row block m_block for (sequence b, kv head hk); rows past the last
// query are zero-filled.
template <typename Elem, int BLOCK_M, typename Layout>
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, char* sQ, int b, int hk,
                                            int m_block) {
  const Elem* q = static_cast<const Elem*>(p.q);
  for (int c = threadIdx.x; c < BLOCK_M * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int mrow = m_block * BLOCK_M + r;
    const bool valid = mrow < p.rows;
    const int s = valid ? mrow / p.groups : 0;
    const int g = valid ? mrow % p.groups : 0;
    const Elem* src = q + b * p.q_batch_stride + s * p.q_seq_stride +
                      int64_t(hk * p.groups + g) * p.q_head_stride + chunk * kChunkElems;
    cp_async_16(sQ + Layout::offset(BLOCK_M, r, chunk), src, valid);
  }
}

// One page into a buffer. Rows past the sequence end are zero-filled, never read: whatever the
// pool holds there (NaN included) cannot reach P V as 0 * NaN.
template <typename Elem, typename Layout>
__device__ __forceinline__ void load_page(const DecodeParams& p, char* sK, int b, int hk,
                                          int page_idx, int seqlen) {
  const int page_id = p.block_table[int64_t(b) * p.block_table_stride + page_idx];
#ifdef KVPAGER_DEBUG
  assert(page_id >= 0 && page_id < p.num_pages);
#endif
  const Elem* base = static_cast<const Elem*>(p.k_cache) + int64_t(page_id) * p.k_page_stride +
                     int64_t(hk) * p.k_head_stride;
  const int valid_rows = seqlen - page_idx * kPageSize;
#pragma unroll
  for (int i = 0; i < kPageSize * kChunksPerRow / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const bool valid = r < valid_rows;
    const Elem* src = base + (valid ? r : 0) * p.k_token_stride + chunk * kChunkElems;
    cp_async_16(sK + Layout::offset(kPageSize, r, chunk), src, valid);
  }
}

// The start of a sequence segment: its Q tile, then its first two pages (pages [ps, pe)), as
// three cp.async groups (empty ones where a page does not exist), so the page loop can always
// wait for "all but the newest group".
template <typename Elem, int BLOCK_M, typename Layout>
__device__ __forceinline__ void load_segment_start(const DecodeParams& p, char* sQ, char* sK, int b,
                                                   int hk, int m_block, int ps, int pe,
                                                   int seqlen) {
  load_q_tile<Elem, BLOCK_M, Layout>(p, sQ, b, hk, m_block);
  cute::cp_async_fence();
  if (ps < pe) load_page<Elem, Layout>(p, sK, b, hk, ps, seqlen);
  cute::cp_async_fence();
  if (ps + 1 < pe) load_page<Elem, Layout>(p, sK + kPageBytes, b, hk, ps + 1, seqlen);
  cute::cp_async_fence();
}

}  // namespace kvpager
