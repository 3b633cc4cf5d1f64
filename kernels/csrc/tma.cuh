// TMA (bulk tensor copy) of K/V page tiles: the tensor map over the paged cache (host), and the
// copy of 64 x 64 tiles into the wgmma block layout, each completing on its own mbarrier (device).
// The copy atom and the barrier are CUTLASS's (SM90_TMA_LOAD_4D, ClusterTransactionBarrier).
#pragma once
#include <cuda.h>  // CUtensorMap and the driver enums (header only: the encoder is fetched at run time)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "params.h"

namespace kvpager {

using TileBarrier = cutlass::arch::ClusterTransactionBarrier;

template <typename Elem> struct TmaElem;
template <> struct TmaElem<__nv_bfloat16> { static constexpr CUtensorMapDataType kType = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; };
template <> struct TmaElem<__half> { static constexpr CUtensorMapDataType kType = CU_TENSOR_MAP_DATA_TYPE_FLOAT16; };

// The entry point of the driver's tensor-map encoder (fetched once at run time: no -lcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The cache [num_pages, 64, h_kv, 576] as a 4-D tensor (576, 64, h_kv, num_pages), innermost first,
// copied in boxes of 64 columns x 64 tokens with the 128-byte swizzle (= the wgmma block layout).
// Needs num_pages >= 1, a 16-byte aligned base and 16-byte multiple strides (the binding checks).
template <typename Elem>
cudaError_t encode_page_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr int64_t kElemBytes = sizeof(Elem);
  // A stride of a size-1 dim is never used to address; give it any legal value.
  const cuuint64_t token_stride = p.k_token_stride * kElemBytes;
  const cuuint64_t head_stride = p.h_kv > 1 ? p.k_head_stride * kElemBytes : kRowBytes;
  const cuuint64_t page_stride = p.num_pages > 1 ? p.k_page_stride * kElemBytes : kPageBytes;
  const cuuint64_t dims[4] = {kHeadDim, kPageSize, cuuint64_t(p.h_kv), cuuint64_t(p.num_pages)};
  const cuuint64_t strides[3] = {token_stride, head_stride, page_stride};
  const cuuint32_t box[4] = {kBlockCols, kPageSize, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, TmaElem<Elem>::kType, 4, const_cast<void*>(p.k_cache), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// q [batch, s_q, h_q, 576] as a 4-D tensor (576, h_q, s_q, batch), copied in boxes of 64 columns x
// one row block (64 query rows: bh heads x bs query positions, bh = min(groups, 64)) with the
// 128-byte swizzle, so a box lands as one Q tile of the wgmma block layout, rows in row-block order
// (s * groups + head). Rows past the last query fall outside s_q and are zero-filled. False (and no
// map) where q does not suit: an unaligned base or stride, a broadcast stride, or groups neither a
// multiple nor a divisor of 64 (a row block would mix kv heads); the kernel then loads Q by cp.async.
template <typename Elem>
bool encode_q_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  constexpr int64_t kElemBytes = sizeof(Elem);
  const int s_q = p.rows / p.groups, bh = p.groups < 64 ? p.groups : 64;
  const bool aligned = reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && (p.q_head_stride * kElemBytes) % 16 == 0 &&
                       (p.q_seq_stride * kElemBytes) % 16 == 0 && (p.q_batch_stride * kElemBytes) % 16 == 0;
  if (encode == nullptr || !aligned || (p.groups % 64 != 0 && 64 % p.groups != 0)) return false;
  // A stride of a size-1 dim is never used to address; give it any legal value.
  const int64_t h_q = int64_t(p.h_kv) * p.groups;
  const cuuint64_t head_stride = h_q > 1 ? p.q_head_stride * kElemBytes : kRowBytes;
  const cuuint64_t seq_stride = s_q > 1 ? p.q_seq_stride * kElemBytes : h_q * kRowBytes;
  const cuuint64_t batch_stride = p.batch > 1 ? p.q_batch_stride * kElemBytes : s_q * h_q * kRowBytes;
  if (head_stride == 0 || seq_stride == 0 || batch_stride == 0) return false;  // broadcast q: cp.async
  const cuuint64_t dims[4] = {kHeadDim, cuuint64_t(h_q), cuuint64_t(s_q), cuuint64_t(p.batch)};
  const cuuint64_t strides[3] = {head_stride, seq_stride, batch_stride};
  const cuuint32_t box[4] = {kBlockCols, cuuint32_t(bh), cuuint32_t(64 / bh), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, TmaElem<Elem>::kType, 4, const_cast<void*>(p.q), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// One thread: tiles [first, last) of page `page_id` (kv head hk) into `tiles` (kPageTileBytes each,
// 1024-byte aligned), tile c completing on ready[c]; cache_hint is the L2 policy operand
// (cute::TMA::CacheHintSm90).
__device__ __forceinline__ void load_page_tiles(const CUtensorMap* map, uint64_t* ready, char* tiles,
                                                int page_id, int hk, int first, int last, uint64_t cache_hint) {
#pragma unroll
  for (int c = first; c < last; ++c) {
    TileBarrier::arrive_and_expect_tx(&ready[c], kPageTileBytes);
    cute::SM90_TMA_LOAD_4D::copy(map, &ready[c], cache_hint, tiles + c * kPageTileBytes, c * kBlockCols, 0, hk,
                                 page_id);
  }
}

}  // namespace kvpager
