// The FP8 ws kernel's consumer with page n + 1's softmax beside page n's PV product
// (KVPAGER_FP8_WS_OVERLAP=1, Fp8WsTraits::kOverlapSoftmax; on trial since s21, docs/fp8-cache.md).
// Not a standalone header: decode_fp8_ws_kernel.cuh includes it after the consumer pieces it reuses
// (Descriptors, issue_scores, col_slot, store_output, consumer_sync).
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

// What a consumer lane keeps of the segment's online softmax (per query row = S^T column, by col_slot).
struct RowStats {
  float max[4], sum[4];
};

// Online softmax over page `page`'s scores (acc = S^T, CTA page n): P -> ring slot n % 2 (K-major B
// of the PV product, 128-byte swizzle), the running max and sum updated; returns in alpha the factor
// that O^T must be rescaled by before this page's PV product.
__device__ __forceinline__ void page_softmax(Plan& s, const DecodeParams& p, uint32_t n, int page, bool mask,
                                             const int (&cols)[4], const int (&limit)[4], float (&acc)[T::kScoreRegs],
                                             RowStats& st, float (&alpha)[4]) {
  const int tid = threadIdx.x, warp = tid / 32, g = (tid % 32) / 4;
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
  float base[4], sum[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float m = st.max[c];
#pragma unroll
    for (int w = 0; w < 4; ++w) m = fmaxf(m, s.row_exchange[w][cols[c]]);
    base[c] = m == -CUDART_INF_F ? 0.f : m;
    alpha[c] = exp2f(st.max[c] - base[c]);
    st.max[c] = m;
    sum[c] = 0.f;
  }
  char* pt = s.p[n % T::kPBuffers];
#pragma unroll
  for (int i = 0; i < T::kScoreRegs; ++i) {
    const float e = exp2f(acc[i] - base[col_slot(i)]);
    sum[col_slot(i)] += e;
    const int key = warp * 16 + g + 8 * ((i >> 1) & 1), row = cols[col_slot(i)];
    *reinterpret_cast<Bf16*>(pt + row * kBlockRowBytes + (((key / 8) ^ (row & 7)) * kChunkBytes) + (key % 8) * 2) =
        __float2bfloat16_rn(e);
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) st.sum[c] = st.sum[c] * alpha[c] + sum[c];
  fence_async_proxy();
  FP8WS_TRACE(0, n, 5);
  consumer_sync();  // P complete (and the row maxima read: row_exchange may be rewritten)
  FP8WS_TRACE(0, n, 2);
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
    page_softmax(s, p, n + 1, next_page, next_mask, cols, limit, acc, st, alpha);
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
  const int tid = threadIdx.x, t = (tid % 32) % 4;
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
    RowStats st;
#pragma unroll
    for (int c = 0; c < 4; ++c) st.max[c] = -CUDART_INF_F, st.sum[c] = 0.f;

    float acc[T::kScoreRegs];
#pragma unroll
    for (int i = 0; i < T::kScoreRegs; ++i) acc[i] = 0.f;
    if (ps < pe) {  // the segment's first page: its softmax overlaps nothing (O^T is still zero)
      issue_scores(s, d, n, acc);
      cute::warpgroup_wait<0>();
      FP8WS_TRACE(0, n, 1);
      fence_accumulators(acc);
      float alpha[4];
      page_softmax(s, p, n, ps, (ps + 1) * kPageSize > min_limit, cols, limit, acc, st, alpha);
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
