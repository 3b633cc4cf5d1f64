// Where the seesaw kernel's FP8 converter reads and writes inside an 8 KB page-tile slot
// (seesaw_fp8.cuh): host-compilable, so tests/kernels/fp8_twin.cpp runs the
// converters' schedules on the host with the same index math (tests/kernels/test_fp8_twin.py).
//   - TMA lands latent tile t's FP8 bytes unswizzled in the slot's first half: row r, bytes
//     16 c .. 16 c + 15 of the tile's 64 (c = 0..3) at fp8_src_offset(r, c);
//   - the page's scales ([64 rows][4 floats]) sit behind them in the slots of tiles 0 and 4;
//   - the bf16 tile is wgmma's 128-byte swizzle: row r's 16-byte chunk k (values 8k .. 8k + 7) at
//     bf16_dst_offset(r, k). FP8 chunk c becomes bf16 chunks 2c and 2c + 1.
#pragma once
#include "config.h"  // KVPAGER_HD: host and device, or host only for the twins

namespace kvpager {

KVPAGER_HD int fp8_src_offset(int row, int chunk) { return row * kBlockCols + chunk * kChunkBytes; }
// bf16_dst_offset(r, k) = bf16_row_offset(r) + bf16_chunk_offset(r, k) (the kernel adds them in
// that order: the row's address once, then each chunk's).
KVPAGER_HD int bf16_row_offset(int row) { return row * kBlockRowBytes; }
KVPAGER_HD int bf16_chunk_offset(int row, int chunk16) { return (chunk16 ^ (row % 8)) * kChunkBytes; }
KVPAGER_HD int bf16_dst_offset(int row, int chunk16) { return bf16_row_offset(row) + bf16_chunk_offset(row, chunk16); }
// Scale of `row` for scale group `group` (0-3), in the slot of tile 0 (groups 0, 1) or 4 (2, 3).
KVPAGER_HD int fp8_scale_offset(int row, int group) {
  return kFp8TileBytes + row * kFp8ScaleRowBytes + group * int(sizeof(float));
}
KVPAGER_HD int fp8_scale_group(int tile) { return tile * kBlockCols / kFp8GroupSize; }

// Which row and FP8 chunk a converter lane takes. A lane always converts chunk lane % 4 of its rows.
KVPAGER_HD int converter_chunk(int lane) { return lane % 4; }
// The default converter (one warp a tile, seesaw_fp8.cuh): row of round k (0-7).
KVPAGER_HD int round_row(int k, int lane) { return 8 * k + lane / 4; }

}  // namespace kvpager
