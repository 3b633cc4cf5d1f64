// Online-softmax pieces shared by the decode kernels.
#pragma once
#include "config.h"
#include "tile_ops.h"

namespace kvpager {

// P = exp2(S - base) for one 8-key fragment tile of a lane's two rows (s0, s1: row 0; s2, s3:
// row 1), added into page_sum and stored as Elem pairs into the swizzled P tile in shared memory
// (`row_bytes` per row; `chunk` = the tile's 16-byte column chunk), where the PV MMA reads it.
template <typename Elem>
__device__ __forceinline__ void store_prob_tile(char* sP, int row_bytes, const int (&rows)[2],
                                                int chunk, int t, float s0, float s1, float s2,
                                                float s3, const float (&base)[2],
                                                float (&page_sum)[2]) {
  const float p0 = exp2f(s0 - base[0]), p1 = exp2f(s1 - base[0]);
  const float p2 = exp2f(s2 - base[1]), p3 = exp2f(s3 - base[1]);
  page_sum[0] += p0 + p1;
  page_sum[1] += p2 + p3;
  *reinterpret_cast<uint32_t*>(sP + swizzled(rows[0], chunk, row_bytes) + 4 * t) =
      ElemOps<Elem>::pack(p0, p1);
  *reinterpret_cast<uint32_t*>(sP + swizzled(rows[1], chunk, row_bytes) + 4 * t) =
      ElemOps<Elem>::pack(p2, p3);
}

}  // namespace kvpager
