#include "decode_launch.cuh"
namespace kvpager {
cudaError_t launch_mla_decode_bf16(const DecodeParams& p, const DecodeOptions& o, cudaStream_t s) { return launch_decode<__nv_bfloat16>(p, o, s); }
}  // namespace kvpager
