// Hopper warpgroup-MMA helpers for the 64-row decode kernels: the shared-memory tile layout that
// wgmma reads through descriptors, the descriptors, and the MMA shapes the kernels issue.
#pragma once
#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include "config.h"
#include "tile_ops.h"

namespace kvpager {

// A [rows x 576] tile is stored as 9 column blocks of [rows x 64] halfs (config.h: kBlockCols,
// kColBlocks); a block row is 128 bytes and its 16-byte chunks are XORed with (row % 8): wgmma's
// 128-byte swizzle, with every 8-row atom 1024-byte aligned. The same page serves as K-major B of
// S = Q K^T (keys x d) and as MN-major B of O = P V (keys x d, d contiguous).
constexpr uint32_t kAtomBytes = 8 * kBlockRowBytes;  // 1024: 8 rows x 128 B

__device__ __forceinline__ uint32_t blocked_offset(int rows, int row, int chunk) {
  const int block = chunk / 8, c = chunk % 8;
  return block * rows * kBlockRowBytes + row * kBlockRowBytes + ((c ^ (row & 7)) * kChunkBytes);
}

// Descriptor of a 128-byte-swizzled operand at `addr` (shared-space byte address).
// lbo/sbo in bytes: K-major: sbo = stride between 8-row groups (1024), lbo unused (16);
// MN-major: lbo = stride between 64-element column blocks, sbo = stride between 8-row K groups.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  cute::GmmaDescriptor d;
  d.bitfield.start_address_ = static_cast<uint16_t>(addr >> 4);
  d.bitfield.leading_byte_offset_ = static_cast<uint16_t>(lbo >> 4);
  d.bitfield.stride_byte_offset_ = static_cast<uint16_t>(sbo >> 4);
  d.bitfield.base_offset_ = 0;
  d.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return d.desc_;
}

// `desc` moved by `bytes` (a multiple of 16): only the 14-bit start-address field of the low word
// changes, and shared-memory addresses (< 228 KB) never carry out of it, so a 32-bit add suffices.
// Lets a kernel build one descriptor per operand and step through tiles and k-steps by constants.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(desc) + (bytes >> 4));
}

__device__ __forceinline__ void fence_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Descriptor of a K-major operand (all rows of the 64-column block at `block`), k-step kk:
// 16 columns = 32 bytes into each 128-byte row.
__device__ __forceinline__ uint64_t k_major_desc(uint32_t block, int kk) {
  return gmma_desc(block + kk * 32, 16, kAtomBytes);
}

// Descriptor of V = page columns [64 first_block, ...) as MN-major B of P V, keys [16 kk, 16 kk + 16):
// consecutive 64-column blocks are a page tile (kPageTileBytes) apart, 8-key groups 1024 B apart.
__device__ __forceinline__ uint64_t v_desc(uint32_t page, int first_block, int kk) {
  return gmma_desc(page + first_block * kPageTileBytes + kk * kMmaK * kBlockRowBytes, kPageTileBytes,
                   kAtomBytes);
}

template <typename Elem> struct GmmaOps;

template <> struct GmmaOps<__nv_bfloat16> {
  using ScoreMma = cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                  cute::SM90::GMMA::Major::K>;
  using PageScoreMma = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                      cute::SM90::GMMA::Major::K>;
  using OutMma = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K,
                                                                 cute::SM90::GMMA::Major::MN>;
  using OutMmaRegA = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K,
                                                                     cute::SM90::GMMA::Major::MN>;
};
template <> struct GmmaOps<__half> {
  using ScoreMma = cute::SM90::GMMA::MMA_64x32x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                                cute::SM90::GMMA::Major::K>;
  using PageScoreMma = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                                    cute::SM90::GMMA::Major::K>;
  using OutMma = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K,
                                                               cute::SM90::GMMA::Major::MN>;
  using OutMmaRegA = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_RS<cute::SM90::GMMA::Major::K,
                                                                   cute::SM90::GMMA::Major::MN>;
};

// acc (+)= A * B for one wgmma, A and B in shared memory; `accumulate` false overwrites acc.
template <typename Mma, int N, std::size_t... I>
__device__ __forceinline__ void gmma_call(uint64_t a, uint64_t b, float (&acc)[N], bool accumulate,
                                          std::index_sequence<I...>) {
  Mma::fma(a, b, acc[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One
                                       : cute::SM90::GMMA::ScaleOut::Zero);
}
template <typename Mma, int N>
__device__ __forceinline__ void gmma(uint64_t a, uint64_t b, float (&acc)[N], bool accumulate) {
  gmma_call<Mma>(a, b, acc, accumulate, std::make_index_sequence<N>{});
}

// acc += A * B with A from registers (4 packed pairs: the k16 A fragment) and B in shared memory.
template <typename Mma, int N, std::size_t... I>
__device__ __forceinline__ void gmma_rs_call(const uint32_t* a, uint64_t b, float (&acc)[N],
                                             std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, acc[I]..., cute::SM90::GMMA::ScaleOut::One);
}
template <typename Mma, int N>
__device__ __forceinline__ void gmma_rs(const uint32_t* a, uint64_t b, float (&acc)[N]) {
  gmma_rs_call<Mma>(a, b, acc, std::make_index_sequence<N>{});
}

template <int N>
__device__ __forceinline__ void fence_accumulators(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(acc[i]);
}
template <int N>
__device__ __forceinline__ void fence_fragment(uint32_t (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(a[i]);
}

}  // namespace kvpager
