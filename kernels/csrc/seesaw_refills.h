// Order 19's refill order (decode_seesaw_kernel.cuh, run_producer_warp), host-compilable so
// tests/kernels/fp8_twin.cpp can print it and tests/kernels/test_seesaw_refills.py can hold it
// against the consumers' releases: a mismatch would leave a producer waiting on an `emptied`
// barrier that no warp arrives on (a hang), or refill a buffer still being read.
#pragma once

#ifndef KVPAGER_LAYOUT_HD
#ifdef __CUDACC__
#define KVPAGER_LAYOUT_HD __host__ __device__ __forceinline__
#else
#define KVPAGER_LAYOUT_HD inline
#endif
#endif

namespace kvpager {

// The refills producer warp W issues for a segment of pages [first, end), in the order warpgroup W
// frees its tile group of each buffer: for each pair (j0, j0 + 1), page j0 + 2 into buffer 0 and
// j0 + 3 into buffer 1 where they exist, WG0 freeing buffer 0 first and WG1 buffer 1 first.
// f(buf, page) is called for each, in that order.
template <int W, typename F>
KVPAGER_LAYOUT_HD void for_each_refill(int first, int end, F&& f) {
#pragma unroll 1
  for (int j0 = first; j0 + 2 < end; j0 += 2) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int buf = W == 0 ? k : 1 - k;
      const int page = j0 + 2 + buf;
      if (page < end) f(buf, page);
    }
  }
}

}  // namespace kvpager
