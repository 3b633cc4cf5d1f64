// The lockstep 64-row MLA decode kernel on wgmma (the v2-v6 path; the seesaw kernel replaces it
// by default, and it stays selectable with KVPAGER_MLA_KERNEL=lockstep for side-by-side runs).
// Same schedule, pipeline and masking as the mma.sync kernel (decode_kernel.cuh); what changes is
// who multiplies:
//   two warpgroups; WG w computes S[:, 32w:32w+32] = Q K^T (wgmma 64x32x16, Q and K straight from
//   shared memory), the two exchange row maxima, write P to shared memory, and WG w accumulates
//   O[:, 256w:256w+256] += P V (wgmma 64x256x16; V is the same page read MN-major) in 128 fp32
//   registers a thread. S, softmax and P V run in lockstep: the tensor cores idle during softmax.
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
#include "wgmma_ops.h"

namespace kvpager {

template <typename Elem>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_lockstep_kernel(const __grid_constant__ DecodeParams p) {
  using S = LockstepTraits;
  using Ops = GmmaOps<Elem>;
  extern __shared__ char smem_raw[];
  auto& plan = aligned_plan<S::SharedMemoryPlan>(smem_raw);
  char* sQ = plan.q;
  char* sK = plan.page[0];
  char* sP = plan.p;

  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int wg = threadIdx.x / 128;
  const int warp_in_wg = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int my_row[2] = {warp_in_wg * 16 + g, warp_in_wg * 16 + g + 8};

  const uint32_t q_base = smem_addr(sQ), k_base = smem_addr(sK), p_base = smem_addr(sP);
  constexpr uint32_t kQBlockBytes = S::kBlockM * kBlockRowBytes;  // 8192

  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int b = seg.b, seqlen = seg.seqlen, ps = seg.first_page, pe = seg.end_page;

    cute::cp_async_wait<0>();
    __syncthreads();
    load_segment_start<Elem, S::kBlockM, BlockSwizzled>(p, sQ, sK, b, hk, m_block, ps, pe, seqlen);

    int limit[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_limit(p, seqlen, m_block * S::kBlockM + my_row[i]);
    const int min_limit = row_limit(p, seqlen, m_block * S::kBlockM);  // the block's first row sees the fewest keys

    float o[S::kOutRegs];  // tile n: columns 256 wg + 8n + {2t, 2t+1} of rows g, g+8
#pragma unroll
    for (int i = 0; i < S::kOutRegs; ++i) o[i] = 0.f;
    OnlineSoftmax sm;
    sm.reset();

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
        const uint64_t da = k_major_desc(q_base + (kk / 4) * kQBlockBytes, kk % 4);
        const uint64_t db = k_major_desc(kbuf + (kk / 4) * kPageTileBytes + wg * S::kKeysPerWg * kBlockRowBytes, kk % 4);
        gmma<typename Ops::ScoreMma>(da, db, s, kk > 0);
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_accumulators(s);

      float page_max[2], alpha[2], base[2];
      OnlineSoftmax::to_log2(s, p.scale_log2, (pg + 1) * kPageSize > min_limit,
                             pg * kPageSize + wg * S::kKeysPerWg, t, limit, page_max);
      cta_row_max(plan.row_exchange, wg, S::kWarpgroups, S::kBlockM, my_row, t, page_max);
      sm.advance(page_max, alpha, base);
      sm.exponentiate(s, base, alpha);
      uint32_t packed[S::kScoreRegs / 2];
      const float one[2] = {1.f, 1.f};
      pack_fragment<Elem>(s, packed, one);
      store_packed(sP, kBlockRowBytes, my_row, wg * S::kKeysPerWg / kChunkElems, t, packed);
      OnlineSoftmax::rescale(o, alpha);
      fence_async_proxy();  // P was written with plain stores; wgmma reads it next
      __syncthreads();

      // O[:, 256 wg : 256 wg + 256] += P V.
      fence_accumulators(o);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kPageSize / kMmaK; ++kk)
        gmma<typename Ops::OutMma>(k_major_desc(p_base, kk), v_desc(kbuf, wg * (S::kColsPerWg / kBlockCols), kk),
                                   o, true);
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_accumulators(o);
      __syncthreads();
      if (pg + 2 < pe) load_page<Elem, BlockSwizzled>(p, sK + buf * kPageBytes, b, hk, pg + 2, seqlen);
      cute::cp_async_fence();
    }

    if (sched.last()) allow_dependent_launch();

    float total[2];
    cta_row_sum(plan.row_exchange, wg, S::kWarpgroups, S::kBlockM, my_row, t, sm.row_sum, total);
    float(&o_tiles)[S::kOutRegs / 4][4] = reinterpret_cast<float(&)[S::kOutRegs / 4][4]>(o);
#pragma unroll
    for (int i = 0; i < 2; ++i)
      write_row<Elem>(p, b, hk, m_block * S::kBlockM + my_row[i], i, o_tiles, sm.row_max[i], total[i],
                      wg * S::kColsPerWg + 2 * t, wg == 0 && t == 0, seg.num_splits, seg.split_slot);
  }
}

}  // namespace kvpager
