// Launch of the decode kernels for one dtype: the kernel for the row-block size, then the combine
// kernel (as a programmatic dependent launch unless switched off).
#pragma once
#include <algorithm>

#include "combine_kernel.cuh"
#include "decode_kernel.cuh"
#include "decode_lockstep_kernel.cuh"
#include "decode_seesaw_kernel.cuh"
#include "launch.h"
#include "tma.cuh"
#include "traits.h"

namespace kvpager {

// Row blocks of one part run side by side, so the second reads each page from L2.
inline dim3 decode_grid(const DecodeParams& p, int block_m) {
  return dim3(ceil_div(p.rows, block_m), p.h_kv, p.num_parts);
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
  using Traits = MmaSyncTraits<BLOCK_M>;
  auto* kernel = mla_decode_kernel<Elem, BLOCK_M>;
  KVPAGER_SET_SMEM_ONCE(kernel, Traits::kSmemBytes);
  kernel<<<decode_grid(p, BLOCK_M), kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_lockstep(const DecodeParams& p, cudaStream_t stream) {
  auto* kernel = mla_decode_lockstep_kernel<Elem>;
  KVPAGER_SET_SMEM_ONCE(kernel, LockstepTraits::kSmemBytes);
  kernel<<<decode_grid(p, LockstepTraits::kBlockM), kThreads, LockstepTraits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

inline uint64_t cache_policy(DecodeOptions::CacheHint hint) {
  using cute::TMA::CacheHintSm90;
  switch (hint) {
    case DecodeOptions::CacheHint::kFirst: return static_cast<uint64_t>(CacheHintSm90::EVICT_FIRST);
    case DecodeOptions::CacheHint::kLast: return static_cast<uint64_t>(CacheHintSm90::EVICT_LAST);
    default: return static_cast<uint64_t>(CacheHintSm90::EVICT_NORMAL);
  }
}

// The seesaw kernel with hand-off order kOrder on a bf16 / fp16 or (kFp8) an FP8 cache (its
// shared-memory attribute set once per instance).
template <typename Elem, int kOrder, bool kFp8 = false>
cudaError_t launch_seesaw_kernel(const DecodeParams& p, const SeesawMaps& maps, cudaStream_t stream) {
  auto* kernel = mla_decode_seesaw_kernel<Elem, kOrder, kFp8>;
  KVPAGER_SET_SMEM_ONCE(kernel, SeesawTraits::kSmemBytes);
  kernel<<<decode_grid(p, SeesawTraits::kBlockM), seesaw::kCtaThreads<kFp8>, SeesawTraits::kSmemBytes, stream>>>(
      p, maps);
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_seesaw(DecodeParams p, const DecodeOptions& options, cudaStream_t stream) {
  p.page_cache_hint = cache_policy(options.page_cache_hint);
  SeesawMaps maps{};
  cudaError_t err = encode_page_tensor_map<Elem>(p, &maps.page);
  if (err != cudaSuccess) return err;
  maps.q_by_tma = options.seesaw_q_by_tma && encode_q_tensor_map<Elem>(p, &maps.q) ? 1 : 0;
  err = options.seesaw_order == 11 ? launch_seesaw_kernel<Elem, 11>(p, maps, stream)
                                   : launch_seesaw_kernel<Elem, 15>(p, maps, stream);
#ifdef KVPAGER_TRACE
  seesaw_trace_dump<<<1, 1, 0, stream>>>();  // scripts/seesaw_trace.py
#endif
  return err;
}

// Blocks of the walking combine kernel that fit on the GPU at once (its occupancy, queried once).
template <typename Elem, int kLoads>
int combine_wave_blocks(int sm_count) {
  static const int per_sm = [] {
    int n = 0;
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mla_combine_walk_kernel<Elem, kLoads>,
                                                                          kCombineThreads, 0);
    return err == cudaSuccess && n > 0 ? n : 1;
  }();
  return per_sm * sm_count;
}

// With pdl, the combine grid may launch while the decode grid's last CTAs finish (they signal it
// once their last segment's main loop is done); it waits for the decode grid before reading.
template <typename Kernel>
cudaError_t launch_combine_grid(Kernel kernel, dim3 grid, const DecodeParams& p, bool pdl, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kCombineThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

// The walking kernel with a grid of one wave (or one block per unit without combine_one_wave).
template <typename Elem, int kLoads>
cudaError_t launch_combine_walk(const DecodeParams& p, const DecodeOptions& options, cudaStream_t stream) {
  const int units = p.batch * combine_units_per_sequence(p.h_kv, p.rows);
  const int blocks = options.combine_one_wave && options.sm_count > 0
                         ? std::min(units, combine_wave_blocks<Elem, kLoads>(options.sm_count))
                         : units;
  return launch_combine_grid(mla_combine_walk_kernel<Elem, kLoads>, dim3(blocks), p, options.pdl, stream);
}

// Default: one block per unit. KVPAGER_COMBINE_GRID=wave / KVPAGER_COMBINE_LOADS=8|16: the walking
// kernel (s26 trial).
template <typename Elem>
cudaError_t launch_combine(const DecodeParams& p, const DecodeOptions& options, cudaStream_t stream) {
  if (options.combine_loads == 16) return launch_combine_walk<Elem, 16>(p, options, stream);
  if (options.combine_loads == 8) return launch_combine_walk<Elem, 8>(p, options, stream);
  if (options.combine_one_wave) return launch_combine_walk<Elem, 4>(p, options, stream);
  const dim3 grid(ceil_div(p.rows, kCombineRowsPerBlock) * kCombineColSplits, p.h_kv, p.batch);
  return launch_combine_grid(mla_combine_kernel<Elem>, grid, p, options.pdl, stream);
}

// 16- and 32-row blocks (h_q * s_q <= 32: memory-bound) on mma.sync; 64-row blocks on wgmma, by
// the seesaw kernel unless options.seesaw is false (or the pool is empty: no page to map).
template <typename Elem>
cudaError_t launch_decode(const DecodeParams& p, const DecodeOptions& options, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return cudaSuccess;
  cudaError_t err;
  switch (block_m_for(p.rows)) {
    case 16: err = launch_mma_sync<Elem, 16>(p, stream); break;
    case 32: err = launch_mma_sync<Elem, 32>(p, stream); break;
    default:
      err = options.seesaw && p.num_pages > 0 ? launch_seesaw<Elem>(p, options, stream)
                                              : launch_lockstep<Elem>(p, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_combine<Elem>(p, options, stream);
}

}  // namespace kvpager
