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
#include "seesaw_fp8_layout.h"
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
  CUtensorMap q;     // bf16 / fp16 q, one 64-column tile of a row block a copy (encode_q_tensor_map)
  int q_by_tma;      // 0 (q does not suit a map, an FP8 cache, or switched off): Q by cp.async
};


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
constexpr int kRowsPerRound = 32 / 4;                      // a round: 8 rows x 4 lanes of 16 bytes
constexpr int kRounds = kPageSize / kRowsPerRound;         // 8
constexpr int kScaleRounds = kFp8TileBytes / (kRowsPerRound * kBlockRowBytes);  // 4: rounds >= 4 write over scales, not FP8

// One round of one lane: its 16 FP8 bytes x of `row` -> the row's bf16 chunks 2 chunk and
// 2 chunk + 1, scaled by the round's factor, the top half-word of f[3]; then f shifts up one
// half-word for the next round.
template <bool kFolded>
__device__ __forceinline__ void convert_round(char* slot, int row, int chunk, const uint4& x, uint32_t (&f)[kRounds / 2]) {
  const uint32_t factor2 = byte_perm(f[kRounds / 2 - 1], 0u, 0x3232u);
#pragma unroll
  for (int i = kRounds / 2 - 1; i > 0; --i) f[i] = byte_perm(f[i - 1], f[i], 0x5432u);  // (f[i] << 16) | (f[i-1] >> 16)
  f[0] <<= 16;
  const uint32_t words[4] = {x.x, x.y, x.z, x.w};
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) dequant_e4m3x4<kFolded>(words[j], factor2, w[2 * j], w[2 * j + 1]);
  char* dst = slot + bf16_row_offset(row);
  *reinterpret_cast<uint4*>(dst + bf16_chunk_offset(row, 2 * chunk)) = make_uint4(w[0], w[1], w[2], w[3]);
  *reinterpret_cast<uint4*>(dst + bf16_chunk_offset(row, 2 * chunk + 1)) = make_uint4(w[4], w[5], w[6], w[7]);
}

// One warp, one tile in place, R = T::kConverterRounds rounds an iteration (their loads before
// their conversions: more in flight, more registers). Lane l converts row 8k + l / 4, bytes
// 16 (l % 4) .. + 15 in round k, rounds from 7 down to 0: round k writes bf16 rows 8k..8k+7 = bytes
// [1024k, 1024k + 1024), i.e. FP8 rows 16k..16k+15 when k < 4, which rounds 2k and 2k + 1 read -
// rounds of this iteration or earlier ones, so a __syncwarp between an iteration's loads and its
// writes is all the ordering needed. Rounds >= 4 write over the scales (read before).
// factors[k / 2] holds round k's factor (dequant_factor, bf16) in its low (k even) or high half.
template <bool kFolded>
__device__ __forceinline__ void convert_tile_rows(char* slot, const uint32_t (&factors)[kRounds / 2], int lane) {
  constexpr int R = T::kConverterRounds;
  static_assert(kRounds % R == 0, "iterations split the rounds evenly");
  const int chunk = converter_chunk(lane);  // FP8 chunk = bf16 chunks 2 chunk, 2 chunk + 1 of the row
  // Not unrolled across iterations (the converter's registers are few); the factors shift up one
  // half-word a round instead of being indexed.
  uint32_t f[kRounds / 2] = {factors[0], factors[1], factors[2], factors[3]};
#pragma unroll 1
  for (int k0 = kRounds - 1; k0 >= 0; k0 -= R) {
    uint4 x[R];
#pragma unroll
    for (int r = 0; r < R; ++r) x[r] = *reinterpret_cast<const uint4*>(slot + fp8_src_offset(round_row(k0 - r, lane), chunk));
    if (k0 - R + 1 < kScaleRounds) __syncwarp();
#pragma unroll
    for (int r = 0; r < R; ++r) convert_round<kFolded>(slot, round_row(k0 - r, lane), chunk, x[r], f);
  }
}

// This lane's rows' scales (round_row(k, lane)) for scale group `group`, packed as bf16 factors: round
// k's in the low (k even) or high half of factors[k / 2]; `scales` = tile `first`'s slot + kFp8TileBytes
// (fp8_scale_offset's layout).
// Two passes over shared memory (the warp's vote on folding comes between) keep registers low.
template <bool kFolded>
__device__ __forceinline__ void pack_factors(const char* scales, int group, int lane, uint32_t (&factors)[kRounds / 2]) {
#pragma unroll
  for (int i = 0; i < kRounds / 2; ++i) {
    // Rows round_row(2 i, lane) and, 8 rows (32 floats) further, round_row(2 i + 1, lane).
    const float* row = reinterpret_cast<const float*>(scales + round_row(2 * i, lane) * kFp8ScaleRowBytes);
    const uint32_t lo = dequant_factor<kFolded>(row[group]) & 0xFFFFu;
    const uint32_t hi = dequant_factor<kFolded>(row[kRowsPerRound * 4 + group]) << 16;
    factors[i] = lo | hi;
  }
}

// Converter warp `warp`: tile first + warp of buffer `buf` (its load's parity `phase`). The scales
// came with tile `first`; warp 0 overwrites them, so all four warps meet once they have read theirs
// (a full barrier: with arrive-only, warps 1-3 could run a group ahead and complete it without warp 0).
__device__ __forceinline__ void convert_group(Plan& s, int buf, int first, uint32_t phase, int warp, int lane,
                                              seesaw::ConverterTrace& tr, int step) {
  const int tile = first + warp;
  TileBarrier::wait(&s.tile_ready[buf][first], phase);
  SEESAW_TRACE(tr, seesaw::kEvCvLanded + step);
  if (warp != 0) TileBarrier::wait(&s.tile_ready[buf][tile], phase);
  const char* scales = s.page[buf][first] + kFp8TileBytes;
  const int group = fp8_scale_group(tile);
  bool folds = true;
#pragma unroll
  for (int k = 0; k < kRounds; ++k)
    folds &= fp8_scale_folds(
        *reinterpret_cast<const float*>(scales + round_row(k, lane) * kFp8ScaleRowBytes + group * 4));
  folds = __all_sync(0xffffffffu, folds);
  uint32_t factors[kRounds / 2];
  if (folds)
    pack_factors<true>(scales, group, lane, factors);
  else
    pack_factors<false>(scales, group, lane, factors);
  cutlass::arch::NamedBarrier::arrive_and_wait(T::kConverterThreads, T::kConverterSync);
  char* slot = s.page[buf][tile];
  if (folds)
    convert_tile_rows<true>(slot, factors, lane);
  else
    convert_tile_rows<false>(slot, factors, lane);
  fence_async_proxy();  // generic-proxy stores -> visible to the S and P V wgmmas
  TileBarrier::arrive(&s.converted[buf][tile]);
}

// The converter warpgroup's whole life: every page of every segment of this CTA's part, in the
// consumers' order (pages alternate buffers from each segment's first page). One group a loop
// iteration, not four inlined calls (the converter's registers are few).
__device__ __forceinline__ void run_converter(Plan& s, const DecodeParams& p, int part, int warp, int lane) {
  seesaw::ConverterTrace tr;
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
