// The warp-specialized FP8 decode for 16-row blocks (rows = s_q * h_q / h_kv <= 16: memory-bound,
// where the 656-byte rows pay most). Roles and shared memory: Fp8WsTraits (traits.h).
//
// Why this shape: the split-K mma.sync kernel (decode_fp8_kernel.cuh) spent ~8,300 warp
// instructions a page (ncu, H200) and every warp went through dequantize -> S -> softmax -> PV in
// lockstep, so its loads, ALU work and MMAs never overlapped. Here
//  - the two converter warpgroups share every page: each thread loads its 8 latent chunks of 16
//    bytes straight from global memory into registers two pages ahead (the scales go to shared
//    memory by cp.async), and once the page's buffer is free dequantizes them (fp8_dequant.cuh) into
//    the bf16 page in the wgmma block layout; the RoPE columns (bf16 already) go by cp.async.
//    Then `full`. One converter thread also bulk-prefetches into L2 the page whose register loads
//    come next (KVPAGER_FP8_PREFETCH pages on), so that they hit L2: a page late from memory used
//    to stall both sides (docs/fp8-cache.md, session s11).
//  - the consumer warpgroup runs wgmma with the operands swapped: S^T = K Q^T (m64 = the page's 64
//    keys, n16 = the query rows) and O^T += V^T P^T (m64 = 64 latent features, eight blocks), so
//    the 16 rows are no wgmma padding and each page costs 68 wgmma instructions. Online softmax
//    runs over S^T's columns; P goes to shared memory as the K-major B operand of the PV product.
//    S^T of the next page is issued behind the PV product; when both are done, `empty` hands the
//    buffer back to the converters.
// Rows past the sequence end are written as zeros (latent and RoPE), so NaN in unused slots of the
// pool never reaches an MMA; their scores are masked.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cutlass/arch/barrier.h>

#include "config.h"
#include "epilogue.cuh"
#include "fp8_dequant.cuh"
#include "params.h"
#include "tile_scheduler.cuh"
#include "tile_ops.h"
#include "traits.h"
#include "wgmma_ops.h"

namespace kvpager {

namespace fp8ws {

using Bf16 = __nv_bfloat16;
using T = Fp8WsTraits;
using Plan = T::SharedMemoryPlan;
using PageBarrier = cutlass::arch::ClusterBarrier;
using NamedBarrier = cutlass::arch::NamedBarrier;
using ScoreMma = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
using OutMma = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::MN, cute::SM90::GMMA::Major::K>;

// Timeline of one CTA (a -DKVPAGER_TRACE build; scripts/fp8_trace.py reads it): clock64() at named
// points of each of its first kTracePages pages, for the consumer and for converter warps 0 and 7.
// Consumer: 0 full(n) waited, 1 S^T(n) done, 2 softmax(n) done (PV issued next), 3 PV(n) done,
// 4 page maxima exchanged, 5 P stored and fenced. Converter: 0 data of page n in registers,
// 1 empty waited, 2 full arrived, 4 page n + 2's L2 prefetch and address done, 5 its latent
// register loads issued, 3 its scale and RoPE copies issued.
constexpr uint32_t kTraceNone = 0xffffffffu;  // no page: FP8WS_TRACE records nothing
#ifdef KVPAGER_TRACE
constexpr int kTracePages = 48;
__device__ unsigned long long g_trace[3][kTracePages][6];
__device__ __forceinline__ bool traced_cta() { return blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == gridDim.z / 2; }
#define FP8WS_TRACE(role, n, ev)                                                                  \
  do {                                                                                            \
    if (traced_cta() && threadIdx.x == ((role) == 0 ? 0 : 128 + ((role) - 1) * 224) && (n) < kTracePages) \
      g_trace[role][n][ev] = clock64();                                                           \
  } while (0)
#else
#define FP8WS_TRACE(role, n, ev) \
  do {                           \
  } while (0)
#endif

__device__ __forceinline__ void consumer_sync() {
  NamedBarrier::arrive_and_wait(T::kWarpgroupThreads, T::kConsumerSync);
}

// ---- converter ---------------------------------------------------------------------------------

// The CTA's pages in order, across the segments of its part (consumer and converters walk the
// same sequence; page n of it goes through buffer n % 2). `id` is the page's block-table entry,
// read when the cursor arrives, a page-time before anyone needs it.
struct PageCursor {
  TileScheduler sched;
  Segment seg;
  int page, id;
  bool more;

  __device__ __forceinline__ PageCursor(const DecodeParams& p, int part) : sched(p, part), page(0), id(0), more(false) {
    for (; sched.valid(); sched.next()) {
      seg = sched.segment();
      page = seg.first_page;
      if (page < seg.end_page) {
        more = true;
        id = seg.block_table[page];
        return;
      }
    }
  }
  __device__ __forceinline__ void next() {
    if (++page < seg.end_page) {
      id = seg.block_table[page];
      return;
    }
    for (sched.next(); sched.valid(); sched.next()) {
      seg = sched.segment();
      page = seg.first_page;
      if (page < seg.end_page) {
        id = seg.block_table[page];
        return;
      }
    }
    more = false;
  }
};

// Prefetch [ptr, ptr + bytes) into L2 (16-byte aligned, a multiple of 16 bytes), no completion to wait for.
__device__ __forceinline__ void prefetch_l2_bulk(const void* ptr, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}

// Where a page's rows start and how many hold tokens: resolved when its loads are issued (two pages
// ahead) and kept with them, so that no block-table read sits on the conversion's critical path.
struct PageRef {
  const uint8_t* base;
  int valid_rows;
  __device__ __forceinline__ PageRef(const DecodeParams& p, const PageCursor& at, int hk)
      : base(static_cast<const uint8_t*>(p.k_cache) + int64_t(at.id) * p.k_page_stride +
             int64_t(hk) * p.k_head_stride),
        valid_rows(at.seg.valid_rows(at.page)) {}
};

// Converter thread ct (0-255) owns latent rows 8 (ct / 32) .. + 7, 16 bytes (one scale group) at
// lane * 16 of each. Lane l handles row (j + l / 4) % 8 of them at step j, so that one store
// instruction of the warp hits 8 different rows (8 different swizzles: conflict-free).
__device__ __forceinline__ int latent_row(int warp, int lane, int j) {
  return warp * T::kRowsPerWarp + ((j + lane / 4) % T::kRowsPerWarp);
}

// A page's latent bytes for this thread, loaded two pages ahead of their conversion. Rows past the
// sequence end read as zeros.
__device__ __forceinline__ void load_latent(const DecodeParams& p, const PageRef& ref, int ct,
                                            uint4 (&latent)[T::kRowsPerWarp]) {
  const int warp = ct / 32, lane = ct % 32;
#pragma unroll
  for (int j = 0; j < T::kRowsPerWarp; ++j) {
    const int r = latent_row(warp, lane, j);
    latent[j] = r < ref.valid_rows ? __ldcs(reinterpret_cast<const uint4*>(ref.base + int64_t(r) * p.k_token_stride +
                                                                           lane * kChunkBytes))
                                   : make_uint4(0, 0, 0, 0);
  }
}

// The same page's side bytes, by cp.async, zero-filled past the end: the scales of the warp's rows
// into `scales` (lanes 0-7, one 16-byte chunk a row; scale 0 dequantizes to 0, never NaN), and this
// thread's 2 of the page's 512 RoPE chunks into the RoPE tile `rope`; one commit group.
__device__ __forceinline__ void load_scales_and_rope(const DecodeParams& p, const PageRef& ref, int ct,
                                                     float (*scales)[4], char* rope) {
  const int warp = ct / 32, lane = ct % 32;
  if (lane < T::kRowsPerWarp) {  // the scales of this warp's own rows: no other warp reads them
    const int r = warp * T::kRowsPerWarp + lane;
    const bool valid = r < ref.valid_rows;
    cp_async_16(scales[r], ref.base + int64_t(valid ? r : 0) * p.k_token_stride + kFp8ScalesOffset, valid);
  }
#pragma unroll
  for (int j = 0; j < T::kRopeChunks; ++j) {
    const int c = ct + j * T::kConverterThreads, r = c / 8;
    const bool valid = r < ref.valid_rows;
    cp_async_16(rope + r * kBlockRowBytes + (((c % 8) ^ (r & 7)) * kChunkBytes),
                ref.base + int64_t(valid ? r : 0) * p.k_token_stride + kFp8RopeOffset + (c % 8) * kChunkBytes, valid);
  }
  cute::cp_async_fence();
}

// This thread's latent chunks of a page, dequantized row by row (scale[j]: row latent_row(j)'s group
// scale) into buffer `tiles` (tiles 0-7 of 64 x 64 bf16, 128-byte swizzle).
template <bool kFolded>
__device__ __forceinline__ void store_latent(char* tiles, const uint4 (&latent)[T::kRowsPerWarp],
                                             const float (&scale)[T::kRowsPerWarp], int warp, int lane) {
  const int tile = lane / 4, chunk0 = (lane % 4) * 2;  // this lane's 16 features: tile, first 16-byte chunk
#pragma unroll
  for (int j = 0; j < T::kRowsPerWarp; ++j) {
    const int r = latent_row(warp, lane, j);
    const uint32_t x[4] = {latent[j].x, latent[j].y, latent[j].z, latent[j].w};
    uint32_t w[8];
    dequant_16<kFolded>(x, scale[j], w);
    char* row = tiles + tile * kPageTileBytes + r * kBlockRowBytes;
    *reinterpret_cast<uint4*>(row + ((chunk0 ^ (r & 7)) * kChunkBytes)) = make_uint4(w[0], w[1], w[2], w[3]);
    *reinterpret_cast<uint4*>(row + (((chunk0 + 1) ^ (r & 7)) * kChunkBytes)) = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// Page n (its latent bytes in registers, its scales and RoPE landing in slot n % 4) into buffer
// n % 2, once the consumer's PV product of page n - 2 is done with it; each row is stored as soon
// as it is converted. (Dequantizing before that wait was measured slower here: docs/fp8-cache.md.) The loads issued
// after it (page n + 2) reuse slot (n - 2) % 4: free, since the consumer's S^T of page n - 2
// completed before it issued the PV product that releases buffer n % 2 (and pages 2 and 3 get
// fresh slots; the first two waits do not wait).
__device__ __forceinline__ void convert_page(Plan& s, const DecodeParams& p, int ct, uint32_t n,
                                             const uint4 (&latent)[T::kRowsPerWarp]) {
  const int warp = ct / 32, lane = ct % 32, buf = n % 2;
  cute::cp_async_wait<1>();  // all but page n + 1's copies: this lane's scales and RoPE of page n
  __syncwarp();              // ... and its warp's scales (a warp reads only those of its own rows)
  const float(*scales)[4] = s.scales[n % T::kScaleSlots];
  float scale[T::kRowsPerWarp];
  bool folds = true;
#pragma unroll
  for (int j = 0; j < T::kRowsPerWarp; ++j) scale[j] = scales[latent_row(warp, lane, j)][lane * kChunkBytes / kFp8GroupSize];
#pragma unroll
  for (int j = 0; j < T::kRowsPerWarp; ++j) folds &= fp8_scale_folds(scale[j]);
#ifdef KVPAGER_TRACE
  if (traced_cta()) {  // wait for this thread's latent bytes here: the timeline separates data from buffer waits
    uint32_t all = 0;
#pragma unroll
    for (int j = 0; j < T::kRowsPerWarp; ++j) all ^= latent[j].x ^ latent[j].y ^ latent[j].z ^ latent[j].w;
    asm volatile("" ::"r"(all));
  }
#endif
  FP8WS_TRACE(1 + warp / 7, n, 0);
  PageBarrier::wait(&s.empty[buf], ((n / 2) & 1) ^ 1);
  FP8WS_TRACE(1 + warp / 7, n, 1);
  if (__all_sync(0xffffffffu, folds))
    store_latent<true>(s.page[buf][0], latent, scale, warp, lane);
  else
    store_latent<false>(s.page[buf][0], latent, scale, warp, lane);
  fence_async_proxy();  // generic-proxy stores and the landed RoPE copies -> visible to wgmma
  PageBarrier::arrive(&s.full[buf]);
  FP8WS_TRACE(1 + warp / 7, n, 2);
}

// Both converter warpgroups together, every page, with the next two pages' latent bytes in flight
// in registers (two register sets, hence the loop unrolled by two). Scale slots: pages n, n + 1 and
// n + 2 are staged at once (a lane issues page n + 2's copies right after converting page n), in
// 4 slots; a warp only ever touches its own rows of them.
__device__ __forceinline__ void convert(Plan& s, const DecodeParams& p, int part, int hk) {
  const int ct = threadIdx.x - T::kWarpgroupThreads;
  PageCursor ahead(p, part);
  uint4 latent0[T::kRowsPerWarp], latent1[T::kRowsPerWarp];
  uint32_t loaded = 0;
  // L2 prefetch (one thread, one bulk prefetch a page): while page L is loaded into registers, page
  // L + fp8_prefetch_pages goes into L2, so that its own loads hit L2 (0: off).
  const int distance = ct == 0 ? p.fp8_prefetch_pages : 0;
  PageCursor far = ahead;
  for (int i = 0; i < distance && far.more; ++i) far.next();
  // n: the page just converted (trace stamps 4 and 5 split its "issue" span), or kTraceNone.
  auto load_next = [&](uint4 (&latent)[T::kRowsPerWarp], uint32_t n) {
    if (distance > 0 && far.more) {
      const PageRef page(p, far, hk);
      prefetch_l2_bulk(page.base, uint32_t((kPageSize - 1) * p.k_token_stride + kFp8TokenBytes));
      far.next();
    }
    if (!ahead.more) {
      cute::cp_async_fence();  // an empty group, so convert_page's wait<1> always leaves page n + 1's
      return;
    }
    const PageRef ref(p, ahead, hk);
    FP8WS_TRACE(1 + ct / 224, n, 4);
    load_latent(p, ref, ct, latent);
    FP8WS_TRACE(1 + ct / 224, n, 5);
    load_scales_and_rope(p, ref, ct, s.scales[loaded % T::kScaleSlots], s.rope[loaded % T::kRopeSlots]);
    ++loaded;
    ahead.next();
  };
  load_next(latent0, kTraceNone);
  load_next(latent1, kTraceNone);
  for (uint32_t n = 0; n < loaded; n += 2) {
    convert_page(s, p, ct, n, latent0);
    load_next(latent0, n);
    FP8WS_TRACE(1 + ct / 224, n, 3);
    if (n + 1 == loaded) break;
    convert_page(s, p, ct, n + 1, latent1);
    load_next(latent1, n + 1);
    FP8WS_TRACE(1 + ct / 224, n + 1, 3);
  }
}

// ---- consumer ----------------------------------------------------------------------------------

// Q rows of row block m_block into the 9 Q tiles (rows past the last query are zeros).
__device__ __forceinline__ void load_q(Plan& s, const DecodeParams& p, int b, int hk, int m_block, int tid) {
  const Bf16* q = static_cast<const Bf16*>(p.q);
  for (int i = tid; i < T::kBlockM * kChunksPerRow; i += T::kWarpgroupThreads) {
    const int r = i / kChunksPerRow, chunk = i % kChunksPerRow, mrow = m_block * T::kBlockM + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (mrow < p.rows) {
      const int sq = mrow / p.groups, head = hk * p.groups + mrow % p.groups;
      v = *reinterpret_cast<const uint4*>(q + b * p.q_batch_stride + sq * p.q_seq_stride + head * p.q_head_stride +
                                          chunk * kChunkElems);
    }
    *reinterpret_cast<uint4*>(s.q[0] + blocked_offset(T::kBlockM, r, chunk)) = v;
  }
}

// Base descriptors of the consumer's operands; every wgmma steps from them by a constant offset
// (desc_add), which saves ~10 instructions per wgmma over building each descriptor.
struct Descriptors {
  uint64_t page_k;  // page buffer 0 as K-major A (S^T = K Q^T); buffer 1 is kBufferBytes further
  uint64_t page_v;  // page buffer 0 as MN-major A (V^T of O^T += V^T P^T)
  uint64_t rope;    // RoPE slot 0 as K-major A
  uint64_t q, p;    // Q and P as K-major B
  __device__ __forceinline__ explicit Descriptors(Plan& s)
      : page_k(gmma_desc(smem_addr(s.page[0][0]), 16, kAtomBytes)),
        page_v(gmma_desc(smem_addr(s.page[0][0]), kPageTileBytes, kAtomBytes)),
        rope(gmma_desc(smem_addr(s.rope[0]), 16, kAtomBytes)),
        q(gmma_desc(smem_addr(s.q[0]), 16, kAtomBytes)),
        p(gmma_desc(smem_addr(s.p), 16, kAtomBytes)) {}
};
constexpr uint32_t kBufferBytes = sizeof(Plan::page[0]);

// S^T = K Q^T for CTA page n (buffer n % 2), once the converters have written it.
__device__ __forceinline__ void issue_scores(Plan& s, const Descriptors& d, uint32_t n, float (&acc)[T::kScoreRegs]) {
  const int buf = n % kNumPageBuffers;
  PageBarrier::wait(&s.full[buf], (n / kNumPageBuffers) & 1);
  FP8WS_TRACE(0, n, 0);
  fence_accumulators(acc);
  cute::warpgroup_arrive();  // after the wait loop (divergent to ptxas): else every wgmma gets serialized
  const uint64_t page = desc_add(d.page_k, buf * kBufferBytes);
  const uint64_t rope = desc_add(d.rope, (n % T::kRopeSlots) * kPageTileBytes);
#pragma unroll
  for (int tile = 0; tile < kColBlocks; ++tile)
#pragma unroll
    for (int kk = 0; kk < kBlockCols / kMmaK; ++kk)
      gmma<ScoreMma>(tile < T::kLatentTiles ? desc_add(page, tile * kPageTileBytes + kk * 32) : desc_add(rope, kk * 32),
                     desc_add(d.q, tile * T::kBlockM * kBlockRowBytes + kk * 32), acc, tile > 0 || kk > 0);
  cute::warpgroup_commit_batch();
}

// O^T += V^T P^T over buffer buf (V^T: the page's latent tiles as MN-major A).
__device__ __forceinline__ void issue_pv(const Descriptors& d, int buf, float (&o)[T::kOutBlocks][T::kScoreRegs]) {
#pragma unroll
  for (int m = 0; m < T::kOutBlocks; ++m) fence_accumulators(o[m]);
  cute::warpgroup_arrive();
  const uint64_t page = desc_add(d.page_v, buf * kBufferBytes);
#pragma unroll
  for (int m = 0; m < T::kOutBlocks; ++m)
#pragma unroll
    for (int kk = 0; kk < kPageSize / kMmaK; ++kk)
      gmma<OutMma>(desc_add(page, m * kPageTileBytes + kk * kMmaK * kBlockRowBytes), desc_add(d.p, kk * 32), o[m], true);
  cute::warpgroup_commit_batch();
}

// O^T += V^T P^T for CTA page n, then (kNext) S^T of page n + 1, which overlaps it; the buffer goes
// back to the converters as soon as the PV product is done (wgmma groups complete in order). A template, so that no branch separates a wgmma from its wait
// (ptxas serializes every wgmma of the kernel otherwise).
template <bool kNext>
__device__ __forceinline__ void finish_page(Plan& s, const Descriptors& d, uint32_t n,
                                            float (&o)[T::kOutBlocks][T::kScoreRegs], float (&acc)[T::kScoreRegs]) {
  const int buf = n % kNumPageBuffers;
  issue_pv(d, buf, o);
  if constexpr (kNext) {
    issue_scores(s, d, n + 1, acc);
    cute::warpgroup_wait<1>();  // the PV product is done with buffer n % 2: release it early
    PageBarrier::arrive(&s.empty[buf]);
    FP8WS_TRACE(0, n, 3);
    cute::warpgroup_wait<0>();
    FP8WS_TRACE(0, n + 1, 1);
  } else {
    cute::warpgroup_wait<0>();
    PageBarrier::arrive(&s.empty[buf]);
    FP8WS_TRACE(0, n, 3);
  }
  fence_accumulators(acc);
#pragma unroll
  for (int m = 0; m < T::kOutBlocks; ++m) fence_accumulators(o[m]);
}

// Accumulator register i of a lane (wgmma D, m64nN): row (here: key or feature) 16 warp + g +
// 8 ((i >> 1) & 1), column (query row) 8 (i >> 2) + 2t + (i & 1). A lane touches 4 columns;
// col_slot(i) numbers them 0..3.
__device__ __forceinline__ int col_slot(int i) { return (i >> 2) * 2 + (i & 1); }

// The segment's output: O^T / row sums -> out_stage (transposed), then whole rows to global memory.
__device__ __forceinline__ void store_output(Plan& s, const DecodeParams& p, const Segment& seg, int hk, int m_block,
                                             int tid, const float (&o)[T::kOutBlocks][T::kScoreRegs],
                                             const int (&cols)[4], const float (&row_max)[4],
                                             const float (&row_sum)[4]) {
  const int warp = tid / 32, g = (tid % 32) / 4;
  const bool split = seg.num_splits > 1;
  float total[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float v = row_sum[c];
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    total[c] = v;
  }
  consumer_sync();  // the last page's readers of row_exchange are done
  if (g == 0)
#pragma unroll
    for (int c = 0; c < 4; ++c) s.row_exchange[warp][cols[c]] = total[c];
  consumer_sync();
  float inv[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) l += s.row_exchange[w][cols[c]];
    const bool empty = !(l > 0.f);
    inv[c] = empty ? 0.f : 1.f / l;
    const int mrow = m_block * T::kBlockM + cols[c];
    if (warp == 0 && g == 0 && mrow < p.rows) {
      const float lse = empty ? (split ? -CUDART_INF_F : CUDART_INF_F) : (row_max[c] + __log2f(l)) * 0.69314718055994531f;
      if (split) {
        p.lse_accum[(int64_t(seg.split_slot) * p.h_kv + hk) * p.rows + mrow] = lse;
      } else {
        const int sq = mrow / p.groups, head = hk * p.groups + mrow % p.groups;
        p.lse[(int64_t(seg.b) * p.h_q + head) * p.s_q + sq] = lse;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < T::kOutBlocks; ++m)
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i)
      s.out_stage[cols[col_slot(i)]][m * kBlockCols + warp * 16 + g + 8 * ((i >> 1) & 1)] = o[m][i] * inv[col_slot(i)];
  consumer_sync();
  const int valid_rows = min(T::kBlockM, p.rows - m_block * T::kBlockM);
  constexpr int kChunks = kHeadDimV / kChunkElems;  // 64 chunks of 8 columns a row
  for (int i = tid; i < valid_rows * kChunks; i += T::kWarpgroupThreads) {
    const int r = i / kChunks, col = (i % kChunks) * kChunkElems, mrow = m_block * T::kBlockM + r;
    const float4 a = *reinterpret_cast<const float4*>(&s.out_stage[r][col]);
    const float4 b = *reinterpret_cast<const float4*>(&s.out_stage[r][col + 4]);
    if (split) {
      float* acc = p.out_accum + ((int64_t(seg.split_slot) * p.h_kv + hk) * p.rows + mrow) * kHeadDimV + col;
      *reinterpret_cast<float4*>(acc) = a;
      *reinterpret_cast<float4*>(acc + 4) = b;
    } else {
      const int sq = mrow / p.groups, head = hk * p.groups + mrow % p.groups;
      Bf16* dst = static_cast<Bf16*>(p.out) + (int64_t(seg.b * p.s_q + sq) * p.h_q + head) * kHeadDimV + col;
      *reinterpret_cast<uint4*>(dst) = make_uint4(ElemOps<Bf16>::pack(a.x, a.y), ElemOps<Bf16>::pack(a.z, a.w),
                                                  ElemOps<Bf16>::pack(b.x, b.y), ElemOps<Bf16>::pack(b.z, b.w));
    }
  }
}

__device__ __forceinline__ void consume(Plan& s, const DecodeParams& p, int part, int hk, int m_block) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  int cols[4];  // this lane's query rows (S^T / O^T columns), by col_slot
#pragma unroll
  for (int c = 0; c < 4; ++c) cols[c] = 8 * (c >> 1) + 2 * t + (c & 1);
  uint32_t n = 0;  // CTA page counter (the converters count the same way)
  const Descriptors d(s);

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int ps = seg.first_page, pe = seg.end_page;
    load_q(s, p, seg.b, hk, m_block, tid);
    fence_async_proxy();
    consumer_sync();

    int limit[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) limit[c] = row_limit(p, seg.seqlen, m_block * T::kBlockM + cols[c]);
    const int min_limit = row_limit(p, seg.seqlen, m_block * T::kBlockM);
    float o[T::kOutBlocks][T::kScoreRegs];
#pragma unroll
    for (int m = 0; m < T::kOutBlocks; ++m)
#pragma unroll
      for (int i = 0; i < T::kScoreRegs; ++i) o[m][i] = 0.f;
    float row_max[4], row_sum[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) row_max[c] = -CUDART_INF_F, row_sum[c] = 0.f;

    float acc[T::kScoreRegs];
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i) acc[i] = 0.f;
    if (ps < pe) {
      issue_scores(s, d, n, acc);
      cute::warpgroup_wait<0>();
      FP8WS_TRACE(0, n, 1);
      fence_accumulators(acc);
    }
    for (int page = ps; page < pe; ++page, ++n) {
      // Online softmax over the page's keys (S^T rows), per query row (column).
      const bool mask = (page + 1) * kPageSize > min_limit;
      float page_max[4] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
      for (int i = 0; i < T::kScoreRegs; ++i) {
        const int key = page * kPageSize + warp * 16 + g + 8 * ((i >> 1) & 1);
        float v = acc[i] * p.scale_log2;
        if (mask && key >= limit[col_slot(i)]) v = -CUDART_INF_F;
        acc[i] = v;
        page_max[col_slot(i)] = fmaxf(page_max[col_slot(i)], v);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        page_max[c] = fmaxf(page_max[c], __shfl_xor_sync(0xffffffffu, page_max[c], 4));
        page_max[c] = fmaxf(page_max[c], __shfl_xor_sync(0xffffffffu, page_max[c], 8));
        page_max[c] = fmaxf(page_max[c], __shfl_xor_sync(0xffffffffu, page_max[c], 16));
      }
      if (g == 0)
#pragma unroll
        for (int c = 0; c < 4; ++c) s.row_exchange[warp][cols[c]] = page_max[c];
      consumer_sync();
      FP8WS_TRACE(0, n, 4);
      float base[4], alpha[4], sum[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float m = row_max[c];
#pragma unroll
        for (int w = 0; w < 4; ++w) m = fmaxf(m, s.row_exchange[w][cols[c]]);
        base[c] = m == -CUDART_INF_F ? 0.f : m;
        alpha[c] = exp2f(row_max[c] - base[c]);
        row_max[c] = m;
        sum[c] = 0.f;
      }
      // P -> shared memory as [16 rows][64 keys] bf16, 128-byte swizzle (K-major B of O^T += V^T P^T).
#pragma unroll
      for (int i = 0; i < T::kScoreRegs; ++i) {
        const float e = exp2f(acc[i] - base[col_slot(i)]);
        sum[col_slot(i)] += e;
        const int key = warp * 16 + g + 8 * ((i >> 1) & 1), row = cols[col_slot(i)];
        *reinterpret_cast<Bf16*>(s.p + row * kBlockRowBytes + (((key / 8) ^ (row & 7)) * kChunkBytes) + (key % 8) * 2) =
            __float2bfloat16_rn(e);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) row_sum[c] = row_sum[c] * alpha[c] + sum[c];
#pragma unroll
      for (int m = 0; m < T::kOutBlocks; ++m)
#pragma unroll
        for (int i = 0; i < T::kScoreRegs; ++i) o[m][i] *= alpha[col_slot(i)];
      fence_async_proxy();
      FP8WS_TRACE(0, n, 5);
      consumer_sync();  // P complete (and the row maxima read: row_exchange may be rewritten)
      FP8WS_TRACE(0, n, 2);

      if (page + 1 < pe)
        finish_page<true>(s, d, n, o, acc);
      else
        finish_page<false>(s, d, n, o, acc);
    }
    if (sched.last()) allow_dependent_launch();
    store_output(s, p, seg, hk, m_block, tid, o, cols, row_max, row_sum);
  }
}

}  // namespace fp8ws

__global__ void __launch_bounds__(Fp8WsTraits::kThreads, 1) mla_decode_fp8_ws_kernel(const __grid_constant__ DecodeParams p) {
  using T = Fp8WsTraits;
  extern __shared__ char smem_raw[];
  auto& s = aligned_plan<T::SharedMemoryPlan>(smem_raw);
  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int wg = threadIdx.x / T::kWarpgroupThreads;
  if (threadIdx.x == 0) {
    for (int b = 0; b < kNumPageBuffers; ++b) {
      fp8ws::PageBarrier::init(&s.full[b], T::kConverterThreads);
      fp8ws::PageBarrier::init(&s.empty[b], T::kWarpgroupThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (wg == 0)
    fp8ws::consume(s, p, part, hk, m_block);
  else
    fp8ws::convert(s, p, part, hk);
}

#ifdef KVPAGER_TRACE
// Prints the traced CTA's timeline; a kernel of its own, launched after the decode, because a printf
// inside the decode kernel makes ptxas serialize its wgmma.
__global__ void fp8_ws_trace_dump() {
  const unsigned long long t0 = fp8ws::g_trace[0][0][0];
  for (int role = 0; role < 3; ++role)
    for (int n = 0; n < fp8ws::kTracePages; ++n) {
      const unsigned long long* e = fp8ws::g_trace[role][n];
      printf("FP8TRACE role %d page %d %lld %lld %lld %lld %lld %lld\n", role, n, (long long)(e[0] - t0),
             (long long)(e[1] - t0), (long long)(e[2] - t0), (long long)(e[3] - t0), (long long)(e[4] - t0),
             (long long)(e[5] - t0));
    }
}
#endif

}  // namespace kvpager
