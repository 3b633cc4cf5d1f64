// The fused FP8 split-KV MLA decode kernel on mma.sync, for 16- and 32-row blocks (rows = s_q * h_q
// / h_kv <= 32: memory-bound, where reading 656 instead of 1152 bytes a token pays most). Same tile
// scheduler, online softmax, epilogue and combine kernel as the bf16 kernel (decode_kernel.cuh); q
// and out are bf16, the MMAs bf16 with fp32 accumulation. The dequantized page exists only in
// registers: no bf16 copy in shared or global memory.
//
// Per page (Fp8Traits has the roles and stages, fp8_lane.h the fragment map):
//  1. cp.async has staged the page's 656-byte rows (zero-filled past the sequence end), up to
//     kStages pages ahead.
//  2. Feature role: warp w dequantizes latent features [64w, 64w + 64) of all 64 keys into
//     registers, already in the B layout of S = Q K^T (fp8_dequant.cuh), and computes S's split-K
//     partial over them, plus the 64 RoPE columns for key tile w. Partials -> shared memory.
//  3. Barrier: the staging buffer is free; page p + kStages starts streaming into it.
//  4. Softmax role (the bf16 kernel's rows x keys split): sum the 8 + 1 partials, online softmax,
//     P -> shared memory, each row's rescale factor -> shared memory. Barrier.
//  5. Feature role: O[:, 64w : 64w + 64] = O * alpha + P V, V = the same registers transposed by
//     movmatrix (the 512 latent columns are V; RoPE is not).
// Barriers per page: 4 (page landed, partials written, the row max exchange, P written).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <type_traits>

#include "config.h"
#include "epilogue.cuh"
#include "fp8_dequant.cuh"
#include "fp8_lane.h"
#include "params.h"
#include "softmax.cuh"
#include "tile_loads.cuh"
#include "tile_scheduler.cuh"
#include "tile_ops.h"
#include "traits.h"

namespace kvpager {

namespace fp8 {

using Bf16 = __nv_bfloat16;

// An 8x8 matrix of 16-bit values held as a fragment (lane: row lane / 4, columns 2 (lane % 4) + {0,
// 1}) -> the same fragment of its transpose.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Four 32-bit words from 16 bytes of shared memory (one LDS.128) into w[0..3].
__device__ __forceinline__ void load_words(const char* src, uint32_t* w) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}

// 4-byte global -> shared copy, zero-filling the destination when `valid` is false.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
  using Atom = cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>;
  Atom::copy(*reinterpret_cast<const uint32_t*>(gmem_src), *reinterpret_cast<uint32_t*>(smem_dst), valid);
}

// The Q rows of row block m_block of (sequence b, kv head hk) in A-fragment order (q_frag), so
// that every k-step's fragment is one 16-byte read. Rows past the last query are zero-filled.
// Thread -> (lane, word) is fixed (kThreads is a multiple of 128), so each thread resolves its
// source row once per row group.
template <typename F>
__device__ __forceinline__ void load_q_fragments(const DecodeParams& p, typename F::SharedMemoryPlan& plan, int b,
                                                 int hk, int m_block) {
  static_assert(kThreads % 128 == 0, "a thread keeps its (lane, word) across k-steps");
  const int lane = (threadIdx.x / 4) % 32, word = threadIdx.x % 4;
  const Fp8Lane ln = Fp8Lane::of(0, lane);
  const Bf16* q = static_cast<const Bf16*>(p.q);
#pragma unroll
  for (int rg = 0; rg < F::kRowGroups; ++rg) {
    const int mrow = m_block * F::kBlockM + rg * kMmaM + ln.q_row(word);
    const bool valid = mrow < p.rows;
    const int s = valid ? mrow / p.groups : 0;
    const int g = valid ? mrow % p.groups : 0;
    const Bf16* src = q + b * p.q_batch_stride + s * p.q_seq_stride + int64_t(hk * p.groups + g) * p.q_head_stride;
    uint32_t* dst = reinterpret_cast<uint32_t*>(&plan.q_frag[rg][0][lane]) + word;
    for (int step = threadIdx.x / 128; step < Fp8Lane::kSteps; step += kThreads / 128)
      cp_async_4(dst + step * 32 * 4, src + ln.q_col(step, word), valid);
  }
}

// One thread's share of the cp.async copies of page `page` of the segment into a staging buffer
// (rows of kFp8SmemRowBytes). Rows past the sequence end are zero-filled and never read from the
// pool: they dequantize to 0 (scale 0), so NaN in unused slots cannot meet P = 0 in P V.
__device__ __forceinline__ void load_page(const DecodeParams& p, char* dst, const Segment& seg, int hk, int page) {
  const int page_id = seg.block_table[page];
#ifdef KVPAGER_DEBUG
  assert(page_id >= 0 && page_id < p.num_pages);
#endif
  const uint8_t* base = static_cast<const uint8_t*>(p.k_cache) + int64_t(page_id) * p.k_page_stride +
                        int64_t(hk) * p.k_head_stride;
  const int valid_rows = seg.valid_rows(page);
  for (int c = threadIdx.x; c < kPageSize * kFp8ChunksPerRow; c += kThreads) {
    const int r = c / kFp8ChunksPerRow, chunk = c % kFp8ChunksPerRow;
    const bool valid = r < valid_rows;
    cp_async_16(dst + r * kFp8SmemRowBytes + chunk * kChunkBytes,
                base + int64_t(valid ? r : 0) * p.k_token_stride + chunk * kChunkBytes, valid);
  }
}

// Feature role, step 2: this warp's latent block of every key, dequantized (kv[n] = key tile n).
// When every scale the warp meets on this page is at most 2^7 (a warp-uniform vote; in practice
// always) the 2^120 and the scale fold into one multiply.
template <int kKeyTiles, int kWords>
__device__ __forceinline__ void dequant_block(const char* raw, const Fp8Lane& ln, uint32_t (&kv)[kKeyTiles][kWords]) {
  float scale[kKeyTiles];
  bool folds = true;
#pragma unroll
  for (int n = 0; n < kKeyTiles; ++n) {
    scale[n] = *reinterpret_cast<const float*>(raw + ln.key_row(n) * kFp8SmemRowBytes + ln.scale_byte());
    folds = folds && fp8_scale_folds(scale[n]);
  }
  auto convert = [&](auto folded) {
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      uint32_t x[4];
      load_words(raw + ln.key_row(n) * kFp8SmemRowBytes + ln.latent_byte(), x);
      dequant_16<decltype(folded)::value>(x, scale[n], kv[n]);
    }
  };
  if (__all_sync(0xffffffffu, folds))
    convert(std::true_type{});
  else
    convert(std::false_type{});
}

// A 16 x 8 fp32 accumulator fragment (d0..d3) into a row-major [16][8] tile.
__device__ __forceinline__ void store_tile_fragment(float* tile, const Fp8Lane& ln, const float* d) {
  *reinterpret_cast<float2*>(tile + ln.g * kMmaN + 2 * ln.t) = make_float2(d[0], d[1]);
  *reinterpret_cast<float2*>(tile + (ln.g + 8) * kMmaN + 2 * ln.t) = make_float2(d[2], d[3]);
}

// Feature role, step 2: S's partials for the 16 rows of row group rg: over this warp's latent
// block into s_part[warp][rg], over the RoPE columns of key tile `warp` (rope_k) into s_rope[rg].
// Float2 stores: 16 lanes write 128 contiguous bytes (no bank conflict).
template <typename F>
__device__ __forceinline__ void score_partial(typename F::SharedMemoryPlan& plan, const Fp8Lane& ln, int lane, int rg,
                                              const uint32_t (&kv)[F::kKeyTiles][F::kKvWords],
                                              const uint32_t (&rope_k)[Fp8Lane::kRopeReads][4]) {
  float s[F::kKeyTiles * 4];
#pragma unroll
  for (int i = 0; i < F::kKeyTiles * 4; ++i) s[i] = 0.f;
#pragma unroll
  for (int step = 0; step < Fp8Lane::kLaneSteps; ++step) {
    uint32_t a[4];
    load_words(reinterpret_cast<const char*>(&plan.q_frag[rg][Fp8Lane::latent_step(ln.warp, step)][lane]), a);
#pragma unroll
    for (int n = 0; n < F::kKeyTiles; ++n) {
      uint32_t b[2];
      k_step_b(step, kv[n], b);
      mma_16x8x16<Bf16>(s, n, a, b[0], b[1]);
    }
  }
  float r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < Fp8Lane::kRopeReads; ++j)
#pragma unroll
    for (int step = 0; step < Fp8Lane::kRopeSteps; ++step) {
      uint32_t a[4], b[2];
      load_words(reinterpret_cast<const char*>(&plan.q_frag[rg][Fp8Lane::rope_step(j, step)][lane]), a);
      k_step_b(step, rope_k[j], b);
      mma_16x8x16<Bf16>(r, 0, a, b[0], b[1]);
    }

#pragma unroll
  for (int n = 0; n < F::kKeyTiles; ++n) store_tile_fragment(plan.s_part[ln.warp][rg][n], ln, &s[4 * n]);
  store_tile_fragment(plan.s_rope[rg][ln.warp], ln, r);
}

// Softmax role, step 4: this warp's S fragment (rows of row group rg, key tiles cg * kKeyTiles + j)
// as the sum of the 8 latent partials and the RoPE partial, in the bf16 kernel's fragment layout.
template <typename F>
__device__ __forceinline__ void reduce_scores(const typename F::SharedMemoryPlan& plan, int rg, int cg, int g, int t,
                                              float (&s)[F::Softmax::kKeyTiles * 4]) {
#pragma unroll
  for (int j = 0; j < F::Softmax::kKeyTiles; ++j) {
    const int n = cg * F::Softmax::kKeyTiles + j;
    float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w <= kNumWarps; ++w) {
      const float* tile = w < kNumWarps ? plan.s_part[w][rg][n] : plan.s_rope[rg][n];
      const float2 a = *reinterpret_cast<const float2*>(tile + g * kMmaN + 2 * t);
      const float2 b = *reinterpret_cast<const float2*>(tile + (g + 8) * kMmaN + 2 * t);
      lo.x += a.x;
      lo.y += a.y;
      hi.x += b.x;
      hi.y += b.y;
    }
    s[4 * j] = lo.x;
    s[4 * j + 1] = lo.y;
    s[4 * j + 2] = hi.x;
    s[4 * j + 3] = hi.y;
  }
}

// Feature role, step 5: O[rg] = O[rg] * alpha + P V over this warp's 64 columns (out_col), V from kv.
template <typename F>
__device__ __forceinline__ void accumulate_pv(const typename F::SharedMemoryPlan& plan, const Fp8Lane& ln, int lane,
                                              const uint32_t (&kv)[F::kKeyTiles][F::kKvWords],
                                              float (&o)[F::kRowGroups][F::kOutTiles * 4]) {
#pragma unroll
  for (int rg = 0; rg < F::kRowGroups; ++rg) {
    const float alpha[2] = {plan.row_alpha[rg * kMmaM + ln.g], plan.row_alpha[rg * kMmaM + ln.g + 8]};
    OnlineSoftmax::rescale(o[rg], alpha);
  }
  const uint32_t p_base = smem_addr(plan.p);
#pragma unroll
  for (int step = 0; step < kPageSize / kMmaK; ++step) {
    uint32_t a[F::kRowGroups][4];
#pragma unroll
    for (int rg = 0; rg < F::kRowGroups; ++rg)
      ldsm_x4(p_base + swizzled(rg * kMmaM + lane % 16, step * 2 + lane / 16, F::Softmax::kPRowBytes), a[rg]);
#pragma unroll
    for (int k = 0; k < F::kOutTiles; ++k) {
      const uint32_t b0 = movmatrix_trans(kv[2 * step][k]);      // keys 16 step + 0..7
      const uint32_t b1 = movmatrix_trans(kv[2 * step + 1][k]);  // keys 16 step + 8..15
#pragma unroll
      for (int rg = 0; rg < F::kRowGroups; ++rg) mma_16x8x16<Bf16>(o[rg], k, a[rg], b0, b1);
    }
  }
}

}  // namespace fp8

template <int BLOCK_M>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_fp8_kernel(const __grid_constant__ DecodeParams p) {
  using F = Fp8Traits<BLOCK_M>;
  using S = typename F::Softmax;
  using Bf16 = fp8::Bf16;
  extern __shared__ __align__(1024) char smem[];
  auto& plan = *reinterpret_cast<typename F::SharedMemoryPlan*>(smem);

  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const Fp8Lane ln = Fp8Lane::of(warp, lane);                   // feature role
  const int rg = warp / S::kColGroups, cg = warp % S::kColGroups;  // softmax role
  const int my_row[2] = {rg * kMmaM + g, rg * kMmaM + g + 8};

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int ps = seg.first_page, pe = seg.end_page;

    cute::cp_async_wait<0>();
    __syncthreads();  // the previous segment is done with every buffer
    // Q, then the first kStages pages: 1 + kStages cp.async groups (empty where a page does not
    // exist), so the page loop can always wait for "all but the newest kStages - 1 groups".
    fp8::load_q_fragments<F>(p, plan, seg.b, hk, m_block);
    cute::cp_async_fence();
#pragma unroll
    for (int i = 0; i < F::kStages; ++i) {
      if (ps + i < pe) fp8::load_page(p, plan.raw[i], seg, hk, ps + i);
      cute::cp_async_fence();
    }

    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_limit(p, seg.seqlen, m_block * BLOCK_M + my_row[i]);
    const int min_limit = row_limit(p, seg.seqlen, m_block * BLOCK_M);

    float o[F::kRowGroups][F::kOutTiles * 4];
#pragma unroll
    for (int r = 0; r < F::kRowGroups; ++r)
#pragma unroll
      for (int n = 0; n < F::kOutTiles * 4; ++n) o[r][n] = 0.f;
    OnlineSoftmax sm;
    sm.reset();

    int stage = 0;  // (pg - ps) % kStages
    for (int pg = ps; pg < pe; ++pg, stage = stage + 1 == F::kStages ? 0 : stage + 1) {
      cute::cp_async_wait<F::kStages - 1>();
      __syncthreads();  // page pg (and Q) landed for every thread's copies
      char* raw = plan.raw[stage];

      // ---- feature role: dequantize, S partials ----
      uint32_t kv[F::kKeyTiles][F::kKvWords];
      fp8::dequant_block(raw, ln, kv);
      uint32_t rope_k[Fp8Lane::kRopeReads][4];
#pragma unroll
      for (int j = 0; j < Fp8Lane::kRopeReads; ++j)
        fp8::load_words(raw + ln.rope_row() * kFp8SmemRowBytes + ln.rope_byte(j), rope_k[j]);
#pragma unroll
      for (int r = 0; r < F::kRowGroups; ++r) fp8::score_partial<F>(plan, ln, lane, r, kv, rope_k);
      __syncthreads();  // partials complete; every read of this staging buffer is done: refill it
      if (pg + F::kStages < pe) fp8::load_page(p, raw, seg, hk, pg + F::kStages);
      cute::cp_async_fence();

      // ---- softmax role (as in the bf16 kernel) ----
      float s[S::kKeyTiles * 4];
      fp8::reduce_scores<F>(plan, rg, cg, g, t, s);
      float page_max[2], alpha[2], base[2];
      OnlineSoftmax::to_log2(s, p.scale_log2, (pg + 1) * kPageSize > min_limit,
                             pg * kPageSize + cg * S::kKeysPerWarp, t, limit, page_max);
      cta_row_max(plan.row_exchange, cg, S::kColGroups, BLOCK_M, my_row, t, page_max);
      sm.advance(page_max, alpha, base);
      sm.exponentiate(s, base, alpha);
      uint32_t packed[S::kKeyTiles * 2];
      const float one[2] = {1.f, 1.f};
      pack_fragment<Bf16>(s, packed, one);
      store_packed(plan.p, S::kPRowBytes, my_row, cg * S::kKeysPerWarp / kChunkElems, t, packed);
      if (cg == 0 && t == 0) {
        plan.row_alpha[my_row[0]] = alpha[0];
        plan.row_alpha[my_row[1]] = alpha[1];
      }
      __syncthreads();  // P and the rescale factors complete

      // ---- feature role: O = O * alpha + P V ----
      fp8::accumulate_pv<F>(plan, ln, lane, kv, o);
    }

    if (sched.last()) allow_dependent_launch();

    // ---- epilogue: row sums in the softmax role, handed to the feature role, which writes O ----
    float total[2];
    cta_row_sum(plan.row_exchange, cg, S::kColGroups, BLOCK_M, my_row, t, sm.row_sum, total);
    if (cg == 0 && t == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        plan.row_max[my_row[i]] = sm.row_max[i];
        plan.row_sum[my_row[i]] = total[i];
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < F::kRowGroups; ++r) {
      float(&o_tiles)[F::kOutTiles][4] = reinterpret_cast<float(&)[F::kOutTiles][4]>(o[r]);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = r * kMmaM + g + 8 * i;
        write_row<Bf16, F::kOutTiles, F::kOutTileCols>(p, seg.b, hk, m_block * BLOCK_M + row, i, o_tiles,
                                                      plan.row_max[row], plan.row_sum[row], ln.out_col(0),
                                                      warp == 0 && t == 0, seg.num_splits, seg.split_slot);
      }
    }
  }
}

}  // namespace kvpager
