#include "decode_fp8_launch.cuh"
namespace kvpager {
cudaError_t launch_mla_decode_fp8(const DecodeParams& p, const DecodeOptions& o, cudaStream_t s) { return launch_decode_fp8(p, o, s); }
}  // namespace kvpager
