// The FP8 converter's batched variant (on trial since s17, compile-time switch
// KVPAGER_FP8_CONVERT_BATCH=1|2|4, traits.h; 0, the default, keeps seesaw_fp8.cuh's per-warp tiles).
// Not yet run on a GPU: docs/fp8-cache.md ("s17 run 4") has the prediction and why it exists.
#pragma once
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "fp8_dequant.cuh"
#include "seesaw_fp8_layout.h"
#include "seesaw_trace.cuh"
#include "tile_ops.h"
#include "tma.cuh"
#include "traits.h"

namespace kvpager {
namespace seesaw_fp8 {

using T = SeesawTraits;
using Plan = T::SharedMemoryPlan;

constexpr int kTilesPerBatch = T::kConverterBatch > 0 ? T::kConverterBatch : 1;  // tiles read (8 registers each) before one barrier
static_assert(T::kVTilesPerWg % kTilesPerBatch == 0, "batches split a group evenly");

// One lane's 16 FP8 bytes of a row -> that row's two bf16 chunks 2 chunk, 2 chunk + 1 (wgmma's
// 128-byte swizzle), one 16-byte store at a time (fewer live registers).
template <bool kFolded>
__device__ __forceinline__ void store_row(char* slot, int row, int chunk, const uint4& x, uint32_t factor2) {
  uint32_t w[4];
  dequant_e4m3x4<kFolded>(x.x, factor2, w[0], w[1]);
  dequant_e4m3x4<kFolded>(x.y, factor2, w[2], w[3]);
  *reinterpret_cast<uint4*>(slot + bf16_dst_offset(row, 2 * chunk)) = make_uint4(w[0], w[1], w[2], w[3]);
  dequant_e4m3x4<kFolded>(x.z, factor2, w[0], w[1]);
  dequant_e4m3x4<kFolded>(x.w, factor2, w[2], w[3]);
  *reinterpret_cast<uint4*>(slot + bf16_dst_offset(row, 2 * chunk + 1)) = make_uint4(w[0], w[1], w[2], w[3]);
}

// The 4-tile group [first, first + 4) of buffer `buf` (its load's parity `phase`), converted by all
// four converter warps together, kTilesPerBatch tiles at a time. Lane l of warp w converts rows
// batched_row(w, l, 0 / 1) = 16 w + l / 4 (+ 8) of each tile, FP8 chunk l % 4 (seesaw_fp8_layout.h). In place: a tile's bf16 rows overwrite
// FP8 rows that other warps read, so all 128 threads read a batch's FP8 bytes (and, in the first
// batch, their rows' scales, which sit behind tile `first`'s FP8 bytes) into registers before one
// named barrier, and write after it; then one proxy fence a thread and one arrival a warp on each
// tile's `converted` barrier. s16 had each warp convert one tile in 8 dependent rounds; s17's trace
// (docs/fp8-cache.md) showed the converter busy ~2,000 cycles a group either way, i.e. bound by the
// per-step latencies (load, barrier, fence, arrivals), which a batch pays once.
__device__ __forceinline__ void convert_group_batched(Plan& s, int buf, int first, uint32_t phase, int warp, int lane,
                                              seesaw::ConverterTrace& tr, int step) {
  const int chunk = converter_chunk(lane);
  const int rows[2] = {batched_row(warp, lane, 0), batched_row(warp, lane, 1)};
  TileBarrier::wait(&s.tile_ready[buf][first], phase);
  SEESAW_TRACE(tr, seesaw::kEvCvLanded + step);
  // Scale groups first / 2 (tiles first, first + 1) and first / 2 + 1 (the other two), per row.
  const char* first_slot = s.page[buf][first];
  const int group = fp8_scale_group(first);
  auto scale = [&](int r, int g) { return *reinterpret_cast<const float*>(first_slot + fp8_scale_offset(rows[r], g)); };
  const float s00 = scale(0, group), s01 = scale(0, group + 1), s10 = scale(1, group), s11 = scale(1, group + 1);
  const bool folds = __all_sync(0xffffffffu, fp8_scale_folds(s00) && fp8_scale_folds(s01) &&
                                                 fp8_scale_folds(s10) && fp8_scale_folds(s11));
  // factors[r]: row r's two groups as bf16 factors, the first in the low half.
  uint32_t factors[2];
  if (folds) {
    factors[0] = (dequant_factor<true>(s00) & 0xFFFFu) | (dequant_factor<true>(s01) << 16);
    factors[1] = (dequant_factor<true>(s10) & 0xFFFFu) | (dequant_factor<true>(s11) << 16);
  } else {
    factors[0] = (dequant_factor<false>(s00) & 0xFFFFu) | (dequant_factor<false>(s01) << 16);
    factors[1] = (dequant_factor<false>(s10) & 0xFFFFu) | (dequant_factor<false>(s11) << 16);
  }
#pragma unroll 1
  for (int batch = 0; batch < T::kVTilesPerWg; batch += kTilesPerBatch) {
    uint4 x[kTilesPerBatch][2];
#pragma unroll
    for (int i = 0; i < kTilesPerBatch; ++i) {
      const int t = batch + i;
      if (t > 0) TileBarrier::wait(&s.tile_ready[buf][first + t], phase);
      const char* slot = s.page[buf][first + t];
      x[i][0] = *reinterpret_cast<const uint4*>(slot + fp8_src_offset(rows[0], chunk));
      x[i][1] = *reinterpret_cast<const uint4*>(slot + fp8_src_offset(rows[1], chunk));
    }
    cutlass::arch::NamedBarrier::arrive_and_wait(T::kConverterThreads, T::kConverterSync);
#pragma unroll
    for (int i = 0; i < kTilesPerBatch; ++i) {
      const int t = batch + i;
      char* slot = s.page[buf][first + t];
      const uint32_t half = t < 2 ? 0x1010u : 0x3232u;  // the low or the high factor, in both halves
      const uint32_t f0 = byte_perm(factors[0], 0u, half), f1 = byte_perm(factors[1], 0u, half);
      if (folds) {
        store_row<true>(slot, rows[0], chunk, x[i][0], f0);
        store_row<true>(slot, rows[1], chunk, x[i][1], f1);
      } else {
        store_row<false>(slot, rows[0], chunk, x[i][0], f0);
        store_row<false>(slot, rows[1], chunk, x[i][1], f1);
      }
    }
    fence_async_proxy();  // this thread's generic-proxy stores -> visible to the S and P V wgmmas
    __syncwarp();         // ... and the warp's, before its one arrival (release) below
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kTilesPerBatch; ++i) TileBarrier::arrive(&s.converted[buf][first + batch + i]);
    }
  }
}

}  // namespace seesaw_fp8
}  // namespace kvpager
