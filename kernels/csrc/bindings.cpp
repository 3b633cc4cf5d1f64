// The only file that touches torch: workspace allocation, registration of the custom ops
// torch.ops.kvpager.get_mla_metadata / mla_decode / mla_decode_fp8, and the checks that keep the
// kernels' memory accesses in bounds (device, dtype, ranks, the sizes and strides they index by).
// What an argument means (head_dim_v, s_q >= 1, h_q % h_kv, the metadata's part count, the GPU
// generation) is kvpager.mla's to validate, once, in Python.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#include "config.h"
#include "launch.h"

namespace {

// Each check's message is built from the check itself, so text and condition cannot drift.
// Values are turned into text here (std::to_string, c10::toString, Device::str) rather than
// streamed: on the device image, streaming an integer through c10::str from this extension
// crashed the process (seen 2026-11-23), so no number goes through an ostream.
std::string text(int64_t v) { return std::to_string(v); }
std::string text(int v) { return std::to_string(v); }
std::string text(const char* v) { return v; }
std::string text(const std::string& v) { return v; }
std::string text(at::ScalarType v) { return c10::toString(v); }
std::string text(const c10::Device& v) { return v.str(); }
std::string text(at::IntArrayRef v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}
template <typename... Args>
std::string message(const Args&... args) {
  std::string out = "kvpager: ";
  ((out += text(args)), ...);
  return out;
}

#define KVP_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))
#define KVP_CHECK_CUDA(x) KVP_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define KVP_CHECK_DTYPE(x, dt) \
  KVP_CHECK((x).scalar_type() == (dt), #x ".dtype must be ", (dt), ", got ", (x).scalar_type())
#define KVP_CHECK_DIM(x, n) \
  KVP_CHECK((x).dim() == (n), #x " must have " #n " dims, got shape ", (x).sizes())
#define KVP_CHECK_SIZE(x, i, v)                                                              \
  KVP_CHECK((x).size(i) == (v), #x ".size(" #i ") must be " #v " = ", int64_t(v), ", got ",  \
            (x).size(i), " (shape ", (x).sizes(), ")")
#define KVP_CHECK_LAST_CONTIGUOUS(x) \
  KVP_CHECK((x).stride(-1) == 1, #x " must be contiguous in its last dim, got strides ", (x).strides())
#define KVP_CHECK_CONTIGUOUS(x) KVP_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())
#define KVP_CHECK_ARG(cond, ...) KVP_CHECK(cond, "expected " #cond ", ", __VA_ARGS__)
#define KVP_CUDA_CHECK(expr)                                                                \
  do {                                                                                      \
    const cudaError_t err_ = (expr);                                                        \
    KVP_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));            \
  } while (0)

// Base address and every stride (of dims longer than 1) in multiples of 16 bytes: the kernels'
// 16-byte vector copies of rows.
bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % kvpager::kChunkBytes != 0) return false;
  for (int i = 0; i < t.dim() - 1; ++i)
    if (t.size(i) > 1 && (t.stride(i) * t.element_size()) % kvpager::kChunkBytes != 0) return false;
  return true;
}

// Run-time switches, read on every call so one process can compare them (and a CUDA graph keeps
// the ones it was captured with): KVPAGER_MLA_KERNEL=seesaw|lockstep picks the 64-row kernel,
// KVPAGER_SEESAW_ORDER=11|15 the seesaw kernel's hand-off order (launch.h),
// KVPAGER_SEESAW_Q=tma|cp.async how it loads Q,
// KVPAGER_PDL=0 launches the combine kernel without programmatic dependent launch,
// KVPAGER_TMA_HINT=first|normal|last the L2 eviction priority of its page loads,
// KVPAGER_FP8_DECODE=ws|split the FP8 kernel of 16-row blocks, KVPAGER_FP8_PREFETCH=0-8 the ws
// kernel's L2 prefetch distance in pages, KVPAGER_COMBINE_GRID=wave|unit the combine kernel's grid
// and KVPAGER_COMBINE_LOADS=4|8|16 its partial loads (launch.h). Called under the call's device guard.
kvpager::DecodeOptions options_from_env() {
  kvpager::DecodeOptions options;
  options.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const char* kernel = std::getenv("KVPAGER_MLA_KERNEL");
  const std::string name = kernel ? kernel : "seesaw";
  KVP_CHECK(name == "seesaw" || name == "lockstep", "KVPAGER_MLA_KERNEL must be seesaw or lockstep, got ", name);
  options.seesaw = name == "seesaw";
  const char* order = std::getenv("KVPAGER_SEESAW_ORDER");
  if (order != nullptr) {
    const std::string v = order;
    KVP_CHECK(v == "11" || v == "15", "KVPAGER_SEESAW_ORDER must be 11 or 15, got ", v);
    options.seesaw_order = std::stoi(v);
  }
  const char* q_load = std::getenv("KVPAGER_SEESAW_Q");
  if (q_load != nullptr) {
    const std::string v = q_load;
    KVP_CHECK(v == "tma" || v == "cp.async", "KVPAGER_SEESAW_Q must be tma or cp.async, got ", v);
    options.seesaw_q_by_tma = v == "tma";
  }
  const char* pdl = std::getenv("KVPAGER_PDL");
  options.pdl = !(pdl && std::string(pdl) == "0");
  const char* hint = std::getenv("KVPAGER_TMA_HINT");
  if (hint != nullptr) {
    const std::string h = hint;
    KVP_CHECK(h == "first" || h == "normal" || h == "last", "KVPAGER_TMA_HINT must be first, normal or last, got ", h);
    using Hint = kvpager::DecodeOptions::CacheHint;
    options.page_cache_hint = h == "first" ? Hint::kFirst : h == "last" ? Hint::kLast : Hint::kNormal;
  }
  const char* fp8 = std::getenv("KVPAGER_FP8_DECODE");
  if (fp8 != nullptr) {
    const std::string f = fp8;
    KVP_CHECK(f == "ws" || f == "split", "KVPAGER_FP8_DECODE must be ws or split, got ", f);
    options.fp8_warp_specialized = f == "ws";
  }
  const char* fp8_prefetch = std::getenv("KVPAGER_FP8_PREFETCH");
  if (fp8_prefetch != nullptr) {
    const std::string v = fp8_prefetch;
    KVP_CHECK(v.size() == 1 && v[0] >= '0' && v[0] <= '8', "KVPAGER_FP8_PREFETCH must be 0-8 (pages), got ", v);
    options.fp8_prefetch_pages = v[0] - '0';
  }
  const char* combine_grid = std::getenv("KVPAGER_COMBINE_GRID");
  if (combine_grid != nullptr) {
    const std::string v = combine_grid;
    KVP_CHECK(v == "wave" || v == "unit", "KVPAGER_COMBINE_GRID must be wave or unit, got ", v);
    options.combine_one_wave = v == "wave";
  }
  const char* combine_loads = std::getenv("KVPAGER_COMBINE_LOADS");
  if (combine_loads != nullptr) {
    const std::string v = combine_loads;
    KVP_CHECK(v == "4" || v == "8" || v == "16", "KVPAGER_COMBINE_LOADS must be 4, 8 or 16, got ", v);
    options.combine_loads = std::stoi(v);
  }
  return options;
}

int64_t num_sm_parts(int sm_count, int64_t rows, int64_t h_kv) {
  const int64_t block_m = kvpager::block_m_for(static_cast<int>(rows));
  const int64_t m_blocks = (rows + block_m - 1) / block_m;
  return std::max<int64_t>(1, sm_count / (h_kv * m_blocks));
}

std::tuple<at::Tensor, at::Tensor> get_mla_metadata(const at::Tensor& cache_seqlens,
                                                    int64_t num_heads_per_head_k,
                                                    int64_t num_heads_k) {
  KVP_CHECK_CUDA(cache_seqlens);
  KVP_CHECK_DTYPE(cache_seqlens, at::kInt);
  KVP_CHECK_DIM(cache_seqlens, 1);
  KVP_CHECK_CONTIGUOUS(cache_seqlens);
  KVP_CHECK_ARG(num_heads_per_head_k > 0, "got num_heads_per_head_k = ", num_heads_per_head_k,
                " (pass s_q * h_q // h_kv)");
  KVP_CHECK_ARG(num_heads_k > 0, "got num_heads_k = ", num_heads_k);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int sm_count = at::cuda::getDeviceProperties(cache_seqlens.device().index())->multiProcessorCount;
  const int64_t parts = num_sm_parts(sm_count, num_heads_per_head_k, num_heads_k);
  const int64_t batch = cache_seqlens.size(0);
  auto opts = cache_seqlens.options().dtype(at::kInt);
  at::Tensor meta = at::empty({parts, kvpager::kMetadataFields}, opts);
  at::Tensor num_splits = at::empty({batch + 1}, opts);
  kvpager::MetadataParams p{};
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.tile_metadata = meta.data_ptr<int32_t>();
  p.num_splits = num_splits.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.num_parts = static_cast<int>(parts);
  KVP_CUDA_CHECK(kvpager::launch_mla_metadata(p, at::cuda::getCurrentCUDAStream()));
  return {meta, num_splits};
}

// Checks shared by both decode ops: one device, and the table, length and schedule tensors the
// kernels index by (q and k_cache are checked by each op for its own cache format).
void check_schedule_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                         const at::Tensor& cache_seqlens, const at::Tensor& tile_scheduler_metadata,
                         const at::Tensor& num_splits) {
  using namespace kvpager;
  KVP_CHECK_CUDA(q);
  for (const at::Tensor* t : {&k_cache, &block_table, &cache_seqlens, &tile_scheduler_metadata, &num_splits})
    KVP_CHECK(t->device() == q.device(), "every tensor must be on ", q.device(), ", got one on ",
              t->device(), "; put every tensor on one GPU");
  KVP_CHECK_DIM(q, 4);
  KVP_CHECK_DIM(k_cache, 4);
  const int64_t batch = q.size(0), h_kv = k_cache.size(2);
  KVP_CHECK_ARG(h_kv >= 1, "got k_cache.size(2) = h_kv = ", h_kv);
  KVP_CHECK_DTYPE(block_table, at::kInt);
  KVP_CHECK_DIM(block_table, 2);
  KVP_CHECK_SIZE(block_table, 0, batch);
  KVP_CHECK_LAST_CONTIGUOUS(block_table);
  KVP_CHECK_DTYPE(cache_seqlens, at::kInt);
  KVP_CHECK_DIM(cache_seqlens, 1);
  KVP_CHECK_SIZE(cache_seqlens, 0, batch);
  KVP_CHECK_CONTIGUOUS(cache_seqlens);
  KVP_CHECK_DTYPE(tile_scheduler_metadata, at::kInt);
  KVP_CHECK_DIM(tile_scheduler_metadata, 2);
  KVP_CHECK_SIZE(tile_scheduler_metadata, 1, kMetadataFields);
  KVP_CHECK_CONTIGUOUS(tile_scheduler_metadata);
  KVP_CHECK_DTYPE(num_splits, at::kInt);
  KVP_CHECK_DIM(num_splits, 1);
  KVP_CHECK_SIZE(num_splits, 0, batch + 1);
  KVP_CHECK_CONTIGUOUS(num_splits);
}

// Outputs (out in q's dtype, lse), the split workspace and the kernel parameters of a checked call.
struct DecodeCall {
  at::Tensor out, lse, out_accum, lse_accum;
  kvpager::DecodeParams params{};
};

DecodeCall prepare_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                          const at::Tensor& cache_seqlens, const at::Tensor& tile_scheduler_metadata,
                          const at::Tensor& num_splits, double softmax_scale, bool causal) {
  using namespace kvpager;
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), h_kv = k_cache.size(2);
  const int64_t groups = h_q / h_kv, rows = s_q * groups;
  const int64_t parts = tile_scheduler_metadata.size(0);
  DecodeCall c;
  c.out = at::empty({batch, s_q, h_q, kHeadDimV}, q.options());
  c.lse = at::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  // Partials: at most one split per sequence plus one extra per part boundary.
  c.out_accum = at::empty({batch + parts, h_kv, rows, kHeadDimV}, q.options().dtype(at::kFloat));
  c.lse_accum = at::empty({batch + parts, h_kv, rows}, q.options().dtype(at::kFloat));
  DecodeParams& p = c.params;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.tile_metadata = tile_scheduler_metadata.data_ptr<int32_t>();
  p.num_splits = num_splits.data_ptr<int32_t>();
  p.out = c.out.data_ptr();
  p.lse = c.lse.data_ptr<float>();
  p.out_accum = c.out_accum.data_ptr<float>();
  p.lse_accum = c.lse_accum.data_ptr<float>();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_page_stride = k_cache.stride(0);
  p.k_token_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.block_table_stride = block_table.stride(0);
  p.batch = static_cast<int>(batch);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.groups = static_cast<int>(groups);
  p.rows = static_cast<int>(rows);
  p.num_parts = static_cast<int>(parts);
  p.num_pages = static_cast<int>(k_cache.size(0));
  p.max_pages = static_cast<int>(block_table.size(1));
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  return c;
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& block_table,
                                              const at::Tensor& cache_seqlens, int64_t head_dim_v,
                                              const at::Tensor& tile_scheduler_metadata,
                                              const at::Tensor& num_splits, double softmax_scale,
                                              bool causal) {
  using namespace kvpager;
  check_schedule_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits);
  KVP_CHECK_ARG(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "q.dtype must be bfloat16 or float16, got ", q.scalar_type());
  KVP_CHECK_DTYPE(k_cache, q.scalar_type());
  KVP_CHECK_SIZE(q, 3, kHeadDim);
  KVP_CHECK_SIZE(k_cache, 1, kPageSize);
  KVP_CHECK_SIZE(k_cache, 3, kHeadDim);
  KVP_CHECK_LAST_CONTIGUOUS(q);
  KVP_CHECK_LAST_CONTIGUOUS(k_cache);
  KVP_CHECK(aligned16(q) && aligned16(k_cache),
            "q and k_cache need 16-byte aligned rows (pointer and strides multiples of 8 elements)");

  const c10::cuda::CUDAGuard guard(q.device());
  DecodeCall c = prepare_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                softmax_scale, causal);
  if (q.size(0) == 0) return {c.out, c.lse};
  const DecodeOptions options = options_from_env();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    KVP_CUDA_CHECK(launch_mla_decode_bf16(c.params, options, stream));
  } else {
    KVP_CUDA_CHECK(launch_mla_decode_fp16(c.params, options, stream));
  }
  return {c.out, c.lse};
}

// The fused FP8 decode: k_cache holds 656-byte rows (kvpager/fp8.py's layout) as uint8 or
// float8_e4m3fn bytes, any 16-byte multiple page / token / head stride (e.g. 65-row pages); q is
// bf16; out bf16. Any rows = s_q * h_q / h_kv (64-row blocks on the seesaw kernel).
std::tuple<at::Tensor, at::Tensor> mla_decode_fp8(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& block_table,
                                                  const at::Tensor& cache_seqlens, int64_t head_dim_v,
                                                  const at::Tensor& tile_scheduler_metadata,
                                                  const at::Tensor& num_splits, double softmax_scale,
                                                  bool causal) {
  using namespace kvpager;
  check_schedule_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits);
  KVP_CHECK_DTYPE(q, at::kBFloat16);
  KVP_CHECK_ARG(k_cache.scalar_type() == at::kByte || k_cache.scalar_type() == at::kFloat8_e4m3fn,
                "k_cache.dtype must be uint8 or float8_e4m3fn (656-byte FP8 rows), got ", k_cache.scalar_type());
  KVP_CHECK_SIZE(q, 3, kHeadDim);
  KVP_CHECK_SIZE(k_cache, 1, kPageSize);
  KVP_CHECK_SIZE(k_cache, 3, kFp8TokenBytes);
  KVP_CHECK_LAST_CONTIGUOUS(q);
  KVP_CHECK_LAST_CONTIGUOUS(k_cache);
  KVP_CHECK(aligned16(q) && aligned16(k_cache),
            "q and k_cache need 16-byte aligned rows (pointer and strides multiples of 16 bytes)");

  const c10::cuda::CUDAGuard guard(q.device());
  DecodeCall c = prepare_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                softmax_scale, causal);
  if (q.size(0) == 0) return {c.out, c.lse};
  KVP_CUDA_CHECK(launch_mla_decode_fp8(c.params, options_from_env(), at::cuda::getCurrentCUDAStream()));
  return {c.out, c.lse};
}

}  // namespace

TORCH_LIBRARY(kvpager, m) {
  m.def("get_mla_metadata(Tensor cache_seqlens, int num_heads_per_head_k, int num_heads_k) -> (Tensor, Tensor)");
  m.def(
      "mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
      "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal) -> (Tensor, Tensor)");
  m.def(
      "mla_decode_fp8(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
      "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvpager, CUDA, m) {
  m.impl("get_mla_metadata", &get_mla_metadata);
  m.impl("mla_decode", &mla_decode);
  m.impl("mla_decode_fp8", &mla_decode_fp8);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvpager's Hopper MLA decode kernels; the ops are torch.ops.kvpager.*";
}
