// Every tile size, page size and head dim of the MLA decode kernels, as named constants.
#pragma once

// Host and device (nvcc), or plain inline for a host compiler (the host twins in tests/kernels).
#ifdef __CUDACC__
#define KVPAGER_HD __host__ __device__ __forceinline__
#else
#define KVPAGER_HD inline
#endif

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
constexpr int kMaxSmemBytes = 227 * 1024;  // sm_90 dynamic shared memory per block

// FP8 latent cache row (kvpager/fp8.py holds the Python twins): 512 float8_e4m3fn latent values
// (value / scale), 4 float32 scales (one per 128 values, powers of two), 64 bf16 RoPE values.
constexpr int kFp8TokenBytes = 656;
constexpr int kFp8ScalesOffset = kHeadDimV;                        // 512
constexpr int kFp8GroupSize = 128;                                 // latent values per scale
constexpr int kFp8RopeOffset = kFp8ScalesOffset + 4 * (kHeadDimV / kFp8GroupSize);  // 528
constexpr int kRopeDim = kHeadDim - kHeadDimV;                     // 64
static_assert(kFp8RopeOffset + 2 * kRopeDim == kFp8TokenBytes, "the FP8 row is 656 bytes");
constexpr int kFp8ChunksPerRow = kFp8TokenBytes / kChunkBytes;     // 41 cp.async chunks a row
// A staged row in shared memory: 44 chunks, so rows r and r + 1 sit 64 bytes apart modulo 128 and
// the 16-byte reads of two rows by 8 lanes (one shared-memory wavefront) hit 8 distinct bank groups.
constexpr int kFp8SmemRowBytes = 704;
constexpr int kFp8PageSmemBytes = kPageSize * kFp8SmemRowBytes;  // 45056
// The fused kernel's warp w owns latent features [64w, 64w + 64); a lane reads 16 of them a key.
constexpr int kFp8FeaturesPerWarp = kHeadDimV / kNumWarps;       // 64
constexpr int kFp8LaneBytes = kFp8FeaturesPerWarp / 4;            // 16
// (2^120, 2^120) in bf16: e4m3 bits placed in a bf16 (exponent bias 7 vs 127) read as value * 2^-120.
constexpr unsigned kBf16x2TwoPow120 = 0x7B807B80u;
constexpr float kTwoPow120 = 0x1p120f;
constexpr float kFp8FoldMaxScale = 128.f;  // largest scale whose scale * 2^120 is still a bf16

// Split-KV scheduler (must match kernels/schedule.py).
constexpr int kMetadataFields = 8;
constexpr int kFixedOverheadPages = 5;
constexpr int kMetadataThreads = 256;

// Combine kernel: one warp per (output row, quarter of its 512 columns).
constexpr int kCombineRowsPerBlock = 8;
constexpr int kCombineThreads = kCombineRowsPerBlock * 32;
constexpr int kCombineColSplits = 4;                   // 128 columns = one float4 per lane

// Query rows handled by one CTA, chosen from rows = s_q * h_q / h_kv (twin of
// kernels/schedule.py's block_m_for). 16 and 32 run on mma.sync, 64 on wgmma.
constexpr int block_m_for(int rows) { return rows <= 16 ? 16 : rows <= 32 ? 32 : 64; }
constexpr int kWgmmaBlockM = 64;

// The wgmma tile layout: a [rows x 576] tile is 9 column blocks of [rows x 64] halfs, 128-byte rows,
// 16-byte chunks XORed with (row % 8) (wgmma's and TMA's 128-byte swizzle; 1024-byte aligned atoms).
constexpr int kBlockCols = 64;
constexpr int kBlockRowBytes = kBlockCols * 2;            // 128
constexpr int kColBlocks = kHeadDim / kBlockCols;         // 9: blocks 0-7 are V, block 8 the rope part
constexpr int kPageTileBytes = kPageSize * kBlockRowBytes;  // 8192: one 64 x 64 tile of a page
// The seesaw kernel's FP8 slots (seesaw_fp8.cuh): a latent tile's FP8 bytes in the first half of
// its 8 KB bf16 slot, a page's scales behind them in the slots of tiles 0 and 4.
constexpr int kFp8TileBytes = kPageSize * kBlockCols;               // 4096
constexpr int kFp8ScaleRowBytes = 4 * sizeof(float);                // a token's 4 scales
constexpr int kFp8PageScalesBytes = kPageSize * kFp8ScaleRowBytes;  // 1024
static_assert(kFp8TileBytes + kFp8PageScalesBytes <= kPageTileBytes, "FP8 bytes and scales fit a slot");

KVPAGER_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace kvpager
