// Launch of the fused FP8 decode (bf16 q / out, 656-byte cache rows): the kernel for the row-block
// size (16 rows: the warp-specialized kernel unless options say otherwise; 32 rows: the split-K
// mma.sync kernel; 64 rows: the seesaw kernel with a converter warpgroup), then the shared combine
// kernel.
#pragma once
#include "decode_fp8_kernel.cuh"
#include "decode_fp8_ws_kernel.cuh"
#include "decode_launch.cuh"
#include "launch.h"
#include "traits.h"

namespace kvpager {

template <int BLOCK_M>
cudaError_t launch_fp8_block(const DecodeParams& p, cudaStream_t stream) {
  using Traits = Fp8Traits<BLOCK_M>;
  auto* kernel = mla_decode_fp8_kernel<BLOCK_M>;
  KVPAGER_SET_SMEM_ONCE(kernel, Traits::kSmemBytes);
  kernel<<<decode_grid(p, BLOCK_M), kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

inline cudaError_t launch_fp8_ws(DecodeParams p, const DecodeOptions& options, cudaStream_t stream) {
  using Traits = Fp8WsTraits;
  p.fp8_prefetch_pages = options.fp8_prefetch_pages;
  auto* kernel = mla_decode_fp8_ws_kernel;
  KVPAGER_SET_SMEM_ONCE(kernel, Traits::kSmemBytes);
  kernel<<<decode_grid(p, Traits::kBlockM), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
#ifdef KVPAGER_TRACE
  fp8_ws_trace_dump<<<1, 1, 0, stream>>>();  // scripts/fp8_trace.py
#endif
  return cudaGetLastError();
}

// 64-row blocks: the seesaw kernel with its converter warpgroup (hand-off order 15;
// with no page in the pool no map is encoded, and no segment has a page to load).
inline cudaError_t launch_fp8_seesaw(DecodeParams p, const DecodeOptions& options, cudaStream_t stream) {
  p.page_cache_hint = cache_policy(options.page_cache_hint);
  SeesawMaps maps{};
  if (p.num_pages > 0) {
    const cudaError_t err = encode_fp8_page_maps(p, &maps.fp8);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = launch_seesaw_kernel<__nv_bfloat16, 15, true>(p, maps, stream);
#ifdef KVPAGER_TRACE
  seesaw_trace_dump<<<1, 1, 0, stream>>>();  // scripts/seesaw_trace.py --fp8
#endif
  return err;
}

inline cudaError_t launch_decode_fp8(const DecodeParams& p, const DecodeOptions& options, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return cudaSuccess;
  const int block_m = block_m_for(p.rows);
  const cudaError_t err = block_m == kWgmmaBlockM           ? launch_fp8_seesaw(p, options, stream)
                          : block_m == 32                   ? launch_fp8_block<32>(p, stream)
                          : options.fp8_warp_specialized    ? launch_fp8_ws(p, options, stream)
                                                            : launch_fp8_block<16>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_combine<__nv_bfloat16>(p, options, stream);
}

}  // namespace kvpager
