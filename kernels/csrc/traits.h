// Per-kernel traits: how the 8 warps share the work, and the named shared-memory plan of each
// decode kernel (a struct, so no byte offset is written by hand).
#pragma once
#include <cstdint>

#include "config.h"
#include "fp8_lane.h"

namespace kvpager {

// mma.sync kernel (16- and 32-row blocks): RowGroups x ColGroups warps; each warp owns 16 rows,
// KeysPerWarp keys of S and ColsPerWarp columns of O (its fp32 accumulator stays in registers).
template <int BLOCK_M>
struct MmaSyncTraits {
  static_assert(BLOCK_M == 16 || BLOCK_M == 32, "the mma.sync kernel takes 16- or 32-row blocks");
  static constexpr int kBlockM = BLOCK_M;
  static constexpr int kRowGroups = BLOCK_M / kMmaM;
  static constexpr int kColGroups = kNumWarps / kRowGroups;
  static constexpr int kKeysPerWarp = kPageSize / kColGroups;   // 8, 16
  static constexpr int kKeyTiles = kKeysPerWarp / kMmaN;        // 1, 2
  static constexpr int kColsPerWarp = kHeadDimV / kColGroups;   // 64, 128
  static constexpr int kOutTiles = kColsPerWarp / kMmaN;        // 8, 16
  static constexpr int kPRowBytes = kPageSize * 2;              // 128: P is BLOCK_M x 64 halfs

  // Rows of 1152 B with 16-byte chunks XORed by (row % 8): 128-byte alignment is enough.
  struct SharedMemoryPlan {
    alignas(128) char q[BLOCK_M * kRowBytes];
    alignas(128) char page[kNumPageBuffers][kPageBytes];
    alignas(128) char p[BLOCK_M * kPRowBytes];
    float row_exchange[kColGroups * BLOCK_M];  // per (col group, row): page maxima, then sums
  };
  static constexpr int kSmemBytes = sizeof(SharedMemoryPlan);
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory over the sm_90 per-block limit");
};

// The fused FP8 kernel (16- and 32-row blocks, decode_fp8_kernel.cuh). Two roles per warp:
//  - feature role: warp w owns latent features [64w, 64w + 64) (half a scale group) of every key of
//    the page. It dequantizes them into registers, computes S's split-K partial over them (plus the
//    RoPE depth for key tile w), and later O[:, 64w : 64w + 64] from the same registers as V.
//  - softmax role: MmaSyncTraits<BLOCK_M>'s rows x keys split, exactly as in the bf16 kernel.
template <int BLOCK_M>
struct Fp8Traits {
  using Softmax = MmaSyncTraits<BLOCK_M>;
  static constexpr int kBlockM = BLOCK_M;
  static constexpr int kRowGroups = BLOCK_M / kMmaM;                 // 1, 2
  static constexpr int kKeyTiles = kPageSize / kMmaN;                // 8: a warp covers every key
  static constexpr int kKvWords = kFp8LaneBytes / 2;                 // 8 bf16x2 words from a lane's 16 bytes
  static constexpr int kOutTiles = kKvWords;                         // O tiles of 2 columns a lane
  static constexpr int kOutTileCols = 2;
  static_assert(kFp8LaneBytes == kChunkBytes, "a lane reads its bytes of a key as one 16-byte vector");
  static_assert(kFp8GroupSize % kFp8FeaturesPerWarp == 0, "a warp's features share one scale");
  static_assert(kNumWarps == kKeyTiles, "warp w computes the RoPE part of S for key tile w");

  // Staged pages: as many as fit (3 for 16 rows, 2 for 32), so more bytes are in flight.
  static constexpr int kStages = BLOCK_M == 16 ? 3 : 2;

  struct SharedMemoryPlan {
    // Q in A-fragment order (fp8_lane.h): [row group][k-step][lane] -> 4 words, one 16-byte read
    alignas(128) uint4 q_frag[kRowGroups][Fp8Lane::kSteps][32];
    alignas(128) char raw[kStages][kFp8PageSmemBytes];             // staged 656-byte rows
    // S partials over the latent features: [feature warp][row group][key tile][16 rows x 8 keys]
    // (float2 per lane), and over the RoPE columns: [row group][key tile = the warp's][...]
    alignas(128) float s_part[kNumWarps][kRowGroups][kKeyTiles][kMmaM * kMmaN];
    alignas(128) float s_rope[kRowGroups][kKeyTiles][kMmaM * kMmaN];
    alignas(128) char p[BLOCK_M * Softmax::kPRowBytes];
    float row_exchange[Softmax::kColGroups * BLOCK_M];  // cta_row_max / cta_row_sum
    float row_alpha[BLOCK_M];  // this page's rescale of each row (softmax role -> feature role)
    float row_max[BLOCK_M];    // the epilogue's final max and sum of each row, same direction
    float row_sum[BLOCK_M];
  };
  static constexpr int kSmemBytes = sizeof(SharedMemoryPlan);
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory over the sm_90 per-block limit");
};

// The warp-specialized FP8 decode for 16-row blocks (decode_fp8_ws_kernel.cuh). Warpgroup 0 is the
// consumer: wgmma with the operands swapped (S^T = K Q^T, O^T += V^T P^T), so the 16 query rows are
// wgmma's N and no MMA work is wasted on padding rows. Warpgroups 1 and 2 are the converters: for
// every page, each of their 8 warps loads 8 rows of latent bytes from global memory into registers
// (two pages ahead), dequantizes them and stores the bf16 rows into the page's buffer in the wgmma
// block layout; pages alternate between two buffers. The RoPE columns are bf16 already: cp.async
// copies them two pages ahead into a ring of four tiles, where S^T reads them.
struct Fp8WsTraits {
  static constexpr int kBlockM = 16;
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kConverterThreads = 2 * kWarpgroupThreads;
  static constexpr int kThreads = kWarpgroupThreads + kConverterThreads;
  static constexpr int kScoreRegs = kPageSize * kBlockM / kWarpgroupThreads;  // 8: S^T is 64 keys x 16 rows
  static constexpr int kOutBlocks = kHeadDimV / kBlockCols;                   // 8 blocks of 64 features of O^T
  static constexpr int kRowsPerWarp = kPageSize / (kConverterThreads / 32);   // 8 latent rows a converter warp
  static constexpr int kRopeChunks = kPageSize * kRopeDim * 2 / kChunkBytes / kConverterThreads;  // 2
  static constexpr int kScaleSlots = 4;  // staged scales of pages n .. n + 2 (convert: why 4 suffice)
  static constexpr int kRopeSlots = 4;   // RoPE tiles of pages n - 2 .. n + 1 (convert_page: why 4)
  static constexpr int kLatentTiles = kColBlocks - 1;
  static_assert(kHeadDimV / 32 == kChunkBytes, "a converter lane reads 16 latent bytes of a row");

  struct SharedMemoryPlan {  // every tile in the wgmma block layout, 1024-byte aligned
    alignas(1024) char page[kNumPageBuffers][kLatentTiles][kPageTileBytes];  // dequantized latents (2 x 64 KB)
    alignas(1024) char rope[kRopeSlots][kPageTileBytes];  // RoPE tiles, bf16 in the cache: cp.async
    alignas(1024) char q[kColBlocks][kBlockM * kBlockRowBytes];            // Q, 9 blocks of 16 x 64
    alignas(1024) char p[kBlockM * kBlockRowBytes];                        // P: 16 rows x 64 keys
    float out_stage[kBlockM][kHeadDimV];  // the segment's normalised output rows
    float row_exchange[4][kBlockM];       // per consumer warp: page maxima, then row sums
    alignas(16) float scales[kScaleSlots][kPageSize][4];  // pages' scales, staged by cp.async
    uint64_t full[kNumPageBuffers];       // converters -> consumer: page in buffer b
    uint64_t empty[kNumPageBuffers];      // consumer -> converters: buffer b read
  };
  static constexpr int kSmemBytes = sizeof(SharedMemoryPlan) + 1024;  // + base alignment
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory over the sm_90 per-block limit");
  enum Barrier : uint32_t { kConsumerSync = 0 };  // named barrier of the consumer warpgroup
};

// The lockstep wgmma kernel (64-row blocks, the v2-v6 path): warpgroup w computes S for keys
// [32w, 32w+32) and owns O[:, 256w : 256w+256]; both run S, softmax and PV in lockstep.
struct LockstepTraits {
  static constexpr int kBlockM = kWgmmaBlockM;
  static constexpr int kWarpgroups = 2;
  static constexpr int kKeysPerWg = kPageSize / kWarpgroups;    // 32
  static constexpr int kColsPerWg = kHeadDimV / kWarpgroups;    // 256
  static constexpr int kScoreRegs = kKeysPerWg / 2;             // 64x32 fp32 over 128 threads
  static constexpr int kOutRegs = kColsPerWg / 2;               // 64x256 fp32 over 128 threads

  struct SharedMemoryPlan {  // every tile in the wgmma block layout, 1024-byte aligned
    alignas(1024) char q[kBlockM * kRowBytes];
    alignas(1024) char page[kNumPageBuffers][kPageBytes];
    alignas(1024) char p[kBlockM * kBlockRowBytes];
    float row_exchange[kWarpgroups * kBlockM];
  };
  static constexpr int kSmemBytes = sizeof(SharedMemoryPlan) + 1024;  // + base alignment
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory over the sm_90 per-block limit");
};

// The seesaw kernel (64-row blocks, rows >= 64 per kv head): two warpgroups, no producer warp.
// Pages go in pairs (j0 -> buffer 0, j1 -> buffer 1). WG0 computes S0 = Q K_j0^T, WG1 S1 = Q K_j1^T;
// WG0 owns O_L = O[:, 0:256], WG1 O_R = O[:, 256:512]. Each multiplies its own P from registers
// with its half of V and the other's P (through shared memory) with the other half, so one
// warpgroup's softmax overlaps the other's MMAs. K/V tiles arrive by TMA, one mbarrier per
// 64 x 64 tile, reloaded as soon as their last reader is done.
//
// On an FP8 cache (seesaw_fp8.cuh) a third warpgroup, the converter, dequantizes each latent tile in
// place after its FP8 bytes land; the two consumer warpgroups then run exactly as on bf16. The
// register file is split with setmaxnreg: 2 x 232 + 40 = 3 x 168 (the launch-bounds allocation).
struct SeesawTraits {
  static constexpr int kBlockM = kWgmmaBlockM;
  static constexpr int kThreads = 256;  // the two consumer warpgroups (= the CTA on a bf16 cache)
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kConverterThreads = kWarpgroupThreads;
  static constexpr int kFp8Threads = kThreads + kConverterThreads;  // FP8 cache: + the converter
#ifndef KVPAGER_FP8_CONVERT_ROUNDS
#define KVPAGER_FP8_CONVERT_ROUNDS 2
#endif
#ifndef KVPAGER_FP8_CONSUMER_REGS
#define KVPAGER_FP8_CONSUMER_REGS 232
#endif
  // The default converter's rounds an iteration (seesaw_fp8.cuh's convert_tile_rows): 2 (s19: FP8
  // time -3 to -4 % against 1 on the H100, 0 spills at 232 / 40); 4 needs consumer registers 224
  // for the converter's 56 (KVPAGER_FP8_CONVERT_ROUNDS).
  static constexpr int kConverterRounds = KVPAGER_FP8_CONVERT_ROUNDS;
  static constexpr int kConsumerRegs = KVPAGER_FP8_CONSUMER_REGS;
  static constexpr int kConverterRegs = 3 * 168 - 2 * kConsumerRegs;
  // Arrivals that complete a tile's `converted` barrier: every lane of the converting warp.
  static constexpr int kConvertedArrivals = 32;
  static_assert(2 * kConsumerRegs + kConverterRegs == 3 * 168, "setmaxnreg must not ask for more than launched");
  static constexpr int kColsPerWg = kHeadDimV / 2;                 // 256
  static constexpr int kVTilesPerWg = kColsPerWg / kBlockCols;     // 4: V tiles [4w, 4w + 4)
  static constexpr int kScoreRegs = kBlockM * kPageSize / kWarpgroupThreads;   // 32
  static constexpr int kOutRegs = kBlockM * kColsPerWg / kWarpgroupThreads;    // 128
  static constexpr int kRopeTile = kColBlocks - 1;                 // 8: read by S only

  struct SharedMemoryPlan {
    alignas(1024) char q[kColBlocks][kBlockM * kBlockRowBytes];     // 72 KB, loaded per segment
    alignas(1024) char page[kNumPageBuffers][kColBlocks][kPageTileBytes];  // 2 x 72 KB
    // P0 rescaled to the pair's final max, for WG1's O_R += P0 V0R. (P1 for WG0 goes into
    // buffer 1's rope tile, free once S1 is done: that is what lets everything fit.)
    alignas(1024) char p0[kBlockM * kBlockRowBytes];
    float row_max[kBlockM];  // running max (log2 units): WG0 -> WG1 -> WG0 every pair
    union {
      struct {
        float scale0[kBlockM];  // WG0's rescale of this pair (WG1 applies it to O_R)
        float scale1[kBlockM];  // WG1's rescale of this pair (WG0 applies it to O_L, P0)
      } pair;
      float row_sum[2][kBlockM];  // the epilogue's per-warpgroup row sums
    } exchange;
    uint64_t tile_ready[kNumPageBuffers][kColBlocks];  // TMA mbarriers, one per page tile
    uint64_t converted[kNumPageBuffers][kColBlocks - 1];  // FP8 cache: latent tile dequantized (kConvertedArrivals)
    uint64_t q_ready[kColBlocks];  // Q's tiles (by TMA, or by hand after cp.async), a phase a segment
  };
  static constexpr int kSmemBytes = sizeof(SharedMemoryPlan) + 1024;  // + base alignment
  static_assert(kSmemBytes <= kMaxSmemBytes, "shared memory over the sm_90 per-block limit");

  // Named barriers (ids past CUTLASS's reserved ones): cross-warpgroup hand-offs, and
  // per-warpgroup syncs before a buffer is refilled or after V rows are zeroed.
  enum Barrier : uint32_t {
    kScale0Ready = 0,  // WG0 wrote row_max / scale0 of the pair
    kScale1Ready,      // WG1 wrote row_max / scale1
    kP0Ready,          // WG0 stored P0 * scale1 in p0
    kP1Ready,          // WG1 stored P1 in buffer 1's rope tile and issued O_R += P0 V0R
    kWarpgroupSync,    // + warpgroup index: all 128 threads of one warpgroup (2 ids)
    kConsumersSync = kWarpgroupSync + 2,  // both consumer warpgroups (an FP8 converter takes no part)
    kConverterSync,    // FP8 cache: the converter's warps have read a group's scales / a batch's FP8 bytes
  };
};

}  // namespace kvpager
