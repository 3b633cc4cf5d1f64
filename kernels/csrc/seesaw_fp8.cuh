// FP8 pages for the seesaw kernel (64-row blocks: h_q = 64 / 128 on kvpager.fp8's 656-byte rows;
// issue 14, docs/fp8-cache.md "64 query rows and more").
//
// The consumers (the seesaw's two warpgroups) see the same bf16 page tiles as on a bf16 cache. What
// differs is how a tile gets there:
//   - the RoPE tile (8) is bf16 in the cache: a TMA copy straight into its slot, as before;
//   - latent tile t (0-7): TMA copies its 64 x 64 FP8 bytes into the first half of slot t (and, for
//     t = 0 and 4, the page's scales behind them: [64 rows][4 floats] at byte 4096). A third
//     warpgroup, the converter, dequantizes them in place into the bf16 tile (wgmma's 128-byte
//     swizzle) and arrives on the tile's `converted` barrier, which is what the S GEMMs wait on.
// Tiles are still reloaded by the warpgroup that reads them last (the TMA copies are issued from
// the same refill points), so no "empty" barrier is needed: a slot is refilled only once its bf16
// tile is read, which is after the converter wrote it.
//
// The converter takes the 4-tile groups (0-3 refilled by WG0, 4-7 by WG1) in the order the refills
// happen: for a pair (buffer 0, buffer 1) groups 0-3 / 4-7 / 4-7 / 0-3; all four warps share each tile.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cutlass/arch/barrier.h>

#include "config.h"
#include "fp8_dequant.cuh"
#include "params.h"
#include "seesaw_trace.cuh"
#include "tile_ops.h"
#include "tile_scheduler.cuh"
#include "tma.cuh"
#include "traits.h"

namespace kvpager {

// The three tensor maps over the FP8 cache [num_pages, page rows, h_kv, 656] (bytes).
struct Fp8PageMaps {
  CUtensorMap latent;  // uint8 (512 latent bytes, tokens, h_kv, pages), boxes of 64 bytes x 64 tokens
  CUtensorMap scales;  // float32 at byte 512 (4 scales, tokens, h_kv, pages), boxes of 4 x 64
  CUtensorMap rope;    // bf16 at byte 528 (64 RoPE values, ...), boxes of 64 x 64, 128-byte swizzle
};

// Every map of the seesaw kernel, one kernel parameter (each CUtensorMap stays in parameter space).
struct SeesawMaps {
  CUtensorMap page;  // bf16 / fp16 cache: one 64 x 64 tile a copy
  Fp8PageMaps fp8;   // FP8 cache
};

constexpr int kFp8TileBytes = kPageSize * kBlockCols;        // 4096: a tile's FP8 bytes in its slot
constexpr int kFp8ScaleRowBytes = 4 * sizeof(float);         // a token's 4 scales
constexpr int kFp8PageScalesBytes = kPageSize * kFp8ScaleRowBytes;  // 1024, behind the FP8 bytes
static_assert(kFp8TileBytes + kFp8PageScalesBytes <= kPageTileBytes, "FP8 bytes and scales fit a slot");

// Needs num_pages >= 1, a 16-byte aligned cache and 16-byte multiple strides (the binding checks).
inline cudaError_t encode_fp8_page_maps(const DecodeParams& p, Fp8PageMaps* maps) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  // Strides in bytes (the cache is a byte tensor); a size-1 dim's stride is never used.
  const cuuint64_t token_stride = p.k_token_stride;
  const cuuint64_t head_stride = p.h_kv > 1 ? p.k_head_stride : kFp8TokenBytes;
  const cuuint64_t page_stride = p.num_pages > 1 ? p.k_page_stride : kPageSize * token_stride;
  const cuuint64_t strides[3] = {token_stride, head_stride, page_stride};
  const cuuint64_t h_kv = p.h_kv, pages = p.num_pages;
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const char* base = static_cast<const char*>(p.k_cache);
  auto map = [&](CUtensorMap* m, CUtensorMapDataType type, size_t offset, cuuint64_t width, cuuint32_t box_width,
                 CUtensorMapSwizzle swizzle) {
    const cuuint64_t dims[4] = {width, kPageSize, h_kv, pages};
    const cuuint32_t box[4] = {box_width, kPageSize, 1, 1};
    return encode(m, type, 4, const_cast<char*>(base + offset), dims, strides, box, elem_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  };
  const bool ok =
      map(&maps->latent, CU_TENSOR_MAP_DATA_TYPE_UINT8, 0, kHeadDimV, kBlockCols, CU_TENSOR_MAP_SWIZZLE_NONE) ==
          CUDA_SUCCESS &&
      map(&maps->scales, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, kFp8ScalesOffset, 4, 4, CU_TENSOR_MAP_SWIZZLE_NONE) ==
          CUDA_SUCCESS &&
      map(&maps->rope, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, kFp8RopeOffset, kRopeDim, kRopeDim,
          CU_TENSOR_MAP_SWIZZLE_128B) == CUDA_SUCCESS;
  return ok ? cudaSuccess : cudaErrorInvalidValue;
}

// One thread: tiles [first, last) of FP8 page `page_id` (kv head hk) into `tiles` (8 KB slots),
// tile c completing on ready[c]. A refill group's first tile (0, 4) brings the page's scales along.
__device__ __forceinline__ void load_fp8_page_tiles(const Fp8PageMaps& maps, uint64_t* ready, char* tiles,
                                                    int page_id, int hk, int first, int last, uint64_t cache_hint) {
#pragma unroll
  for (int c = first; c < last; ++c) {
    char* slot = tiles + c * kPageTileBytes;
    if (c == kColBlocks - 1) {
      TileBarrier::arrive_and_expect_tx(&ready[c], kPageTileBytes);
      cute::SM90_TMA_LOAD_4D::copy(&maps.rope, &ready[c], cache_hint, slot, 0, 0, hk, page_id);
      continue;
    }
    const bool scales = c % SeesawTraits::kVTilesPerWg == 0;
    TileBarrier::arrive_and_expect_tx(&ready[c], kFp8TileBytes + (scales ? kFp8PageScalesBytes : 0));
    cute::SM90_TMA_LOAD_4D::copy(&maps.latent, &ready[c], cache_hint, slot, c * kBlockCols, 0, hk, page_id);
    if (scales)
      cute::SM90_TMA_LOAD_4D::copy(&maps.scales, &ready[c], cache_hint, slot + kFp8TileBytes, 0, 0, hk, page_id);
  }
}

namespace seesaw_fp8 {

using T = SeesawTraits;
using Plan = T::SharedMemoryPlan;
constexpr int kRowsPerWarp = kPageSize / (T::kConverterThreads / 32);  // 16: rows 16 w .. 16 w + 15 of every tile
constexpr int kRowStep = 32 / 4;                                        // 8: a lane's second row
constexpr int kTilesPerBatch = T::kConverterBatch;  // tiles read (8 registers each) before one barrier
static_assert(T::kVTilesPerWg % kTilesPerBatch == 0, "batches split a group evenly");

// The converter's stamps (seesaw_trace.cuh): its first thread, in the traced CTA only.
struct ConverterTrace {
  bool trace = false;
  int trace_n = 0;
  int wg = 2;
};

// One lane's 16 FP8 bytes of a row -> that row's two bf16 chunks 2 chunk, 2 chunk + 1 (wgmma's
// 128-byte swizzle), one 16-byte store at a time (fewer live registers).
template <bool kFolded>
__device__ __forceinline__ void store_row(char* slot, int row, int chunk, const uint4& x, uint32_t factor2) {
  char* dst = slot + row * kBlockRowBytes;
  const int swz = row % 8;
  uint32_t w[4];
  dequant_e4m3x4<kFolded>(x.x, factor2, w[0], w[1]);
  dequant_e4m3x4<kFolded>(x.y, factor2, w[2], w[3]);
  *reinterpret_cast<uint4*>(dst + ((2 * chunk) ^ swz) * kChunkBytes) = make_uint4(w[0], w[1], w[2], w[3]);
  dequant_e4m3x4<kFolded>(x.z, factor2, w[0], w[1]);
  dequant_e4m3x4<kFolded>(x.w, factor2, w[2], w[3]);
  *reinterpret_cast<uint4*>(dst + ((2 * chunk + 1) ^ swz) * kChunkBytes) = make_uint4(w[0], w[1], w[2], w[3]);
}

// The 4-tile group [first, first + 4) of buffer `buf` (its load's parity `phase`), converted by all
// four converter warps together, kTilesPerBatch tiles at a time. Lane l of warp w converts rows
// 16 w + l / 4 and + 8 of each tile, bytes 16 (l % 4) .. + 15. In place: a tile's bf16 rows overwrite
// FP8 rows that other warps read, so all 128 threads read a batch's FP8 bytes (and, in the first
// batch, their rows' scales, which sit behind tile `first`'s FP8 bytes) into registers before one
// named barrier, and write after it; then one proxy fence a thread and one arrival a warp on each
// tile's `converted` barrier. s16 had each warp convert one tile in 8 dependent rounds; s17's trace
// (docs/fp8-cache.md) showed the converter busy ~2,000 cycles a group either way, i.e. bound by the
// per-step latencies (load, barrier, fence, arrivals), which a batch pays once.
__device__ __forceinline__ void convert_group(Plan& s, int buf, int first, uint32_t phase, int warp, int lane,
                                              ConverterTrace& tr, int step) {
  const int chunk = lane % 4;
  const int row0 = kRowsPerWarp * warp + lane / 4;
  TileBarrier::wait(&s.tile_ready[buf][first], phase);
  SEESAW_TRACE(tr, seesaw::kEvCvLanded + step);
  // Scale groups first / 2 (tiles first, first + 1) and first / 2 + 1 (the other two), per row.
  const float* scales = reinterpret_cast<const float*>(s.page[buf][first] + kFp8TileBytes);
  const int group = first * kBlockCols / kFp8GroupSize;
  const float s00 = scales[row0 * 4 + group], s01 = scales[row0 * 4 + group + 1];
  const float s10 = scales[(row0 + kRowStep) * 4 + group], s11 = scales[(row0 + kRowStep) * 4 + group + 1];
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
      x[i][0] = *reinterpret_cast<const uint4*>(slot + row0 * kBlockCols + chunk * kChunkBytes);
      x[i][1] = *reinterpret_cast<const uint4*>(slot + (row0 + kRowStep) * kBlockCols + chunk * kChunkBytes);
    }
    cutlass::arch::NamedBarrier::arrive_and_wait(T::kConverterThreads, T::kTileRead);
#pragma unroll
    for (int i = 0; i < kTilesPerBatch; ++i) {
      const int t = batch + i;
      char* slot = s.page[buf][first + t];
      const uint32_t half = t < 2 ? 0x1010u : 0x3232u;  // the low or the high factor, in both halves
      const uint32_t f0 = byte_perm(factors[0], 0u, half), f1 = byte_perm(factors[1], 0u, half);
      if (folds) {
        store_row<true>(slot, row0, chunk, x[i][0], f0);
        store_row<true>(slot, row0 + kRowStep, chunk, x[i][1], f1);
      } else {
        store_row<false>(slot, row0, chunk, x[i][0], f0);
        store_row<false>(slot, row0 + kRowStep, chunk, x[i][1], f1);
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

// The converter warpgroup's whole life: every page of every segment of this CTA's part, in the
// consumers' order (pages alternate buffers from each segment's first page). One group a loop
// iteration, not four inlined calls (the converter's registers are few).
__device__ __forceinline__ void run_converter(Plan& s, const DecodeParams& p, int part, int warp, int lane) {
  ConverterTrace tr;
#ifdef KVPAGER_TRACE
  tr.trace = blockIdx.x == 0 && part == p.num_parts / 2 && warp == 0 && lane == 0;
#endif
  SEESAW_TRACE(tr, seesaw::kEvStart);
  uint32_t phases = 0;  // bit b: parity of buffer b's next load
  for (TileScheduler sched(p, part); sched.valid(); sched.next()) {
    const Segment seg = sched.segment();
    const int pages = seg.end_page - seg.first_page;
    SEESAW_TRACE(tr, seesaw::kEvSegment);
    // A pair of pages is 4 groups: (buffer 0, tiles 0-3), (1, 4-7), (0, 4-7), (1, 0-3); a lone
    // last page 2: (0, 0-3), (0, 4-7).
#pragma unroll 1
    for (int g = 0; g < 2 * pages; ++g) {
      const int step = g % 4;
      const bool lone = 2 * (g / 4) + 1 == pages;
      const int buf = lone ? 0 : step % 2;
      const int first = (lone ? step == 1 : step == 1 || step == 2) ? T::kVTilesPerWg : 0;
      convert_group(s, buf, first, (phases >> buf) & 1, warp, lane, tr, step);
      SEESAW_TRACE(tr, seesaw::kEvCvDone + step);
      if (lone ? step == 1 : step >= 2) phases ^= 1u << buf;  // the buffer's page is done
    }
  }
}

}  // namespace seesaw_fp8
}  // namespace kvpager
