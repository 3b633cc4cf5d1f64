// Where the FP8 ws kernel's consumer reads V^T's register-A fragments (decode_fp8_ws_kernel.cuh,
// KVPAGER_FP8_WS_PV_RS=1): host-compilable, so tests/kernels/fp8_twin.cpp emulates the
// ldmatrix.x4.trans on a page tile and checks every lane gets its A fragment.
//
// wgmma m64k16 with A in registers: warp w of the warpgroup holds rows 16 w .. 16 w + 15 of A in
// mma.m16n8k16's A layout (g = lane / 4, t = lane % 4): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
// a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]. Here A = V^T of one 64-feature block: rows are
// features, columns the k-step's 16 keys. The page tile stores keys as rows (128 bytes, 16-byte
// chunk c at chunk c ^ (key % 8)), so each of the four 8 x 8 matrices is 8 key rows of one chunk,
// and .trans hands lane l the keys 2 (l % 4), + 1 of column (feature) l / 4: matrix q = 0..3 is
// keys 8 (q / 2) .. + 7 at features 16 w + 8 (q % 2) .. + 7, lanes 8 q .. 8 q + 7 give its rows.
#pragma once
#include "config.h"  // KVPAGER_HD, kBlockRowBytes, kChunkBytes

namespace kvpager {

// Byte offset inside a latent tile of the row this lane gives ldmatrix at k-step 0 (thread tid of
// the consumer warpgroup); k-step kk adds kk * 16 rows.
KVPAGER_HD int vt_lane_offset(int tid) {
  const int warp = tid / 32, lane = tid % 32, q = lane / 8, key = lane % 8 + 8 * (q / 2);
  return key * kBlockRowBytes + (((2 * warp + q % 2) ^ (key & 7)) * kChunkBytes);
}

}  // namespace kvpager
