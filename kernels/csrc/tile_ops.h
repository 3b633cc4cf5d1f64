// Device helpers shared by the decode kernel: swizzled shared-memory addressing, and thin
// wrappers over CuTe's sm80 atoms (cp.async, ldmatrix, mma.m16n8k16) for bf16 / fp16.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/util.hpp>

#include "config.h"

namespace kvpager {

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile whose rows are `row_bytes` long
// (a multiple of 128). The chunk index is XORed with the row's low 3 bits, so the 8 rows an
// ldmatrix phase reads land in 8 different 16-byte bank groups: conflict-free, no padding.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk, int row_bytes) {
  return row * row_bytes + ((chunk ^ (row & 7)) * kChunkBytes);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return cute::cast_smem_ptr_to_uint(p);
}

// The shared-memory plan at the first 1024-byte boundary of dynamic shared memory (wgmma's
// swizzle atoms and TMA's 128-byte swizzle need it). Derived from smem_raw by pointer arithmetic,
// not through an integer, so the compiler still knows it is shared memory (ld/st.shared, not
// generic accesses with 64-bit addresses).
template <typename Plan>
__device__ __forceinline__ Plan& aligned_plan(char* smem_raw) {
  const uint32_t misalign = smem_addr(smem_raw) & 1023u;
  return *reinterpret_cast<Plan*>(smem_raw + ((1024u - misalign) & 1023u));
}

// 16-byte global -> shared copy; zero-fills the destination when `valid` is false (the source
// is then not read, but must still be a mapped address).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  using Atom = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;
  Atom::copy(*reinterpret_cast<const cute::uint128_t*>(gmem_src),
             *reinterpret_cast<cute::uint128_t*>(smem_dst), valid);
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) {
  asm volatile("ldmatrix.sync.aligned.x2.m8n8.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Per-dtype MMA atom and float packing.
template <typename Elem> struct ElemOps;

template <> struct ElemOps<__nv_bfloat16> {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <> struct ElemOps<__half> {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// d[4 tile .. 4 tile + 3] += a * b for one m16n8k16 tile (fp32 accumulate); `tile` must be a
// compile-time constant after unrolling, so d stays in registers.
template <typename Elem, int N>
__device__ __forceinline__ void mma_16x8x16(float (&d)[N], int tile, const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  float* c = d + 4 * tile;
  ElemOps<Elem>::Mma::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace kvpager
