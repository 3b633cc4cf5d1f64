// Launch of the decode + combine kernels for one dtype, choosing the row-block size.
#pragma once
#include "combine_kernel.cuh"
#include "decode_kernel.cuh"
#include "launch.h"

namespace kvpager {

template <typename Elem, int BLOCK_M>
cudaError_t launch_decode_block_m(const DecodeParams& p, cudaStream_t stream) {
  using S = TileShape<BLOCK_M>;
  auto* kernel = mla_decode_kernel<Elem, BLOCK_M>;
  // Raise the dynamic shared-memory limit once (also keeps the call out of graph captures
  // after the first, eager, run).
  static cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(p.num_parts, p.h_kv, ceil_div(p.rows, BLOCK_M));
  kernel<<<grid, kThreads, S::kSmemBytes, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 combine_grid(ceil_div(p.rows, kCombineRowsPerBlock), p.h_kv, p.batch);
  mla_combine_kernel<Elem><<<combine_grid, kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return cudaSuccess;
  switch (block_m_for(p.rows)) {
    case 16: return launch_decode_block_m<Elem, 16>(p, stream);
    case 32: return launch_decode_block_m<Elem, 32>(p, stream);
    default: return launch_decode_block_m<Elem, 64>(p, stream);
  }
}

}  // namespace kvpager
