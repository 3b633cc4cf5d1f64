// Where one lane's data lives in the fused FP8 kernel (decode_fp8_kernel.cuh), as __host__
// __device__ functions so a host program (tests/kernels/fp8_twin.cpp) runs the same index math
// through emulated mma.m16n8k16 / movmatrix fragments and checks S and P V against plain matmuls.
//
// mma.m16n8k16 fragments (PTX ISA; g = lane / 4, t = lane % 4, each register two 16-bit values):
//   A (16 x 16):  a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8):   b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   D (16 x 8):   d0, d1 = D[g][2t, 2t+1]   d2, d3 = D[g+8][2t, 2t+1]
// The k dimension may be permuted freely as long as A and B agree. For S = Q K^T a lane reads 16
// consecutive bytes of K row 8n + g (n: key tile): features c0 + 0..15, c0 = 64 warp + 16 t,
// dequantized to words kv[m] = (c0 + 2m, c0 + 2m + 1). Latent k-step s of the warp takes
// b0 = kv[2s], b1 = kv[2s + 1] (k_step_b), so its k slots (2t, 2t+1, 2t+8, 2t+9) are features
// c0 + 4s + (0, 1, 2, 3); the A fragment must hold Q at those columns (q_col). The RoPE part is the
// same with 8 bf16 values a read: read j gives values 32j + 8t + 0..7, feeding two k-steps. Q is
// stored in shared memory already in A-fragment order (one 16-byte read a k-step a lane).
// For P V (k = keys, n = features), movmatrix transposes kv[m] of key tile n as an 8 x 8 matrix
// (rows: keys 8n + g'; columns 2t' + e: features c0(t') + 2m + e), giving the B fragment of keys
// 8n + (2t, 2t+1) for the output tile m whose column c is feature 64 warp + 16 (c / 2) + 2m + c % 2:
// the lane's D values land on features c0 + 2m, c0 + 2m + 1 (out_col).
#pragma once
#include <cstdint>

#include "config.h"
#include "fp8_dequant.cuh"

namespace kvpager {

struct Fp8Lane {
  int warp, g, t;

  KVPAGER_HD static Fp8Lane of(int warp, int lane) { return Fp8Lane{warp, lane / 4, lane % 4}; }

  // The staged row of key tile n this lane reads (0..63), and the byte offsets within a row.
  KVPAGER_HD int key_row(int n) const { return n * kMmaN + g; }
  KVPAGER_HD int latent_byte() const { return warp * kFp8FeaturesPerWarp + t * kFp8LaneBytes; }
  KVPAGER_HD int scale_byte() const { return kFp8ScalesOffset + 4 * (latent_byte() / kFp8GroupSize); }
  // RoPE: read j (0, 1) covers RoPE values 32j + 8t + 0..7 of key row 8 warp + g (the warp's key tile).
  static constexpr int kRopeLaneElems = kChunkBytes / 2;    // 8 bf16 values a 16-byte read
  static constexpr int kRopeReadElems = 4 * kRopeLaneElems;  // 32 values a quad's reads cover
  static constexpr int kRopeReads = kRopeDim / kRopeReadElems;  // 2
  KVPAGER_HD int rope_row() const { return warp * kMmaN + g; }
  KVPAGER_HD int rope_byte(int j) const { return kFp8RopeOffset + 2 * (j * kRopeReadElems + t * kRopeLaneElems); }

  // Q's A fragments, in the order of k-steps: latent step s of warp w is step 4w + s, the RoPE steps
  // (read j, step s) follow as 32 + 2j + s. q_col gives the column of the first of the two values
  // of word i (0..3) of a step's fragment for this lane; words 0, 2 are row g, words 1, 3 row g + 8.
  static constexpr int kLatentSteps = kHeadDimV / kMmaK;       // 32
  static constexpr int kLaneSteps = kFp8LaneBytes / 4;          // 4 k-steps a lane's 16 latent bytes feed
  static constexpr int kRopeSteps = kRopeLaneElems / 4;         // 2 k-steps a RoPE read feeds
  static constexpr int kSteps = kLatentSteps + kRopeReads * kRopeSteps;  // 36 = 576 / 16
  KVPAGER_HD static int latent_step(int warp, int s) { return warp * kLaneSteps + s; }
  KVPAGER_HD static int rope_step(int j, int s) { return kLatentSteps + kRopeSteps * j + s; }
  KVPAGER_HD int q_col(int step, int i) const {
    const int r = step - kLatentSteps;
    const int first = r < 0 ? (step / kLaneSteps) * kFp8FeaturesPerWarp + t * kFp8LaneBytes + 4 * (step % kLaneSteps)
                            : kHeadDimV + (r / kRopeSteps) * kRopeReadElems + t * kRopeLaneElems + 4 * (r % kRopeSteps);
    return first + 2 * (i / 2);
  }
  KVPAGER_HD int q_row(int i) const { return g + 8 * (i % 2); }

  // Output column of D values 0 / 2 (1 / 3 are the next column) of P V tile k.
  KVPAGER_HD int out_col(int k) const { return latent_byte() + 2 * k; }
};

// The B operand of k-step s from a lane's words of one key tile (dequantized latent or raw RoPE).
template <int N>
KVPAGER_HD void k_step_b(int s, const uint32_t (&k)[N], uint32_t (&b)[2]) {
  b[0] = k[2 * s];
  b[1] = k[2 * s + 1];
}

}  // namespace kvpager
