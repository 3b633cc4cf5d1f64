// The FP8 ws kernel's consumer with page n + 1's softmax beside page n's PV product
// (KVPAGER_FP8_WS_OVERLAP=1, Fp8WsTraits::kOverlapSoftmax; on trial since s21, docs/fp8-cache.md).
// Not a standalone header: decode_fp8_ws_kernel.cuh includes it after the consumer pieces it reuses
// (Descriptors, issue_scores, page_softmax, begin_segment, store_output).
#pragma once

namespace kvpager {
namespace fp8ws {

// Per page the old consumer ran PV (~2,250 cycles), then S^T of the next page (~250), then the
// softmax (~1,300) with the tensor cores idle (docs/fp8-cache.md, s11 timeline). Here page n's PV
// product is two commit groups, latent tiles 0-3 (O^T blocks 0-3) and 4-7, with S^T of page n + 1
// between them, so that page n + 1's softmax runs while the second half is on the tensor cores:
// wgmma groups complete in order, and waiting for all but the last leaves exactly that half in
// flight. P goes into a ring of two (page n + 1's is written while page n's is still read), and
// page n + 1's rescale reaches O^T blocks 0-3 at once and blocks 4-7 after their half is done.

constexpr uint32_t kPBytes = sizeof(Plan::p[0]);

// O^T blocks [kFirst, kFirst + 4) += V^T P^T over buffer buf, P from ring slot `slot`.
template <int kFirst>
__device__ __forceinline__ void issue_pv_half(const Descriptors& d, int buf, int slot,
                                              float (&o)[T::kOutBlocks][T::kScoreRegs]) {
  constexpr int kHalf = T::kOutBlocks / 2;
#pragma unroll
  for (int m = kFirst; m < kFirst + kHalf; ++m) fence_accumulators(o[m]);
  cute::warpgroup_arrive();
  const uint64_t page = desc_add(d.page_v, buf * kBufferBytes);
  const uint64_t pp = desc_add(d.p, slot * kPBytes);
#pragma unroll
  for (int m = kFirst; m < kFirst + kHalf; ++m)
#pragma unroll
    for (int kk = 0; kk < kPageSize / kMmaK; ++kk)
      gmma<OutMma>(desc_add(page, m * kPageTileBytes + kk * kMmaK * kBlockRowBytes), desc_add(pp, kk * 32), o[m], true);
  cute::warpgroup_commit_batch();
}

template <int kFirst, int kCount>
__device__ __forceinline__ void rescale_blocks(float (&o)[T::kOutBlocks][T::kScoreRegs], const float (&alpha)[4]) {
#pragma unroll
  for (int m = kFirst; m < kFirst + kCount; ++m) {
    fence_accumulators(o[m]);
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i) o[m][i] *= alpha[col_slot(i)];
  }
}

// Page n's PV product with S^T of page n + 1 and its softmax in between (see above); then buffer
// n % 2 goes back to the converters. A template, so that no branch separates a wgmma from its wait.
template <bool kNext>
__device__ __forceinline__ void pv_and_next(Plan& s, const DecodeParams& p, const Descriptors& d, uint32_t n,
                                            int next_page, bool next_mask, const int (&cols)[4],
                                            const int (&limit)[4], float (&o)[T::kOutBlocks][T::kScoreRegs],
                                            float (&acc)[T::kScoreRegs], RowStats& st) {
  constexpr int kHalf = T::kOutBlocks / 2;
  const int buf = n % kNumPageBuffers, slot = n % T::kPBuffers;
  issue_pv_half<0>(d, buf, slot, o);
  if constexpr (kNext) {
    issue_scores(s, d, n + 1, acc);
    issue_pv_half<kHalf>(d, buf, slot, o);
    cute::warpgroup_wait<1>();  // the first half and S^T of page n + 1
    fence_accumulators(acc);
    FP8WS_TRACE(0, n + 1, 1);
    float alpha[4];
    page_softmax(s, p, n + 1, next_page, next_mask, cols, limit, acc, st, alpha, [](const float (&)[4]) {});
    rescale_blocks<0, kHalf>(o, alpha);
    cute::warpgroup_wait<0>();
    PageBarrier::arrive(&s.empty[buf]);
    FP8WS_TRACE(0, n, 3);
    rescale_blocks<kHalf, kHalf>(o, alpha);
  } else {
    issue_pv_half<kHalf>(d, buf, slot, o);
    cute::warpgroup_wait<0>();
    PageBarrier::arrive(&s.empty[buf]);
    FP8WS_TRACE(0, n, 3);
#pragma unroll
    for (int m = 0; m < T::kOutBlocks; ++m) fence_accumulators(o[m]);
  }
}

__device__ __forceinline__ void consume_overlapped(Plan& s, const DecodeParams& p, int part, int hk, int m_block) {
  const int tid = threadIdx.x;
  int cols[4];
  lane_query_rows(tid, cols);
  uint32_t n = 0;  // CTA page counter (the converters count the same way)
  const Descriptors d(s);

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int ps = seg.first_page, pe = seg.end_page;
    int limit[4], min_limit;
    float o[T::kOutBlocks][T::kScoreRegs];
    RowStats st;
    begin_segment(s, p, seg, hk, m_block, tid, cols, limit, min_limit, o, st);

    float acc[T::kScoreRegs];
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i) acc[i] = 0.f;
    if (ps < pe) {  // the segment's first page: its softmax overlaps nothing (O^T is still zero)
      issue_scores(s, d, n, acc);
      cute::warpgroup_wait<0>();
      FP8WS_TRACE(0, n, 1);
      fence_accumulators(acc);
      float alpha[4];
      page_softmax(s, p, n, ps, (ps + 1) * kPageSize > min_limit, cols, limit, acc, st, alpha,
                   [](const float (&)[4]) {});
    }
    for (int page = ps; page < pe; ++page, ++n) {
      if (page + 1 < pe)
        pv_and_next<true>(s, p, d, n, page + 1, (page + 2) * kPageSize > min_limit, cols, limit, o, acc, st);
      else
        pv_and_next<false>(s, p, d, n, 0, false, cols, limit, o, acc, st);
    }
    if (sched.last()) allow_dependent_launch();
    store_output(s, p, seg, hk, m_block, tid, o, cols, st.max, st.sum);
  }
}

}  // namespace fp8ws
}  // namespace kvpager
