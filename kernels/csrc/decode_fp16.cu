#include "decode_launch.cuh"
namespace kvpager {
cudaError_t launch_mla_decode_fp16(const DecodeParams& p, cudaStream_t s) { return launch_decode<__half>(p, s); }
int mla_decode_smem_bytes(int rows) {
  switch (block_m_for(rows)) {
    case 16: return TileShape<16>::kSmemBytes;
    case 32: return TileShape<32>::kSmemBytes;
    default: return TileShape<64>::kSmemBytes;
  }
}
}  // namespace kvpager
