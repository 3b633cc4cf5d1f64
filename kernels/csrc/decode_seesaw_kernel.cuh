// The seesaw MLA decode kernel, for 64-row blocks (rows = s_q * h_q / h_kv >= 64): compute-bound
// shapes such as DeepSeek's 128 heads. Layout and roles: SeesawTraits (traits.h).
//
// Pages go in pairs (j0, j1) through two buffers. With m the running row max shared through
// shared memory, WG0 holding O_L and S0 = Q K_j0^T, WG1 holding O_R and S1 = Q K_j1^T:
//   WG0: m0 = max(m, rowmax S0), P0 = exp2(S0 - m0), O_L = O_L * exp2(m - m0) + P0 V0L   [P0 in regs]
//   WG1: m1 = max(m0, rowmax S1), P1 = exp2(S1 - m1), sc1 = exp2(m0 - m1),
//        O_R = O_R * exp2(m - m0) * sc1 + P1 V1R                                          [P1 in regs]
//   WG0: P0' = P0 * sc1 -> smem;        WG1: P1 -> smem (buffer 1's rope tile)
//   WG1: O_R += P0' V0R;                WG0: O_L = O_L * sc1 + P1 V1L
// which is online softmax over the pair, exactly. While one warpgroup exponentiates, the other's
// MMAs run; the next pair's S GEMMs are issued at the end of each iteration, tile by tile as the
// TMA copies land. Row sums stay per warpgroup (each in the frame of m) until the epilogue.
//
// Buffer tiles are reloaded by the warpgroup that reads them last, as soon as it is done:
//   buffer 0: tiles 0-3 and 8 by WG0 after O_L += P0 V0L, tiles 4-7 by WG1 after O_R += P0' V0R;
//   buffer 1: tiles 4-7 by WG1 after O_R += P1 V1R, tiles 0-3 and 8 by WG0 after O_L += P1 V1L.
// So WG0's next S0 starts on tiles 0-3, 8 and ends on 4-7; WG1's next S1 starts on 4-7.
//
// Hand-off order (template kOrder, KVPAGER_SEESAW_ORDER): both have WG0 store P0' as soon as sc1
// arrives, while its own O_L += P0 V0L runs, and skip every O rescale whose factors are all 1 in a
// warp (s12). 15, the default since s15, has WG0 wait for O_L += P1 V1L and refill buffer 1 before
// it issues its next S0; 11 (s12-s14) issues S0's first tiles first, kept so the two can be
// compared in one process. docs/kernel-perf.md (s12, s14, s15) has the timelines behind them.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cute/arch/copy_sm90.hpp>

#include "config.h"
#include "epilogue.cuh"
#include "params.h"
#include "seesaw_fp8.cuh"
#include "seesaw_trace.cuh"
#include "softmax.cuh"
#include "tile_loads.cuh"
#include "tile_scheduler.cuh"
#include "tile_ops.h"
#include "tma.cuh"
#include "traits.h"
#include "wgmma_ops.h"

namespace kvpager {

namespace seesaw {

using T = SeesawTraits;
using Plan = T::SharedMemoryPlan;
using NamedBarrier = cutlass::arch::NamedBarrier;

// The producer side of a cross-warpgroup hand-off: bar.arrive (release; the consumer's bar.sync
// acquires). compute-sanitizer's racecheck does not model bar.arrive's ordering, so a
// -DKVPAGER_SYNC_HANDOFFS build makes producers wait too (bar.sync on both sides; no cycle: each
// consumer reaches its sync without waiting on its producer) for racecheck runs.
#ifdef KVPAGER_SYNC_HANDOFFS
constexpr bool kSyncHandoffs = true;
#else
constexpr bool kSyncHandoffs = false;
#endif
__device__ __forceinline__ void handoff(uint32_t barrier) {
  if constexpr (kSyncHandoffs)
    NamedBarrier::arrive_and_wait(T::kThreads, barrier);
  else
    NamedBarrier::arrive(T::kThreads, barrier);
}

// cta_row_sum's barrier on an FP8 cache: the consumers only.
struct ConsumerSync {
  __device__ __forceinline__ static void sync() { NamedBarrier::arrive_and_wait(T::kThreads, T::kConsumersSync); }
};

// Order 15 (s15) on top of 11: WG0 refills buffer 1 before it issues its next S0.
template <int kOrder> constexpr bool kRefillBeforeS0 = kOrder == 15;

// Threads of a seesaw CTA: on an FP8 cache a third warpgroup, the converter, beside the consumers.
template <bool kFp8>
constexpr int kCtaThreads = kFp8 ? T::kFp8Threads : T::kThreads;

// What one thread knows about its place in the CTA and the current segment.
struct Ctx {
  Plan& s;
  const DecodeParams& p;
  const CUtensorMap* map;
  const Fp8PageMaps* fp8_maps;   // FP8 cache (template kFp8), else nullptr
  bool fp8;                      // = fp8_maps != nullptr, a compile-time constant in every kernel
  int wg, lane_in_wg, t_;
  // The lane's quad index; on an FP8 cache derived where used (no spill at setmaxnreg 232).
  __device__ __forceinline__ int t() const { return fp8 ? lane_in_wg & 3 : t_; }
  int rows[2];   // local rows of this lane's two accumulator rows
  int limit[2];  // keys visible to each of them (causal / sequence end)
  int min_limit; // the smallest limit of the row block: pages below it need no mask
  int hk;
  Segment seg;
  uint32_t phase;  // parity of the next load of this warpgroup's S buffer (buffer wg)
  uint32_t q_phase;  // parity of the current segment's Q tiles (q_ready)
#ifdef KVPAGER_TRACE
  bool trace;
  mutable int trace_n;
#endif

  __device__ __forceinline__ uint32_t q_tile(int c) const { return smem_addr(s.q[c]); }
  __device__ __forceinline__ uint32_t page(int buf) const { return smem_addr(s.page[buf][0]); }
  __device__ __forceinline__ bool issuer() const { return lane_in_wg == 0; }
  __device__ __forceinline__ void warpgroup_sync() const {
    NamedBarrier::arrive_and_wait(T::kWarpgroupThreads, T::kWarpgroupSync + wg);
  }
  // Both consumer warpgroups (the whole CTA unless an FP8 converter warpgroup runs beside them).
  __device__ __forceinline__ void consumers_sync() const {
    if (fp8)
      ConsumerSync::sync();
    else
      CtaSync::sync();
  }
  // The barrier an S GEMM waits on for tile `tile` of buffer `buf`: its TMA copy's, or on an FP8
  // cache a latent tile's dequantization.
  __device__ __forceinline__ uint64_t* tile_barrier(int buf, int tile) const {
    return fp8 && tile < T::kRopeTile ? &s.converted[buf][tile] : &s.tile_ready[buf][tile];
  }
  // One thread: tiles [first, last) of page `page` (its block-table id `id`) into buffer `buf`.
  __device__ __forceinline__ void load(int buf, int id, int first, int last) const {
    if (fp8)
      load_fp8_page_tiles(*fp8_maps, s.tile_ready[buf], s.page[buf][0], id, hk, first, last, p.page_cache_hint);
    else
      load_page_tiles(map, s.tile_ready[buf], s.page[buf][0], id, hk, first, last, p.page_cache_hint);
  }
  // This warpgroup's V tiles of buffer `buf` as B of P V at k-step kk: stepped by a constant from
  // v0 (k-step 0's descriptor), or on an FP8 cache built from the address (score_tiles says why).
  __device__ __forceinline__ uint64_t v_step(int buf, uint64_t v0, int kk) const {
    return fp8 ? v_desc(page(buf), wg * T::kVTilesPerWg, kk) : desc_add(v0, kk * kMmaK * kBlockRowBytes);
  }
  // One thread: the tiles WG0 reads last in buffer `buf` (0-3 and the rope tile 8), page `id`.
  __device__ __forceinline__ void load_wg0_tiles(int buf, int id) const {
    load(buf, id, 0, T::kVTilesPerWg);
    load(buf, id, T::kRopeTile, kColBlocks);
  }
  // Warpgroup WG, once every one of its warps is done reading them: its issuer refills the tiles
  // WG reads last in buffer `buf` (WG0: 0-3 and 8, WG1: 4-7) with page `id`.
  template <int WG>
  __device__ __forceinline__ void refill_after_reads(int buf, int id) const {
    warpgroup_sync();
    if (!issuer()) return;
    if constexpr (WG == 0)
      load_wg0_tiles(buf, id);
    else
      load(buf, id, T::kVTilesPerWg, T::kRopeTile);
    SEESAW_TRACE(*this, buf == 0 ? kEvRefill0 : kEvRefill1);
  }
};

// acc (+)= Q K^T over tiles [kFirst, kLast) of buffer `buf`, each issued once its TMA copy landed
// (the caller fences acc first).
// Here and in the P V products each operand's descriptor is built once and stepped by constants
// (desc_add): 976 fewer instructions than building each from its address, 1-7 % faster (s19). The
// FP8 seesaw builds each from its address: at its 232 registers the stepped bases spill 8 bytes.
template <typename Elem, int kFirst, int kLast, bool kZeroFirst, bool kWaitQ = false>
__device__ __forceinline__ void score_tiles(const Ctx& c, int buf, float (&acc)[T::kScoreRegs]) {
  static_assert(sizeof(Plan::q[0]) == kPageTileBytes, "Q's tiles, like a buffer's, are kPageTileBytes apart");
  const uint32_t page = c.page(buf);
  const uint64_t q_desc = k_major_desc(c.q_tile(0), 0), page_desc = k_major_desc(page, 0);
#pragma unroll
  for (int tile = kFirst; tile < kLast; ++tile) {
    TileBarrier::wait(c.tile_barrier(buf, tile), c.phase);
    if constexpr (kWaitQ) TileBarrier::wait(&c.s.q_ready[tile], c.q_phase);  // a segment's first S GEMMs
    cute::warpgroup_arrive();  // after the wait loop (divergent to ptxas): else every wgmma gets serialized
#pragma unroll
    for (int kk = 0; kk < kBlockCols / kMmaK; ++kk) {
      const uint32_t at = tile * kPageTileBytes + kk * 32;
      const uint64_t a = c.fp8 ? k_major_desc(c.q_tile(tile), kk) : desc_add(q_desc, at);
      const uint64_t b = c.fp8 ? k_major_desc(page + tile * kPageTileBytes, kk) : desc_add(page_desc, at);
      gmma<typename GmmaOps<Elem>::PageScoreMma>(a, b, acc, !(kZeroFirst && tile == kFirst && kk == 0));
    }
  }
}

// The S GEMM of WG0 (buffer 0): tiles 0-3 and the rope tile first (reloaded early), then 4-7.
// kWaitQ: a segment's first S GEMMs, whose Q tiles may still be landing.
template <typename Elem, bool kWaitQ = false>
__device__ __forceinline__ void issue_s0_early(const Ctx& c, float (&s)[T::kScoreRegs]) {
  fence_accumulators(s);
  score_tiles<Elem, 0, T::kVTilesPerWg, true, kWaitQ>(c, 0, s);
  score_tiles<Elem, T::kRopeTile, kColBlocks, false, kWaitQ>(c, 0, s);
  cute::warpgroup_commit_batch();
}
template <typename Elem, bool kWaitQ = false>
__device__ __forceinline__ void issue_s0_late(const Ctx& c, float (&s)[T::kScoreRegs]) {
  score_tiles<Elem, T::kVTilesPerWg, T::kRopeTile, false, kWaitQ>(c, 0, s);
  cute::warpgroup_commit_batch();
}
// The S GEMM of WG1 (buffer 1): tiles 4-7 first (reloaded by WG1 itself), then 8 and 0-3.
template <typename Elem, bool kWaitQ = false>
__device__ __forceinline__ void issue_s1(const Ctx& c, float (&s)[T::kScoreRegs]) {
  fence_accumulators(s);
  score_tiles<Elem, T::kVTilesPerWg, kColBlocks, true, kWaitQ>(c, 1, s);
  score_tiles<Elem, 0, T::kVTilesPerWg, false, kWaitQ>(c, 1, s);
  cute::warpgroup_commit_batch();
}

// One thread, at a segment's start: Q's tiles of row block m_block by TMA (tile t completing on
// q_ready[t]), each followed by the same tile of the first page (page_id < 0: none), so that the
// copies land in the order the first S GEMM reads them.
__device__ __forceinline__ void load_q_with_first_page(const Ctx& c, const SeesawMaps& maps, int m_block, int page_id) {
  const int row0 = m_block * T::kBlockM;
  const int head0 = c.hk * c.p.groups + row0 % c.p.groups, sq0 = row0 / c.p.groups;
  const uint64_t hint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
#pragma unroll 1
  for (int tile = 0; tile < kColBlocks; ++tile) {
    TileBarrier::arrive_and_expect_tx(&c.s.q_ready[tile], T::kBlockM * kBlockRowBytes);
    cute::SM90_TMA_LOAD_4D::copy(&maps.q, &c.s.q_ready[tile], hint, c.s.q[tile], tile * kBlockCols, head0, sq0,
                                 c.seg.b);
    if (page_id >= 0) c.load(0, page_id, tile, tile + 1);
  }
}

// O_half += P V_half with P from registers (the packed S fragment), V = this warpgroup's 4 tiles.
template <typename Elem>
__device__ __forceinline__ void pv_local(const Ctx& c, int buf, uint32_t (&pb)[T::kScoreRegs / 2],
                                         float (&o)[T::kOutRegs]) {
  fence_fragment(pb);
  fence_accumulators(o);
  const uint64_t v = v_desc(c.page(buf), c.wg * T::kVTilesPerWg, 0);
  cute::warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kPageSize / kMmaK; ++kk)
    gmma_rs<typename GmmaOps<Elem>::OutMmaRegA>(&pb[4 * kk], c.v_step(buf, v, kk), o);
  cute::warpgroup_commit_batch();
  fence_accumulators(o);
}

// O_half += P V_half with P from a swizzled 64 x 64 tile in shared memory (the other warpgroup's).
template <typename Elem>
__device__ __forceinline__ void pv_remote(const Ctx& c, uint32_t p_tile, int buf, float (&o)[T::kOutRegs]) {
  fence_accumulators(o);
  const uint64_t p = k_major_desc(p_tile, 0), v = v_desc(c.page(buf), c.wg * T::kVTilesPerWg, 0);
  cute::warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kPageSize / kMmaK; ++kk) {
    const uint64_t a = c.fp8 ? k_major_desc(p_tile, kk) : desc_add(p, kk * 32);
    gmma<typename GmmaOps<Elem>::OutMma>(a, c.v_step(buf, v, kk), o, true);
  }
  cute::warpgroup_commit_batch();
  fence_accumulators(o);
}

// On the sequence's last page, rows past its end hold whatever the pool has (NaN included): zero
// this warpgroup's V tiles there, so that P = 0 cannot meet them as 0 * NaN. Then make the
// stores visible to the tensor cores of the whole warpgroup. Only a segment's last page can be
// the sequence's last, so only the tail pairs call this.
__device__ __forceinline__ void zero_v_tail(const Ctx& c, int buf, int page) {
  const int valid = c.seg.valid_rows(page);
  if (valid >= kPageSize) return;  // uniform across the CTA
  char* tiles = c.s.page[buf][c.wg * T::kVTilesPerWg];
  constexpr int kChunksPerTileRow = kBlockRowBytes / kChunkBytes;  // 8
  const int chunks = (kPageSize - valid) * T::kVTilesPerWg * kChunksPerTileRow;
  for (int i = c.lane_in_wg; i < chunks; i += T::kWarpgroupThreads) {
    const int chunk = i % kChunksPerTileRow;
    const int tile = (i / kChunksPerTileRow) % T::kVTilesPerWg;
    const int row = valid + i / (kChunksPerTileRow * T::kVTilesPerWg);
    *reinterpret_cast<uint4*>(tiles + tile * kPageTileBytes + row * kBlockRowBytes + chunk * kChunkBytes) =
        make_uint4(0, 0, 0, 0);
  }
  fence_async_proxy();
  c.warpgroup_sync();
}

// The segment's output. Each lane holds columns 256 wg + 8n + {2t, 2t+1} of its two rows. Unsplit,
// the Elem rows of `out` are staged through the page buffers (free once the pairs are done) by
// stmatrix, so global memory sees whole 16-byte chunks of consecutive columns (a quad's 4-byte
// stores would write half sectors: measured 7.9 µs for a 64-row block's output on the H200); in the
// staging tile a row's 16-byte chunk k sits at chunk k ^ (row % 8), so the stores hit 32 distinct
// banks. Split, the fp32 partial is stored directly (a quad's float2s fill a sector).
// A -DKVPAGER_TRACE_EPILOGUE_TWICE trace build writes the output twice (the same bytes to the same
// places), stamping each pass: a second pass much faster than the first says the first waited on
// cold instruction fetch, not on the stores (s25, H100, b 64 s_k 1024 with 64 shared stores a
// thread: 3,184 cycles for the first pass, 540 for the second).
#ifdef KVPAGER_TRACE_EPILOGUE_TWICE
constexpr int kEpiPasses = 2;
#else
constexpr int kEpiPasses = 1;
#endif

#ifdef KVPAGER_SEESAW_SPLIT_BULK
constexpr bool kSplitBulk = true;  // bf16 / fp16 only: on the FP8 seesaw (232 registers) it spills 4 bytes
#else
constexpr bool kSplitBulk = false;
#endif

template <typename Elem, bool kBulk = false>
__device__ __forceinline__ void store_output(const Ctx& c, int m_block, float (&o)[T::kOutRegs],
                                             const float (&row_max)[2], const float (&total)[2]) {
  const DecodeParams& p = c.p;
  const Segment& seg = c.seg;
  const bool split = seg.num_splits > 1;
  char* stage = c.s.page[0][0];
  static_assert(T::kBlockM * kHeadDimV * sizeof(Elem) <= kNumPageBuffers * kColBlocks * kPageTileBytes,
                "the staging tile must fit in the page buffers");
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = c.rows[i], mrow = m_block * T::kBlockM + r;
    const bool empty = !(total[i] > 0.f);
    inv[i] = empty ? 0.f : 1.f / total[i];
    const float lse = empty ? (split ? -CUDART_INF_F : CUDART_INF_F) : (row_max[i] + __log2f(total[i])) * 0.69314718055994531f;
    if (c.wg == 0 && c.t() == 0 && mrow < p.rows) {
      if (split) {
        p.lse_accum[(int64_t(seg.split_slot) * p.h_kv + c.hk) * p.rows + mrow] = lse;
      } else {
        const int sq = mrow / p.groups, head = c.hk * p.groups + mrow % p.groups;
        p.lse[(int64_t(seg.b) * p.h_q + head) * p.s_q + sq] = lse;
      }
    }
  }
  OnlineSoftmax::rescale(o, inv);
  SEESAW_TRACE(c, kEvEpiScaled);
  const int valid_rows = min(T::kBlockM, p.rows - m_block * T::kBlockM);
  if (split) {  // float2 stores of a quad already fill whole 32-byte sectors: no staging
    float(&o_tiles)[T::kOutRegs / 4][4] = reinterpret_cast<float(&)[T::kOutRegs / 4][4]>(o);
    float* acc = p.out_accum + (int64_t(seg.split_slot) * p.h_kv + c.hk) * p.rows * kHeadDimV;
    if constexpr (kBulk) {
      // Trial (s26, -DKVPAGER_SEESAW_SPLIT_BULK): the fp32 partial staged in the page buffers (rows
      // 520 floats apart: a half-warp's float2 stores hit 32 distinct banks) and written by one 2 KB
      // bulk copy a row, so the 64 register stores a thread become shared-memory stores and the
      // global writes drain while the next segment starts; only the copies' reads of the staging
      // tile are waited for (the next segment's first sync orders that before its TMA loads).
      constexpr int kStageStride = kHeadDimV + 8;
      static_assert(T::kBlockM * kStageStride * sizeof(float) <= kNumPageBuffers * kColBlocks * kPageTileBytes,
                    "the fp32 staging tile must fit in the page buffers");
      float* stage_f = reinterpret_cast<float*>(c.s.page[0][0]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int n = 0; n < T::kOutRegs / 4; ++n)
          *reinterpret_cast<float2*>(stage_f + c.rows[i] * kStageStride + c.wg * T::kColsPerWg + n * kMmaN +
                                     2 * c.t()) = make_float2(o_tiles[n][2 * i], o_tiles[n][2 * i + 1]);
      fence_async_proxy();  // generic stores, read by the bulk copies (async proxy)
      c.consumers_sync();
      SEESAW_TRACE(c, kEvEpiStaged);
      if (threadIdx.x < valid_rows) {
        const int mrow = m_block * T::kBlockM + threadIdx.x;
        cute::SM90_BULK_COPY_S2G::copy(stage_f + threadIdx.x * kStageStride, acc + int64_t(mrow) * kHeadDimV,
                                       kHeadDimV * sizeof(float));
        cute::tma_store_arrive();
        cute::tma_store_wait<0>();
      }
      SEESAW_TRACE(c, kEvEpiPass);
    } else {
#pragma unroll 1
      for (int pass = 0; pass < kEpiPasses; ++pass) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int mrow = m_block * T::kBlockM + c.rows[i];
          if (mrow >= p.rows) continue;
#pragma unroll
          for (int n = 0; n < T::kOutRegs / 4; ++n)
            *reinterpret_cast<float2*>(acc + int64_t(mrow) * kHeadDimV + c.wg * T::kColsPerWg + n * kMmaN +
                                       2 * c.t()) = make_float2(o_tiles[n][2 * i], o_tiles[n][2 * i + 1]);
        }
        SEESAW_TRACE(c, kEvEpiPass + pass);
      }
    }
  } else {
    constexpr int kRowBytes16 = kHeadDimV * 2;  // 1024
#pragma unroll 1
    for (int pass = 0; pass < kEpiPasses; ++pass) {
      // 16 stmatrix.x4 a thread (64 four-byte stores before s25: -1.1 µs at b 64 s_k 1024, the code
      // is shorter and runs cold once a segment). Matrices 0-3 of a store are
      // (rows 0-7 of the warp's 16, block n), (rows 8-15, n), (0-7, n + 1), (8-15, n + 1): exactly
      // the fragment's registers; lane l gives the address of row l % 8 of matrix l / 8. With
      // n = 8a + 2b, chunk ^ (row % 8) = 32 wg + 8a + ((2b + l / 16) ^ (l % 8)): four offsets a lane.
      const int lane = c.lane_in_wg % 32, q = lane % 8, m = lane / 8;
      char* row_base = stage + ((c.lane_in_wg / 32) * kMmaM + q + 8 * (m % 2)) * kRowBytes16 + c.wg * T::kColsPerWg * 2;
      uint32_t off[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) off[b] = ((2 * b + m / 2) ^ q) * kChunkBytes;
#pragma unroll
      for (int n = 0; n < T::kOutRegs / 4; n += 2)
        cute::SM90_U32x4_STSM_N::copy(
            ElemOps<Elem>::pack(o[4 * n], o[4 * n + 1]), ElemOps<Elem>::pack(o[4 * n + 2], o[4 * n + 3]),
            ElemOps<Elem>::pack(o[4 * n + 4], o[4 * n + 5]), ElemOps<Elem>::pack(o[4 * n + 6], o[4 * n + 7]),
            *reinterpret_cast<cute::uint128_t*>(row_base + (n / 8) * 128 + off[(n % 8) / 2]));
      SEESAW_TRACE(c, kEvEpiPass + pass);
    }
    c.consumers_sync();
    SEESAW_TRACE(c, kEvEpiStaged);
    constexpr int kChunks = kRowBytes16 / kChunkBytes;  // 64 per row
    for (int i = threadIdx.x; i < valid_rows * kChunks; i += T::kThreads) {
      const int r = i / kChunks, chunk = i % kChunks, mrow = m_block * T::kBlockM + r;
      const int sq = mrow / p.groups, head = c.hk * p.groups + mrow % p.groups;
      Elem* dst = static_cast<Elem*>(p.out) + (int64_t(seg.b * p.s_q + sq) * p.h_q + head) * kHeadDimV;
      *reinterpret_cast<uint4*>(dst + chunk * kChunkElems) =
          *reinterpret_cast<const uint4*>(stage + r * kRowBytes16 + ((chunk ^ (r & 7)) * kChunkBytes));
    }
  }
  fence_async_proxy();  // the next segment's TMA loads overwrite the staging tile
}

// O (this warpgroup's half) *= its rows' factors, skipped when every factor of the warp is 1 (the
// running max did not move: the common case once a sequence's max has settled).
__device__ __forceinline__ void rescale_output(float (&o)[T::kOutRegs], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) OnlineSoftmax::rescale(o, alpha);
}

// WG0, once scale1 is in: P0' = P0 * scale1 (packed from the fp32 probabilities s) into p0 for WG1's
// O_R += P0' V0R; sc1 returns scale1 for O_L.
template <typename Elem>
__device__ __forceinline__ void hand_over_p0(const Ctx& c, const float (&s)[T::kScoreRegs], float (&sc1)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) sc1[i] = c.s.exchange.pair.scale1[c.rows[i]];
  uint32_t p0[T::kScoreRegs / 2];
  pack_fragment<Elem>(s, p0, sc1);
  store_packed(c.s.p0, kBlockRowBytes, c.rows, 0, c.t(), p0);
  fence_async_proxy();
  handoff(T::kP0Ready);
}

// ---- one pair of pages, per warpgroup --------------------------------------------------------
// The pair's shape is a template so no branch separates a wgmma from its wait (ptxas serializes
// every wgmma of the kernel otherwise): kHas1 = page j1 exists, kNext0 / kNext1 = pages j0 + 2 /
// j1 + 2 exist (the next pair's). Steady state <1,1,1>; tails <1,1,0>, <1,0,0>, <0,0,0>.

// WG0. On entry s holds S0 = Q K_j0^T (raw scores); on exit, S0 of the next pair if there is one.
template <typename Elem, int kOrder, bool kHas1, bool kNext0, bool kNext1>
__device__ __forceinline__ void wg0_pair(Ctx& c, int j0, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                         OnlineSoftmax& sm, bool next0_here = true, bool next1_here = true) {
  static_assert(kHas1 || !kNext0, "a next pair needs this one complete");
  static_assert(kNext0 || !kNext1, "page j1 + 2 comes after j0 + 2");
  const bool next0 = kNext0 && next0_here, next1 = kNext1 && next1_here;  // see run_pairs
  const int j1 = j0 + 1;
  // Block-table ids of the pages this warpgroup will load, fetched early (only its issuer uses them).
  const int id0 = next0 && c.issuer() ? c.seg.block_table[j0 + 2] : 0;
  const int id1 = next1 && c.issuer() ? c.seg.block_table[j1 + 2] : 0;

  // Softmax of S0 against the running max; WG1 picks up row_max and scale0.
  float page_max[2], alpha[2], base[2];
  OnlineSoftmax::to_log2(s, c.p.scale_log2, (j0 + 1) * kPageSize > c.min_limit, j0 * kPageSize, c.t(), c.limit,
                         page_max);
  SEESAW_TRACE(c, kEvMax);
#pragma unroll
  for (int i = 0; i < 2; ++i) sm.row_max[i] = c.s.row_max[c.rows[i]];
  sm.advance(page_max, alpha, base);
  __syncwarp();
  if (c.t() == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      c.s.row_max[c.rows[i]] = sm.row_max[i];
      c.s.exchange.pair.scale0[c.rows[i]] = alpha[i];
    }
  }
  handoff(T::kScale0Ready);
  sm.exponentiate(s, base, alpha);
  rescale_output(o, alpha);
  uint32_t pb[T::kScoreRegs / 2];
  const float one[2] = {1.f, 1.f};
  pack_fragment<Elem>(s, pb, one);
  SEESAW_TRACE(c, kEvP);

  // O_L += P0 V0L.
  if constexpr (!kHas1) zero_v_tail(c, 0, j0);
  pv_local<Elem>(c, 0, pb, o);
  SEESAW_TRACE(c, kEvPvIssued);
  // P0' = P0 * scale1 for WG1's O_R += P0' V0R, stored from the fp32 S while O_L += P0 V0L runs
  // (pb stays untouched: it is that wgmma's A operand), so WG1 can issue it right after its own.
  float sc1[2];
  NamedBarrier::arrive_and_wait(T::kThreads, T::kScale1Ready);
  SEESAW_TRACE(c, kEvScaleIn);
  hand_over_p0<Elem>(c, s, sc1);
  cute::warpgroup_wait<0>();
  fence_accumulators(o);
  SEESAW_TRACE(c, kEvPvDone);
  // Every WG0 warp is done with buffer 0's tiles 0-3 and 8 -> reload them.
  if (next0) c.refill_after_reads<0>(0, id0);
  rescale_output(o, sc1);
#pragma unroll
  for (int i = 0; i < 2; ++i) sm.row_sum[i] *= sc1[i];
  SEESAW_TRACE(c, kEvPStored);

  if constexpr (kHas1) {
    // O_L += P1 V1L (P1 in buffer 1's rope tile).
    NamedBarrier::arrive_and_wait(T::kThreads, T::kP1Ready);
    SEESAW_TRACE(c, kEvPIn);
    if (!next0) zero_v_tail(c, 1, j1);
    pv_remote<Elem>(c, smem_addr(c.s.page[1][T::kRopeTile]), 1, o);
    SEESAW_TRACE(c, kEvRemoteIssued);
    // Buffer 1's tiles 0-3 and 8 are free once O_L += P1 V1L is done; WG1's next S1 reads them last.
    auto refill_buffer1 = [&] {
      fence_accumulators(o);
      SEESAW_TRACE(c, kEvRemoteDone);
      if (next1) c.refill_after_reads<0>(1, id1);
    };
    if (kRefillBeforeS0<kOrder> || !next0) {
      // 15 (and a tail pair): refill before the next S0, whose tile waits (TMA latency) would
      // otherwise hold the refill back.
      cute::warpgroup_wait<0>();
      refill_buffer1();
    }
    if (next0) {
      issue_s0_early<Elem>(c, s);
      SEESAW_TRACE(c, kEvSEarly);
      if constexpr (!kRefillBeforeS0<kOrder>) {  // 11: S0's first tiles queue behind O_L += P1 V1L
        cute::warpgroup_wait<1>();
        refill_buffer1();
      }
      issue_s0_late<Elem>(c, s);
      SEESAW_TRACE(c, kEvSIssued);
      cute::warpgroup_wait<0>();
      fence_accumulators(s);
      c.phase ^= 1;
    }
  }
  SEESAW_TRACE(c, kEvPair);
}

// WG1. On entry s holds S1 = Q K_j1^T if page j1 exists; on exit, S1 of the next pair if any.
template <typename Elem, int kOrder, bool kHas1, bool kNext0, bool kNext1>
__device__ __forceinline__ void wg1_pair(Ctx& c, int j0, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                         OnlineSoftmax& sm, bool next0_here = true, bool next1_here = true) {
  const bool next0 = kNext0 && next0_here, next1 = kNext1 && next1_here;  // see run_pairs
  const int j1 = j0 + 1;
  const int id0 = next0 && c.issuer() ? c.seg.block_table[j0 + 2] : 0;
  const int id1 = next1 && c.issuer() ? c.seg.block_table[j1 + 2] : 0;

  float page_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
  if constexpr (kHas1)
    OnlineSoftmax::to_log2(s, c.p.scale_log2, (j1 + 1) * kPageSize > c.min_limit, j1 * kPageSize, c.t(), c.limit,
                           page_max);
  SEESAW_TRACE(c, kEvMax);

  // The pair's max after WG0's page, then after ours; WG0 picks up scale1.
  NamedBarrier::arrive_and_wait(T::kThreads, T::kScale0Ready);
  SEESAW_TRACE(c, kEvScaleIn);
  float sc0[2], alpha[2], base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    sm.row_max[i] = c.s.row_max[c.rows[i]];
    sc0[i] = c.s.exchange.pair.scale0[c.rows[i]];
  }
  sm.advance(page_max, alpha, base);
  __syncwarp();
  if (c.t() == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      c.s.row_max[c.rows[i]] = sm.row_max[i];
      c.s.exchange.pair.scale1[c.rows[i]] = alpha[i];
    }
  }
  handoff(T::kScale1Ready);
  const float scale_o[2] = {sc0[0] * alpha[0], sc0[1] * alpha[1]};
  rescale_output(o, scale_o);

  if constexpr (kHas1) {
    // O_R += P1 V1R, P1 also into buffer 1's rope tile for WG0.
    sm.exponentiate(s, base, scale_o);
    uint32_t pb[T::kScoreRegs / 2];
    const float one[2] = {1.f, 1.f};
    pack_fragment<Elem>(s, pb, one);
    store_packed(c.s.page[1][T::kRopeTile], kBlockRowBytes, c.rows, 0, c.t(), pb);
    fence_async_proxy();
    SEESAW_TRACE(c, kEvP);
    if (!next0) zero_v_tail(c, 1, j1);
    pv_local<Elem>(c, 1, pb, o);
    SEESAW_TRACE(c, kEvPvIssued);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) sm.row_sum[i] *= scale_o[i];
  }

  // O_R += P0' V0R.
  NamedBarrier::arrive_and_wait(T::kThreads, T::kP0Ready);
  SEESAW_TRACE(c, kEvPIn);
  if constexpr (!kHas1) zero_v_tail(c, 0, j0);
  pv_remote<Elem>(c, smem_addr(c.s.p0), 0, o);
  if constexpr (kHas1) handoff(T::kP1Ready);
  SEESAW_TRACE(c, kEvRemoteIssued);

  // Reload buffer 1's tiles 4-7 once O_R += P1 V1R is done, buffer 0's 4-7 after O_R += P0' V0R.
  if (next1) {
    cute::warpgroup_wait<1>();
    fence_accumulators(o);
    SEESAW_TRACE(c, kEvPvDone);
    c.refill_after_reads<1>(1, id1);
  }
  cute::warpgroup_wait<0>();
  fence_accumulators(o);
  SEESAW_TRACE(c, kEvRemoteDone);
  if (next0) c.refill_after_reads<1>(0, id0);
  if (next1) {
    issue_s1<Elem>(c, s);
    SEESAW_TRACE(c, kEvSIssued);
    cute::warpgroup_wait<0>();
    fence_accumulators(s);
    c.phase ^= 1;
  }
  SEESAW_TRACE(c, kEvPair);
}

// All pairs of the segment [ps, pe) for warpgroup WG: the steady state, then the tail shape.
// Trial (-DKVPAGER_SEESAW_RUNTIME_TAIL, s26): every full pair, the last ones included, runs the
// steady shape's code with the next pages' refills and S GEMMs switched by runtime flags (the
// wgmmas and their wait stay in one branch arm), so a short segment runs no tail-pair code that
// its steady pairs have not already brought into the instruction cache; only a lone last page keeps
// its own shape. Order 15 only: order 11 (kept for comparison) would serialize its wgmmas (C7518).
#ifdef KVPAGER_SEESAW_RUNTIME_TAIL
template <int kOrder> constexpr bool kRuntimeTail = kRefillBeforeS0<kOrder>;
#else
template <int kOrder> constexpr bool kRuntimeTail = false;
#endif
template <typename Elem, int kOrder, int WG>
__device__ __forceinline__ void run_pairs(Ctx& c, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                          OnlineSoftmax& sm) {
  const int pe = c.seg.end_page;
  auto pair = [&](auto has1, auto next0, auto next1, int j0, bool next0_here = true, bool next1_here = true) {
    if constexpr (WG == 0)
      wg0_pair<Elem, kOrder, decltype(has1)::value, decltype(next0)::value, decltype(next1)::value>(
          c, j0, s, o, sm, next0_here, next1_here);
    else
      wg1_pair<Elem, kOrder, decltype(has1)::value, decltype(next0)::value, decltype(next1)::value>(
          c, j0, s, o, sm, next0_here, next1_here);
  };
  using Y = std::true_type;
  using N = std::false_type;
  int j0 = c.seg.first_page;
  if constexpr (kRuntimeTail<kOrder>) {
#pragma unroll 1
    for (; j0 + 1 < pe; j0 += 2) pair(Y{}, Y{}, Y{}, j0, j0 + 2 < pe, j0 + 3 < pe);
    if (j0 < pe) pair(N{}, N{}, N{}, j0);
  } else {
#pragma unroll 1
    for (; j0 + 3 < pe; j0 += 2) pair(Y{}, Y{}, Y{}, j0);
    if (j0 + 2 < pe) {  // three pages left: a full pair, then a lone page
      pair(Y{}, Y{}, N{}, j0);
      pair(N{}, N{}, N{}, j0 + 2);
    } else if (j0 + 1 < pe) {
      pair(Y{}, N{}, N{}, j0);
    } else if (j0 < pe) {
      pair(N{}, N{}, N{}, j0);
    }
  }
}

}  // namespace seesaw

namespace seesaw {

// The two consumer warpgroups: every segment of this CTA's part, its pairs, its output.
template <typename Elem, int kOrder, bool kFp8>
__device__ __forceinline__ void run_consumers(Plan& plan, const DecodeParams& p, const SeesawMaps& maps) {
  const int m_block = blockIdx.x, part = blockIdx.z;
  const int warp_in_wg = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  Ctx c{plan, p, &maps.page, kFp8 ? &maps.fp8 : nullptr, kFp8};
  c.wg = threadIdx.x / T::kWarpgroupThreads;
  c.lane_in_wg = threadIdx.x % T::kWarpgroupThreads;
  c.t_ = lane % 4;
  c.rows[0] = warp_in_wg * kMmaM + lane / 4;
  c.rows[1] = c.rows[0] + 8;
  c.hk = blockIdx.y;
  c.phase = 0;
  c.q_phase = 0;
#ifdef KVPAGER_TRACE
  c.trace = m_block == 0 && part == p.num_parts / 2 && c.lane_in_wg == 0;
  c.trace_n = 0;
#endif
  SEESAW_TRACE(c, kEvStart);

  using Scheduler = std::conditional_t<kFp8, LeanTileScheduler, TileScheduler>;  // FP8: 232 registers
  for (Scheduler sched(p, part); sched.valid(); sched.next()) {
    c.seg = sched.segment();
    const int ps = c.seg.first_page, pe = c.seg.end_page;
    c.consumers_sync();  // the previous segment is done with every buffer (and the barriers are set up)
    SEESAW_TRACE(c, kEvSegment);

    // The first pair's pages by TMA. Q by TMA too where q suits a tensor map (s23): tile by tile,
    // each followed by the first page's same tile, so the first S GEMMs run behind the copies as
    // they land (b 1: -1.2 us, docs/kernel-perf.md). Else (and on an FP8 cache) by cp.async, any
    // strides, after the pages (issuing it first made the first S later, s15).
    constexpr bool kQByTma = !kFp8;  // FP8: no registers to spare for it at setmaxnreg 232
    const bool q_tma = kQByTma && maps.q_by_tma;
    if (threadIdx.x == 0) {
      if (q_tma)
        load_q_with_first_page(c, maps, m_block, ps < pe ? c.seg.block_table[ps] : -1);
      else if (ps < pe)
        c.load(0, c.seg.block_table[ps], 0, kColBlocks);
      if (ps + 1 < pe) c.load(1, c.seg.block_table[ps + 1], 0, kColBlocks);
    }
    if (!q_tma) load_q_tile<Elem, T::kBlockM, BlockSwizzled>(p, plan.q[0], c.seg.b, c.hk, m_block);
    cute::cp_async_fence();
    if (threadIdx.x < T::kBlockM) plan.row_max[threadIdx.x] = -CUDART_INF_F;
#pragma unroll
    for (int i = 0; i < 2; ++i) c.limit[i] = row_limit(p, c.seg.seqlen, m_block * T::kBlockM + c.rows[i]);
    c.min_limit = row_limit(p, c.seg.seqlen, m_block * T::kBlockM);
    cute::cp_async_wait<0>();
    fence_async_proxy();  // Q was written through the generic proxy; wgmma reads it through the async one
    c.consumers_sync();
    if constexpr (kQByTma) {
      // Q by cp.async (landed: the sync above): complete q_ready's phase by hand for the waits below.
      if (!q_tma && threadIdx.x == 0)
        for (int tile = 0; tile < kColBlocks; ++tile) TileBarrier::arrive(&plan.q_ready[tile]);
      // No S GEMM waits for Q in a segment without pages: wait here, before the next segment's copies.
      if (ps >= pe)
        for (int tile = 0; tile < kColBlocks; ++tile) TileBarrier::wait(&plan.q_ready[tile], c.q_phase);
    }
    SEESAW_TRACE(c, kEvQ);

    float o[T::kOutRegs];
#pragma unroll
    for (int i = 0; i < T::kOutRegs; ++i) o[i] = 0.f;
    float s[T::kScoreRegs];  // defined before the first wgmma reads it (else ptxas serializes them all)
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i) s[i] = 0.f;
    OnlineSoftmax sm;
    sm.reset();

    if (c.wg == 0) {
      if (ps < pe) {
        issue_s0_early<Elem, kQByTma>(c, s);
        issue_s0_late<Elem, kQByTma>(c, s);
        cute::warpgroup_wait<0>();
        fence_accumulators(s);
        c.phase ^= 1;
      }
      SEESAW_TRACE(c, kEvFirstS);
      run_pairs<Elem, kOrder, 0>(c, s, o, sm);
    } else {
      if (ps + 1 < pe) {
        issue_s1<Elem, kQByTma>(c, s);
        cute::warpgroup_wait<0>();
        fence_accumulators(s);
        c.phase ^= 1;
      }
      SEESAW_TRACE(c, kEvFirstS);
      run_pairs<Elem, kOrder, 1>(c, s, o, sm);
    }

    SEESAW_TRACE(c, kEvLoopEnd);
    if (sched.last()) allow_dependent_launch();
    // FP8: read the segment's split fields again for the epilogue rather than keep them live
    // through the pairs (232 registers).
    if constexpr (kFp8) c.seg = sched.segment();

    // Epilogue: both warpgroups' row sums (same frame: the final row_max), then each writes its half.
    float total[2];
    c.consumers_sync();  // every pair's exchange (and every read of the page buffers) is over
    SEESAW_TRACE(c, kEvEpiSync);
    using Sync = std::conditional_t<kFp8, ConsumerSync, CtaSync>;
    cta_row_sum<Sync>(&plan.exchange.row_sum[0][0], c.wg, 2, T::kBlockM, c.rows, c.t(), sm.row_sum, total);
    SEESAW_TRACE(c, kEvEpiRowSum);
    const float row_max[2] = {plan.row_max[c.rows[0]], plan.row_max[c.rows[1]]};
    store_output<Elem, kSplitBulk && !kFp8>(c, m_block, o, row_max, total);
    SEESAW_TRACE(c, kEvEpilogue);
    if constexpr (kQByTma) c.q_phase ^= 1;  // every q_ready barrier completed once this segment
  }
}

}  // namespace seesaw

// kFp8: the cache holds 656-byte FP8 rows (seesaw_fp8.cuh; Elem is q's bf16), and a third
// warpgroup converts them.
template <typename Elem, int kOrder, bool kFp8>
__global__ void __launch_bounds__(seesaw::kCtaThreads<kFp8>, 1)
    mla_decode_seesaw_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ SeesawMaps maps) {
  using namespace seesaw;
  static_assert(!kFp8 || std::is_same_v<Elem, __nv_bfloat16>, "FP8: bf16 q");
  static_assert(!kFp8 || kOrder == 15, "FP8: order 15 only");
  extern __shared__ char smem_raw[];
  Plan& plan = aligned_plan<Plan>(smem_raw);

  if (threadIdx.x == 0) {
    if constexpr (kFp8) {
      if (p.num_pages > 0) {  // else no map was encoded (and no page is ever loaded)
        cute::prefetch_tma_descriptor(&maps.fp8.latent);
        cute::prefetch_tma_descriptor(&maps.fp8.scales);
        cute::prefetch_tma_descriptor(&maps.fp8.rope);
      }
    } else {
      cute::prefetch_tma_descriptor(&maps.page);
      if (maps.q_by_tma) cute::prefetch_tma_descriptor(&maps.q);
    }
#pragma unroll
    for (int buf = 0; buf < kNumPageBuffers; ++buf) {
#pragma unroll
      for (int tile = 0; tile < kColBlocks; ++tile) TileBarrier::init(&plan.tile_ready[buf][tile], 1);
      if constexpr (kFp8) {
#pragma unroll
        for (int tile = 0; tile < kColBlocks - 1; ++tile) TileBarrier::init(&plan.converted[buf][tile], T::kConvertedArrivals);
      }
    }
    if constexpr (!kFp8) {  // Q's tiles (the FP8 seesaw loads Q by cp.async only)
#pragma unroll
      for (int tile = 0; tile < kColBlocks; ++tile) TileBarrier::init(&plan.q_ready[tile], 1);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kFp8) {
    __syncthreads();  // the barriers are set up, for the converter too (it takes no part in later syncs)
    if (threadIdx.x < T::kThreads) {
      cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegs>();
      run_consumers<Elem, kOrder, kFp8>(plan, p, maps);
    } else {
      cutlass::arch::warpgroup_reg_dealloc<T::kConverterRegs>();
      seesaw_fp8::run_converter(plan, p, blockIdx.z, (threadIdx.x / 32) % 4, threadIdx.x % 32);
    }
  } else {
    run_consumers<Elem, kOrder, kFp8>(plan, p, maps);
  }
}


}  // namespace kvpager
