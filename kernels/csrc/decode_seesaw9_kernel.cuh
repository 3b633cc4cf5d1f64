// v9 of the seesaw kernel (KVPAGER_MLA_KERNEL=seesaw9; off by default): the same arithmetic,
// shared-memory plan and buffer roles as decode_seesaw_kernel.cuh (v8), with the hand-offs
// reordered so that buffer 0 is free, and reloaded, in the middle of a pair instead of at its end.
//
// Why: in v8, WG1's O_R += P0' V0R needs P0' = P0 * scale1, which WG0 can only produce after
// WG1's softmax; so buffer 0's tiles 4-7 are released at the very end of the pair, and the
// next S0 (and S1, which starts on buffer 1's tiles 4-7 reloaded just before) waits on a TMA
// load issued a moment earlier (docs/kernel-perf.md, v7d trace). v9 multiplies the unscaled
// P0 instead and applies scale1 to O_R afterwards:
//   O_R = (O_R * scale0 + P0 V0R) * scale1 + P1 V1R          (exact: P0' V0R = scale1 * P0 V0R)
// so WG1 issues O_R += P0 V0R as soon as WG0 has stored P0, before exponentiating S1, and
// buffer 0's tiles 4-7 are reloaded once that MMA is done; buffer 1's tiles (P1's readers) are
// still freed late, but the next S1 starts on tiles 8 and 0-3 (freed first) and the tensor
// cores have the next S0 to run while they land.
//
// One pair, steady state (-> hand-off, => TMA reload of page j + 2 into the named tiles):
//   WG0: S0 softmax, row_max / scale0 -> [Scale0Ready]; P0 = exp2(S0 - m0) -> p0 -> [P0Ready];
//        O_L = O_L * scale0 + P0 V0L; wait; => buffer 0 tiles 0-3, 8;
//        [P1Ready] -> O_L *= scale1; O_L += P1 V1L; issue next S0 on tiles 0-3, 8; wait for
//        O_L; => buffer 1 tiles 0-3, 8; next S0 on tiles 4-7.
//   WG1: S1 to log2; [Scale0Ready] -> m1, scale1 -> row_max / scale1; [P0Ready] -> O_R *= scale0;
//        issue O_R += P0 V0R; P1 = exp2(S1 - m1) -> buffer 1 tile 8; wait for O_R -> [P1Ready];
//        O_R *= scale1; => buffer 0 tiles 4-7; O_R += P1 V1R; wait; => buffer 1 tiles 4-7;
//        next S1 on tiles 8, 0-3, then 4-7.
//
// Phase protocol (a wrong parity is a hang, so it is written out):
//  - Named barriers, each used exactly once per pair by both warpgroups whatever the pair's shape
//    (producer bar.arrive, consumer bar.sync): Scale0Ready and P0Ready WG0 -> WG1, P1Ready
//    WG1 -> WG0. A producer cannot arrive twice before the consumer synced once: between WG0's
//    P0Ready of pairs k and k + 1 lies its sync on P1Ready(k), which WG1 arrives at only after
//    its sync on P0Ready(k); symmetrically for P1Ready. Scale1Ready (v8) is not used.
//  - What each barrier publishes, and the write-after-read it closes: Scale0Ready: row_max = m0,
//    scale0 (their previous readers, WG0 at pair start, read before P1Ready(k - 1)). P0Ready:
//    P0 in p0 (its previous reader, WG1's O_R += P0 V0R of pair k - 1, completed before WG1
//    arrived at P1Ready(k - 1), which WG0 synced on before writing). P1Ready: row_max = m1,
//    scale1, P1 in buffer 1's tile 8, and "WG1 is done reading p0".
//  - Tile mbarriers: unchanged from v8. Each tile of buffer b is loaded once per pair that has a
//    next page for b (kNext0 / kNext1; the prologue loads the first pair) and waited once by the
//    warpgroup whose S reads buffer b (WG b), which flips its own Ctx::phase once per S. A reload
//    is issued only after every waiter of the previous phase passed its wait (no phase skipped):
//    buffer 0 tiles 0-3, 8 by WG0 after its own warpgroup sync; tiles 4-7 by WG1 after P0Ready
//    (WG0's S0 waits come before its arrive); buffer 1 tiles 0-3, 8 by WG0 after P1Ready (WG1's
//    S1 waits came before it arrived); tiles 4-7 by WG1 after its own warpgroup sync. Each
//    reload also follows the completion (wgmma wait + warpgroup sync) of every MMA that reads the
//    tile: buffer 0 tiles 0-3, 8: S0, O_L += P0 V0L; 4-7: S0, O_R += P0 V0R; buffer 1 tiles
//    0-3, 8: S1, O_L += P1 V1L (P1 lives in tile 8); 4-7: S1, O_R += P1 V1R.
//  - No cycle: neither warpgroup waits on the other between a sync and the loads that the other
//    waits for next (WG0 loads buffer 1 tiles right after O_L += P1 V1L; WG1 loads buffer 0 tiles
//    4-7 right after P1Ready), so -DKVPAGER_SYNC_HANDOFFS (producers bar.sync too) cannot hang.
#pragma once
#include "decode_seesaw_kernel.cuh"

namespace kvpager {

namespace seesaw9 {

using namespace seesaw;  // v8's pieces: Ctx, handoff, score_tiles, issue_s0_*, pv_local / pv_remote, zero_v_tail, store_output

// The S GEMM of WG1 (buffer 1): tiles 8 and 0-3 first (freed by WG0's O_L += P1 V1L, which runs
// before WG1's own O_R += P1 V1R), then 4-7.
template <typename Elem>
__device__ __forceinline__ void issue_s1_v9(const Ctx& c, float (&s)[T::kScoreRegs]) {
  fence_accumulators(s);
  score_tiles<Elem, T::kRopeTile, kColBlocks, true>(c, 1, s);
  score_tiles<Elem, 0, T::kVTilesPerWg, false>(c, 1, s);
  score_tiles<Elem, T::kVTilesPerWg, T::kRopeTile, false>(c, 1, s);
  cute::warpgroup_commit_batch();
}

// WG0. On entry s holds S0 = Q K_j0^T (raw scores); on exit, S0 of the next pair if there is one.
template <typename Elem, bool kHas1, bool kNext0, bool kNext1>
__device__ __forceinline__ void wg0_pair_v9(Ctx& c, int j0, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                         OnlineSoftmax& sm) {
  static_assert(kHas1 || !kNext0, "a next pair needs this one complete");
  static_assert(kNext0 || !kNext1, "page j1 + 2 comes after j0 + 2");
  const int j1 = j0 + 1;
  const int id0 = kNext0 && c.issuer() ? c.seg.block_table[j0 + 2] : 0;
  const int id1 = kNext1 && c.issuer() ? c.seg.block_table[j1 + 2] : 0;
  if (kNext1 && c.issuer() && c.p.l2_prefetch_pairs > 0) c.prefetch_pages(j0 + 2 * c.p.l2_prefetch_pairs, 2);

  // Softmax of S0 against the running max; WG1 picks up row_max and scale0.
  float page_max[2], alpha[2], base[2];
  OnlineSoftmax::to_log2(s, c.p.scale_log2, (j0 + 1) * kPageSize > c.min_limit, j0 * kPageSize, c.t, c.limit,
                         page_max);
#pragma unroll
  for (int i = 0; i < 2; ++i) sm.row_max[i] = c.s.row_max[c.rows[i]];
  sm.advance(page_max, alpha, base);
  __syncwarp();
  if (c.t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      c.s.row_max[c.rows[i]] = sm.row_max[i];
      c.s.exchange.pair.scale0[c.rows[i]] = alpha[i];
    }
  }
  handoff(T::kScale0Ready);
  sm.exponentiate(s, base, alpha);
  OnlineSoftmax::rescale(o, alpha);
  uint32_t pb[T::kScoreRegs / 2];
  const float one[2] = {1.f, 1.f};
  pack_fragment<Elem>(s, pb, one);
  // P0 in the frame of m0, for WG1's O_R += P0 V0R (WG1 applies scale1 to O_R afterwards).
  store_packed(c.s.p0, kBlockRowBytes, c.rows, 0, c.t, pb);
  fence_async_proxy();
  handoff(T::kP0Ready);

  // O_L += P0 V0L; then buffer 0's tiles 0-3 and 8 are free (S0 and this MMA were their readers).
  if constexpr (!kHas1) zero_v_tail(c, 0, j0);
  pv_local<Elem>(c, 0, pb, o);
  cute::warpgroup_wait<0>();
  fence_accumulators(o);
  if constexpr (kNext0) {
    c.warpgroup_sync();
    if (c.issuer()) {
      c.load(0, id0, 0, T::kVTilesPerWg);
      c.load(0, id0, T::kRopeTile, kColBlocks);
    }
  }

  // WG1's half of the pair: row_max = m1, scale1, P1 (and p0 is free again).
  NamedBarrier::arrive_and_wait(T::kThreads, T::kP1Ready);
  float sc1[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) sc1[i] = c.s.exchange.pair.scale1[c.rows[i]];
  OnlineSoftmax::rescale(o, sc1);
#pragma unroll
  for (int i = 0; i < 2; ++i) sm.row_sum[i] *= sc1[i];

  if constexpr (kHas1) {
    // O_L += P1 V1L (P1 in buffer 1's rope tile); the next S0's first part behind it.
    if constexpr (!kNext0) zero_v_tail(c, 1, j1);
    pv_remote<Elem>(c, smem_addr(c.s.page[1][T::kRopeTile]), 1, o);
    if constexpr (kNext0) {
      issue_s0_early<Elem>(c, s);
      cute::warpgroup_wait<1>();
    } else {
      cute::warpgroup_wait<0>();
    }
    fence_accumulators(o);
    if constexpr (kNext1) {  // buffer 1's tiles 0-3 and 8: S1 and O_L += P1 V1L were their readers
      c.warpgroup_sync();
      if (c.issuer()) {
        c.load(1, id1, 0, T::kVTilesPerWg);
        c.load(1, id1, T::kRopeTile, kColBlocks);
      }
    }
    if constexpr (kNext0) {
      issue_s0_late<Elem>(c, s);
      cute::warpgroup_wait<0>();
      fence_accumulators(s);
      c.phase ^= 1;
    }
  }
  SEESAW_TRACE(c, kEvPair);
}

// WG1. On entry s holds S1 = Q K_j1^T if page j1 exists; on exit, S1 of the next pair if any.
template <typename Elem, bool kHas1, bool kNext0, bool kNext1>
__device__ __forceinline__ void wg1_pair_v9(Ctx& c, int j0, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                         OnlineSoftmax& sm) {
  const int j1 = j0 + 1;
  const int id0 = kNext0 && c.issuer() ? c.seg.block_table[j0 + 2] : 0;
  const int id1 = kNext1 && c.issuer() ? c.seg.block_table[j1 + 2] : 0;

  float page_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
  if constexpr (kHas1)
    OnlineSoftmax::to_log2(s, c.p.scale_log2, (j1 + 1) * kPageSize > c.min_limit, j1 * kPageSize, c.t, c.limit,
                           page_max);

  // The pair's max after WG0's page, then after ours (scale1 = alpha); WG0 reads them after P1Ready.
  NamedBarrier::arrive_and_wait(T::kThreads, T::kScale0Ready);
  float sc0[2], alpha[2], base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    sm.row_max[i] = c.s.row_max[c.rows[i]];
    sc0[i] = c.s.exchange.pair.scale0[c.rows[i]];
  }
  sm.advance(page_max, alpha, base);
  __syncwarp();
  if (c.t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      c.s.row_max[c.rows[i]] = sm.row_max[i];
      c.s.exchange.pair.scale1[c.rows[i]] = alpha[i];
    }
  }
  const float scale_sum[2] = {sc0[0] * alpha[0], sc0[1] * alpha[1]};  // row_sum's frame: m -> m1

  // O_R = O_R * scale0 + P0 V0R, issued before our exponentials so that they overlap it.
  NamedBarrier::arrive_and_wait(T::kThreads, T::kP0Ready);
  OnlineSoftmax::rescale(o, sc0);
  if constexpr (!kHas1) zero_v_tail(c, 0, j0);
  pv_remote<Elem>(c, smem_addr(c.s.p0), 0, o);

  uint32_t pb[T::kScoreRegs / 2];
  if constexpr (kHas1) {  // P1 = exp2(S1 - m1): in registers for O_R, in buffer 1's rope tile for WG0
    sm.exponentiate(s, base, scale_sum);
    const float one[2] = {1.f, 1.f};
    pack_fragment<Elem>(s, pb, one);
    store_packed(c.s.page[1][T::kRopeTile], kBlockRowBytes, c.rows, 0, c.t, pb);
    fence_async_proxy();
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) sm.row_sum[i] *= scale_sum[i];
  }
  cute::warpgroup_wait<0>();
  fence_accumulators(o);
  handoff(T::kP1Ready);  // after the wait: it also tells WG0 that p0 may be overwritten
  OnlineSoftmax::rescale(o, alpha);

  // Buffer 0's tiles 4-7 are free (S0 and O_R += P0 V0R were their readers): mid-pair.
  if constexpr (kNext0) {
    c.warpgroup_sync();
    if (c.issuer()) c.load(0, id0, T::kVTilesPerWg, T::kRopeTile);
  }
  if constexpr (kHas1) {
    // O_R += P1 V1R; then buffer 1's tiles 4-7 are free.
    if constexpr (!kNext0) zero_v_tail(c, 1, j1);
    pv_local<Elem>(c, 1, pb, o);
    cute::warpgroup_wait<0>();
    fence_accumulators(o);
    if constexpr (kNext1) {
      c.warpgroup_sync();
      if (c.issuer()) c.load(1, id1, T::kVTilesPerWg, T::kRopeTile);
      issue_s1_v9<Elem>(c, s);
      cute::warpgroup_wait<0>();
      fence_accumulators(s);
      c.phase ^= 1;
    }
  }
  SEESAW_TRACE(c, kEvPair);
}

// All pairs of the segment [ps, pe) for warpgroup WG: the steady state, then the tail shape
// (the same shapes, in the same order, as v8's run_pairs).
template <typename Elem, int WG>
__device__ __forceinline__ void run_pairs_v9(Ctx& c, float (&s)[T::kScoreRegs], float (&o)[T::kOutRegs],
                                          OnlineSoftmax& sm) {
  const int pe = c.seg.end_page;
  auto pair = [&](auto has1, auto next0, auto next1, int j0) {
    if constexpr (WG == 0)
      wg0_pair_v9<Elem, decltype(has1)::value, decltype(next0)::value, decltype(next1)::value>(c, j0, s, o, sm);
    else
      wg1_pair_v9<Elem, decltype(has1)::value, decltype(next0)::value, decltype(next1)::value>(c, j0, s, o, sm);
  };
  using Y = std::true_type;
  using N = std::false_type;
  int j0 = c.seg.first_page;
#pragma unroll 1
  for (; j0 + 3 < pe; j0 += 2) pair(Y{}, Y{}, Y{}, j0);
  if (j0 + 2 < pe) {
    pair(Y{}, Y{}, N{}, j0);
    pair(N{}, N{}, N{}, j0 + 2);
  } else if (j0 + 1 < pe) {
    pair(Y{}, N{}, N{}, j0);
  } else if (j0 < pe) {
    pair(N{}, N{}, N{}, j0);
  }
}

}  // namespace seesaw9

// The v8 kernel's body with seesaw9's pairs (and S1 order). Kept as a separate kernel while v9 is
// being measured, so the default kernel's code is untouched; the winner keeps one body.
template <typename Elem>
__global__ void __launch_bounds__(SeesawTraits::kThreads, 1)
    mla_decode_seesaw9_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap page_map) {
  using namespace seesaw9;
  extern __shared__ char smem_raw[];
  Plan& plan = aligned_plan<Plan>(smem_raw);

  const int m_block = blockIdx.x, part = blockIdx.z;
  const int warp_in_wg = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  Ctx c{plan, p, &page_map};
  c.wg = threadIdx.x / T::kWarpgroupThreads;
  c.lane_in_wg = threadIdx.x % T::kWarpgroupThreads;
  c.t = lane % 4;
  c.rows[0] = warp_in_wg * kMmaM + lane / 4;
  c.rows[1] = c.rows[0] + 8;
  c.hk = blockIdx.y;
  c.phase = 0;
#ifdef KVPAGER_TRACE
  c.trace = m_block == 0 && part == p.num_parts / 2 && c.lane_in_wg == 0;
  c.trace_n = 0;
#endif
  SEESAW_TRACE(c, kEvStart);

  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(&page_map);
#pragma unroll
    for (int buf = 0; buf < kNumPageBuffers; ++buf)
#pragma unroll
      for (int tile = 0; tile < kColBlocks; ++tile) TileBarrier::init(&plan.tile_ready[buf][tile], 1);
    cutlass::arch::fence_barrier_init();
  }

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    c.seg = sched.segment();
    const int ps = c.seg.first_page, pe = c.seg.end_page;
    __syncthreads();  // the previous segment is done with every buffer (and the barriers are set up)
    SEESAW_TRACE(c, kEvSegment);

    if (threadIdx.x == 0) {
      if (ps < pe) c.load(0, c.seg.block_table[ps], 0, kColBlocks);
      if (ps + 1 < pe) c.load(1, c.seg.block_table[ps + 1], 0, kColBlocks);
      if (p.l2_prefetch_pairs > 1) c.prefetch_pages(ps + 2, 2 * p.l2_prefetch_pairs - 2);
    }
    load_q_tile<Elem, T::kBlockM, BlockSwizzled>(p, plan.q[0], c.seg.b, c.hk, m_block);
    cute::cp_async_fence();
    if (threadIdx.x < T::kBlockM) plan.row_max[threadIdx.x] = -CUDART_INF_F;
#pragma unroll
    for (int i = 0; i < 2; ++i) c.limit[i] = row_limit(p, c.seg.seqlen, m_block * T::kBlockM + c.rows[i]);
    c.min_limit = row_limit(p, c.seg.seqlen, m_block * T::kBlockM);
    cute::cp_async_wait<0>();
    fence_async_proxy();  // Q was written through the generic proxy; wgmma reads it through the async one
    __syncthreads();
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
        issue_s0_early<Elem>(c, s);
        issue_s0_late<Elem>(c, s);
        cute::warpgroup_wait<0>();
        fence_accumulators(s);
        c.phase ^= 1;
      }
      SEESAW_TRACE(c, kEvFirstS);
      seesaw9::run_pairs_v9<Elem, 0>(c, s, o, sm);
    } else {
      if (ps + 1 < pe) {
        seesaw9::issue_s1_v9<Elem>(c, s);
        cute::warpgroup_wait<0>();
        fence_accumulators(s);
        c.phase ^= 1;
      }
      SEESAW_TRACE(c, kEvFirstS);
      seesaw9::run_pairs_v9<Elem, 1>(c, s, o, sm);
    }

    SEESAW_TRACE(c, kEvLoopEnd);
    if (sched.last()) allow_dependent_launch();

    // Epilogue: both warpgroups' row sums (same frame: the final row_max), then each writes its half.
    float total[2];
    __syncthreads();  // every pair's exchange (and every read of the page buffers) is over
    cta_row_sum(&plan.exchange.row_sum[0][0], c.wg, 2, T::kBlockM, c.rows, c.t, sm.row_sum, total);
    const float row_max[2] = {plan.row_max[c.rows[0]], plan.row_max[c.rows[1]]};
    store_output<Elem>(c, m_block, o, row_max, total);
    SEESAW_TRACE(c, kEvEpilogue);
  }
#ifdef KVPAGER_TRACE
  if (c.trace) {
    const uint64_t t0 = g_trace[c.wg][0] & 0xffffffffffffull;
    for (int i = 0; i < c.trace_n; ++i)
      printf("TRACE part %d wg %d #%d event %d cycle %llu\n", part, c.wg, i, int(g_trace[c.wg][i] >> 48),
             (unsigned long long)((g_trace[c.wg][i] & 0xffffffffffffull) - t0));
  }
#endif
}

}  // namespace kvpager
