// Host entry points of the kernels. Plain structs in, cudaError_t out: no torch here.
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace kvpager {

// Run-time switches of a decode call (the binding reads them from the environment).
struct DecodeOptions {
  bool seesaw = true;  // 64-row blocks on the seesaw kernel (false: the lockstep wgmma kernel)
  bool pdl = true;     // launch the combine kernel as a programmatic dependent launch
  // seesaw hand-off order: 15 (s15: WG0 refills buffer 1 before its next S0) or 11 (s12-s14, kept
  // for comparison). decode_seesaw_kernel.cuh, docs/kernel-perf.md.
  int seesaw_order = 15;
  // seesaw: Q by TMA, tile by tile, wherever q's layout suits a tensor map (s23; false: by cp.async,
  // the way before, which the kernel also takes where q does not suit).
  bool seesaw_q_by_tma = true;
  // seesaw: L2 eviction priority of page loads (evict-first measured best: docs/kernel-perf.md).
  enum class CacheHint { kFirst, kNormal, kLast } page_cache_hint = CacheHint::kFirst;
  // FP8 cache, 16-row blocks: the warp-specialized kernel (false: the split-K mma.sync kernel).
  bool fp8_warp_specialized = true;
  // FP8 ws kernel: L2 prefetch of page L + this while page L is loaded (0: off; 1 measured best on
  // the H100, docs/fp8-cache.md).
  int fp8_prefetch_pages = 1;
  // Combine kernel (combine_kernel.cuh; s26 trial, docs/kernel-perf.md "s26"): the walking kernel
  // with a grid of one wave (false: the default kernel, one block per unit), and how the walking
  // kernel loads a row's partials (4: an lse load per split, the default's way; 8 or 16: that many
  // partials in flight, the first ones before the lse, weights by shuffle; with combine_one_wave
  // false, 8 and 16 run the walking kernel with one block per unit).
  bool combine_one_wave = false;
  int combine_loads = 4;
  int sm_count = 0;  // the device's SMs (the binding fills it; 0: one block per unit)
};

// Split-KV schedule for a batch (one CTA, no host synchronisation).
cudaError_t launch_mla_metadata(const MetadataParams& params, cudaStream_t stream);

// Decode kernel + combine kernel on `stream`, for bf16 or fp16 q / k_cache / out.
cudaError_t launch_mla_decode_bf16(const DecodeParams& params, const DecodeOptions& options, cudaStream_t stream);
cudaError_t launch_mla_decode_fp16(const DecodeParams& params, const DecodeOptions& options, cudaStream_t stream);
// The fused FP8 decode: bf16 q / out, k_cache of 656-byte rows (uint8, strides in bytes), rows <= 32.
cudaError_t launch_mla_decode_fp8(const DecodeParams& params, const DecodeOptions& options, cudaStream_t stream);

}  // namespace kvpager
