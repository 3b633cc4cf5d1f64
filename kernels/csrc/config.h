// Every tile size, page size and head dim of the MLA decode kernels, as named constants.
#pragma once

namespace kvpager {

constexpr int kPageSize = 64;        // tokens per KV page (the pool's page)
constexpr int kHeadDim = 576;        // latent (512) + rope (64): the width of K and of q
constexpr int kHeadDimV = 512;       // V = the first 512 columns of K
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kMmaM = 16;            // rows of one mma.m16n8k16 tile
constexpr int kMmaN = 8;
constexpr int kMmaK = 16;
constexpr int kChunkElems = 8;       // one 16-byte cp.async / ldmatrix row = 8 half elements
constexpr int kChunkBytes = 16;
constexpr int kChunksPerRow = kHeadDim / kChunkElems;  // 72
constexpr int kRowBytes = kHeadDim * 2;                // 1152 = 9 x 128: every row starts at bank 0
constexpr int kPageBytes = kPageSize * kRowBytes;      // 73728
constexpr int kNumPageBuffers = 2;   // one page computed while the next streams in

// Split-KV scheduler (must match kernels/schedule.py).
constexpr int kMetadataFields = 8;
constexpr int kFixedOverheadPages = 5;
constexpr int kMetadataThreads = 256;

// Combine kernel: one warp per (output row, quarter of its 512 columns).
constexpr int kCombineRowsPerBlock = 8;
constexpr int kCombineThreads = kCombineRowsPerBlock * 32;
constexpr int kCombineColSplits = 4;                   // 128 columns = one float4 per lane

// Query rows handled by one CTA, chosen from rows = s_q * h_q / h_kv (see schedule.block_m_for).
constexpr int block_m_for(int rows) { return rows <= 16 ? 16 : rows <= 32 ? 32 : 64; }

// How the 8 warps tile one BLOCK_M x 64 score tile and the BLOCK_M x 512 output:
// RowGroups x ColGroups warps; each warp owns 16 rows, KeysPerWarp keys of S and
// ColsPerWarp columns of O (whose fp32 accumulator stays in registers all along).
template <int BLOCK_M>
struct TileShape {
  static_assert(BLOCK_M == 16 || BLOCK_M == 32 || BLOCK_M == 64, "BLOCK_M must be 16, 32 or 64");
  static constexpr int kBlockM = BLOCK_M;
  static constexpr int kRowGroups = BLOCK_M / kMmaM;
  static constexpr int kColGroups = kNumWarps / kRowGroups;
  static constexpr int kKeysPerWarp = kPageSize / kColGroups;   // 8, 16, 32
  static constexpr int kKeyTiles = kKeysPerWarp / kMmaN;        // 1, 2, 4
  static constexpr int kColsPerWarp = kHeadDimV / kColGroups;   // 64, 128, 256
  static constexpr int kOutTiles = kColsPerWarp / kMmaN;        // 8, 16, 32
  static constexpr int kPRowBytes = kPageSize * 2;              // 128: P is BLOCK_M x 64 halfs

  // Shared memory: Q tile, two page buffers, P tile, a float per (col group, row) for exchanges.
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemK = kSmemQ + BLOCK_M * kRowBytes;
  static constexpr int kSmemP = kSmemK + kNumPageBuffers * kPageBytes;
  static constexpr int kSmemRed = kSmemP + BLOCK_M * kPRowBytes;
  static constexpr int kSmemBytes = kSmemRed + kColGroups * BLOCK_M * 4;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

}  // namespace kvpager
