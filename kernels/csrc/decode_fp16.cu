#include "decode_launch.cuh"
namespace kvpager {
cudaError_t launch_mla_decode_fp16(const DecodeParams& p, const DecodeOptions& o, cudaStream_t s) { return launch_decode<__half>(p, o, s); }
}  // namespace kvpager
