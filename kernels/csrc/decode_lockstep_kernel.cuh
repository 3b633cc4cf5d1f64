// The 64-row MLA decode kernel on Hopper warpgroup MMAs (wgmma), for rows = s_q*h_q/h_kv > 32,
// where the kernel is compute-bound. Same schedule, pipeline and masking as the mma.sync kernel
// (decode_kernel.cuh); what changes is who multiplies:
//   two warpgroups; WG w computes S[:, 32w:32w+32] = Q K^T (wgmma 64x32x16, Q and K straight from
//   shared memory), the two exchange row maxima, write P to shared memory, and WG w accumulates
//   O[:, 256w:256w+256] += P V (wgmma 64x256x16; V is the same page read MN-major) in 128 fp32
//   registers a thread. The accumulator fragment matches mma.sync's per 8-column tile, so the
//   softmax and epilogue logic is the same.
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
#include "wgmma_ops.h"

namespace kvpager {

struct WgmmaShape {
  static constexpr int kBlockM = 64;
  static constexpr int kWarpgroups = 2;
  static constexpr int kKeysPerWg = kPageSize / kWarpgroups;    // 32
  static constexpr int kColsPerWg = kHeadDimV / kWarpgroups;    // 256
  static constexpr int kScoreRegs = kKeysPerWg / 2;             // 64x32 fp32 over 128 threads
  static constexpr int kOutRegs = kColsPerWg / 2;               // 64x256 fp32 over 128 threads
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemK = kSmemQ + kBlockM * kRowBytes;
  static constexpr int kSmemP = kSmemK + kNumPageBuffers * kPageBytes;
  static constexpr int kSmemRed = kSmemP + kBlockM * kBlockRowBytes;
  static constexpr int kSmemBytes = kSmemRed + kWarpgroups * kBlockM * 4 + 1024;  // + alignment
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

template <typename Elem>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_wgmma_kernel(const __grid_constant__ DecodeParams p) {
  using S = WgmmaShape;
  using Ops = GmmaOps<Elem>;
  extern __shared__ char smem_raw[];
  // wgmma's swizzle atoms must start on 1024-byte boundaries.
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  char* sQ = smem + S::kSmemQ;
  char* sK = smem + S::kSmemK;
  char* sP = smem + S::kSmemP;
  float* sRed = reinterpret_cast<float*>(smem + S::kSmemRed);

  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int wg = threadIdx.x / 128;
  const int warp_in_wg = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int my_row[2] = {warp_in_wg * 16 + g, warp_in_wg * 16 + g + 8};

  const PartWork work = part_work(p, part);

  const uint32_t q_base = smem_addr(sQ), k_base = smem_addr(sK), p_base = smem_addr(sP);
  constexpr uint32_t kAtomBytes = 8 * kBlockRowBytes;                  // 1024: 8 rows x 128 B
  constexpr uint32_t kQBlockBytes = S::kBlockM * kBlockRowBytes;       // 8192
  constexpr uint32_t kPageBlockBytes = kPageSize * kBlockRowBytes;     // 8192

  for (int b = work.begin_b; b <= work.end_b; ++b) {
    const Segment seg = segment_of(p, work, b);
    const int seqlen = seg.seqlen, ps = seg.first_page, pe = seg.end_page;

    cute::cp_async_wait<0>();
    __syncthreads();
    load_segment_start<Elem, S::kBlockM, BlockSwizzled>(p, sQ, sK, b, hk, m_block, ps, pe, seqlen);

    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_limit(p, seqlen, m_block * S::kBlockM + my_row[i]);
    const int min_limit = row_limit(p, seqlen, 0);  // query 0 sees the fewest keys

    float o[S::kOutRegs / 4][4];  // tile n: columns 256 wg + 8n + {2t, 2t+1} of rows g, g+8
    float(&o_flat)[S::kOutRegs] = reinterpret_cast<float(&)[S::kOutRegs]>(o);
#pragma unroll
    for (int i = 0; i < S::kOutRegs; ++i) o_flat[i] = 0.f;
    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
    float row_sum[2] = {0.f, 0.f};

    for (int pg = ps; pg < pe; ++pg) {
      cute::cp_async_wait<1>();
      fence_async_proxy();  // cp.async wrote through the generic proxy; wgmma reads via async
      __syncthreads();
      const int buf = (pg - ps) & 1;
      const uint32_t kbuf = k_base + buf * kPageBytes;

      // S = Q K^T for keys [32 wg, 32 wg + 32).
      float s[S::kScoreRegs];
#pragma unroll
      for (int i = 0; i < S::kScoreRegs; ++i) s[i] = 0.f;
      fence_accumulators(s);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
        const uint32_t k_off = (kk % 4) * 32;  // 16 halfs = 32 B into the 64-column block
        const uint64_t da = gmma_desc(q_base + (kk / 4) * kQBlockBytes + k_off, 16, kAtomBytes);
        const uint64_t db = gmma_desc(kbuf + (kk / 4) * kPageBlockBytes +
                                          wg * S::kKeysPerWg * kBlockRowBytes + k_off,
                                      16, kAtomBytes);
        gmma<typename Ops::ScoreMma>(da, db, s, kk > 0);
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_accumulators(s);

      const bool needs_mask = (pg + 1) * kPageSize > min_limit;
      float page_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
      for (int i = 0; i < S::kScoreRegs; ++i) {
        const int half = (i >> 1) & 1;
        float v = s[i] * p.scale_log2;
        if (needs_mask) {
          const int key = pg * kPageSize + wg * S::kKeysPerWg + (i >> 2) * kMmaN + 2 * t + (i & 1);
          if (key >= limit[half]) v = -CUDART_INF_F;
        }
        s[i] = v;
        page_max[half] = fmaxf(page_max[half], v);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        page_max[i] = quad_max(page_max[i]);
        if (t == 0) sRed[wg * S::kBlockM + my_row[i]] = page_max[i];
      }
      __syncthreads();
      float alpha[2], base[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m = fmaxf(row_max[i], fmaxf(sRed[my_row[i]], sRed[S::kBlockM + my_row[i]]));
        base[i] = m == -CUDART_INF_F ? 0.f : m;
        alpha[i] = exp2f(row_max[i] - base[i]);
        row_max[i] = m;
      }
      float page_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < S::kScoreRegs / 4; ++j)
        store_prob_tile<Elem>(sP, kBlockRowBytes, my_row, (wg * S::kKeysPerWg + j * kMmaN) / kChunkElems,
                              t, s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], base, page_sum);
#pragma unroll
      for (int i = 0; i < 2; ++i) row_sum[i] = row_sum[i] * alpha[i] + page_sum[i];
#pragma unroll
      for (int i = 0; i < S::kOutRegs; ++i) o_flat[i] *= alpha[(i >> 1) & 1];
      fence_async_proxy();  // P was written with plain stores; wgmma reads it next
      __syncthreads();

      // O[:, 256 wg : 256 wg + 256] += P V.
      fence_accumulators(o_flat);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kPageSize / kMmaK; ++kk) {
        const uint64_t da = gmma_desc(p_base + kk * 32, 16, kAtomBytes);
        const uint64_t db = gmma_desc(kbuf + wg * (S::kColsPerWg / kBlockCols) * kPageBlockBytes +
                                          kk * kMmaK * kBlockRowBytes,
                                      kPageBlockBytes, kAtomBytes);
        gmma<typename Ops::OutMma>(da, db, o_flat, true);
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_accumulators(o_flat);
      __syncthreads();
      if (pg + 2 < pe) load_page<Elem, BlockSwizzled>(p, sK + buf * kPageBytes, b, hk, pg + 2, seqlen);
      cute::cp_async_fence();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = quad_sum(row_sum[i]);
      if (t == 0) sRed[wg * S::kBlockM + my_row[i]] = sum;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i)
      write_row<Elem>(p, b, hk, m_block * S::kBlockM + my_row[i], i, o, row_max[i],
                      sRed[my_row[i]] + sRed[S::kBlockM + my_row[i]], wg * S::kColsPerWg + 2 * t,
                      wg == 0 && t == 0, seg.num_splits, seg.split_slot);
  }
}

}  // namespace kvpager
