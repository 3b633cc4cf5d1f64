// Launch of the decode + combine kernels for one dtype, choosing the row-block size.
#pragma once
#include "combine_kernel.cuh"
#include "decode_kernel.cuh"
#include "decode_wgmma_kernel.cuh"
#include "launch.h"

namespace kvpager {

// Decode kernel (rows in blocks of block_m) then the combine kernel, on `stream`.
template <typename Elem, typename Kernel>
cudaError_t launch_with_combine(Kernel* kernel, int block_m, int smem_bytes, const DecodeParams& p,
                                cudaStream_t stream) {
  // Row blocks of one part run side by side, so the second reads each page from L2.
  const dim3 grid(ceil_div(p.rows, block_m), p.h_kv, p.num_parts);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 combine_grid(ceil_div(p.rows, kCombineRowsPerBlock) * kCombineColSplits, p.h_kv, p.batch);
  mla_combine_kernel<Elem><<<combine_grid, kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Raise a kernel's dynamic shared-memory limit once (statics: the first, eager call does it, so
// later calls inside a CUDA-graph capture make no such API call).
#define KVPAGER_SET_SMEM_ONCE(kernel, bytes)                                                   \
  do {                                                                                         \
    static const cudaError_t attr_ =                                                           \
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (bytes));     \
    if (attr_ != cudaSuccess) return attr_;                                                    \
  } while (0)

template <typename Elem, int BLOCK_M>
cudaError_t launch_mma_sync(const DecodeParams& p, cudaStream_t stream) {
  auto* kernel = mla_decode_kernel<Elem, BLOCK_M>;
  KVPAGER_SET_SMEM_ONCE(kernel, TileShape<BLOCK_M>::kSmemBytes);
  return launch_with_combine<Elem>(kernel, BLOCK_M, TileShape<BLOCK_M>::kSmemBytes, p, stream);
}

template <typename Elem>
cudaError_t launch_wgmma(const DecodeParams& p, cudaStream_t stream) {
  auto* kernel = mla_decode_wgmma_kernel<Elem>;
  KVPAGER_SET_SMEM_ONCE(kernel, WgmmaShape::kSmemBytes);
  return launch_with_combine<Elem>(kernel, WgmmaShape::kBlockM, WgmmaShape::kSmemBytes, p, stream);
}

// 16- and 32-row blocks (h_q * s_q <= 32: memory-bound) on mma.sync; 64-row blocks on wgmma.
template <typename Elem>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return cudaSuccess;
  switch (block_m_for(p.rows)) {
    case 16: return launch_mma_sync<Elem, 16>(p, stream);
    case 32: return launch_mma_sync<Elem, 32>(p, stream);
    default: return launch_wgmma<Elem>(p, stream);
  }
}

}  // namespace kvpager
