// How long one page's TMA copies take from issue to landing, away from the seesaw kernel (issue 9,
// docs/kernel-perf.md "What is weak / next", s19): the seesaw's reloads land ~2,500 cycles after
// their issue while L2 and DRAM are at half load or less. This splits that time between the copy
// engine and memory. One thread a CTA issues `tiles` 64 x 64 bf16 tiles of a page through the
// kernel's own path (tma.cuh: the same tensor map, copy atom, barriers and L2 hint) and times
// issue -> first tile landed -> all landed with clock64(), page after page. Cases:
//   1 CTA, pages from DRAM (L2 flushed) or L2-resident: the unloaded latency;
//   132 CTAs streaming distinct pages: the latency under the HBM read load;
//   132 CTAs where every 4 CTAs read the same pages at once (h_q 128 s_q 2's four row blocks).
// Build and run on the device (CUTLASS headers from the nvidia-cutlass wheel):
//   C=$(python3 -c 'import importlib.util as u; print(u.find_spec("cutlass_library").submodule_search_locations[0])')
//   nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 --expt-relaxed-constexpr \
//     -I$C/source/include -Ikernels/csrc scripts/tma_latency_probe.cu -o /tmp/tma_probe && /tmp/tma_probe
#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <vector>

#include <cutlass/arch/barrier.h>

#include "config.h"
#include "params.h"
#include "tma.cuh"

namespace {

using kvpager::TileBarrier;
constexpr int kIters = 64;

#define CHECK(x)                                                                     \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

// CTA b, iteration i reads page (b / share + i * groups) % num_pages, groups = gridDim.x / share:
// `share` CTAs read the same pages at the same steps. out[b][i] = {first tile landed, all landed}
// in cycles since the issue of the first copy.
__global__ void probe_kernel(const __grid_constant__ CUtensorMap map, int num_pages, int tiles, int share,
                             uint64_t cache_hint, long long* out) {
  extern __shared__ char smem_raw[];
  __shared__ uint64_t ready[kvpager::kColBlocks];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  if (threadIdx.x == 0) {
    for (int c = 0; c < kvpager::kColBlocks; ++c) TileBarrier::init(&ready[c], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int groups = max(1, gridDim.x / share);
  uint32_t phase = 0;
  for (int i = 0; i < kIters; ++i) {
    const int page = (blockIdx.x / share + i * groups) % num_pages;
    const long long t0 = clock64();
    kvpager::load_page_tiles(&map, ready, smem, page, 0, 0, tiles, cache_hint);
    TileBarrier::wait(&ready[0], phase);
    const long long t1 = clock64();
    for (int c = 1; c < tiles; ++c) TileBarrier::wait(&ready[c], phase);
    const long long t2 = clock64();
    phase ^= 1;
    out[2 * (blockIdx.x * kIters + i)] = t1 - t0;
    out[2 * (blockIdx.x * kIters + i) + 1] = t2 - t0;
  }
}

long long percentile(std::vector<long long> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * v.size()))];
}

}  // namespace

int main() {
  int sms = 0, clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("tma_latency_probe: %s, %d SMs, max SM clock %.2f GHz, L2 %d MB\n", prop.name, sms, clock_khz / 1e6,
              prop.l2CacheSize >> 20);

  const int cold_pages = 8192, warm_pages = 16;  // 604 MB (past L2) / 1.2 MB (L2-resident)
  void* cache = nullptr;
  void* flush = nullptr;
  long long* out = nullptr;
  CHECK(cudaMalloc(&cache, size_t(cold_pages) * kvpager::kPageBytes));
  CHECK(cudaMemset(cache, 0, size_t(cold_pages) * kvpager::kPageBytes));
  CHECK(cudaMalloc(&flush, 256 << 20));
  CHECK(cudaMalloc(&out, sizeof(long long) * 2 * sms * kIters));
  const int smem = kvpager::kColBlocks * kvpager::kPageTileBytes + 1024;
  CHECK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const uint64_t evict_first = uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST);  // the seesaw's default

  struct Case {
    const char* name;
    int ctas, tiles, share, pages;
    bool flush;
  };
  const Case cases[] = {
      {"1 CTA, DRAM, 1 tile", 1, 1, 1, cold_pages, true},
      {"1 CTA, DRAM, 5 tiles (a tile group)", 1, 5, 1, cold_pages, true},
      {"1 CTA, DRAM, 9 tiles (a page)", 1, 9, 1, cold_pages, true},
      {"1 CTA, L2, 5 tiles", 1, 5, 1, warm_pages, false},
      {"all CTAs, DRAM, 5 tiles, distinct pages", sms, 5, 1, cold_pages, true},
      {"all CTAs, DRAM, 9 tiles, distinct pages", sms, 9, 1, cold_pages, true},
      {"all CTAs, 5 tiles, 4 CTAs a page (h_q 128 s_q 2)", sms, 5, 4, cold_pages, true},
      {"all CTAs, L2, 5 tiles, distinct pages", sms, 5, 1, 64, false},
  };
  std::printf("%-50s %8s %8s %8s %8s %10s\n", "case (cycles from the first issue)", "first50", "all50", "all90",
              "all99", "GB/s");
  for (const Case& c : cases) {
    kvpager::DecodeParams p{};
    p.k_cache = cache;
    p.k_token_stride = kvpager::kHeadDim;
    p.k_head_stride = kvpager::kHeadDim;
    p.k_page_stride = int64_t(kvpager::kPageSize) * kvpager::kHeadDim;
    p.h_kv = 1;
    p.num_pages = c.pages;
    CUtensorMap map;
    CHECK(kvpager::encode_page_tensor_map<__nv_bfloat16>(p, &map));
    if (!c.flush) probe_kernel<<<c.ctas, 32, smem>>>(map, c.pages, c.tiles, c.share, evict_first, out);  // warm L2
    if (c.flush) CHECK(cudaMemset(flush, 1, 256 << 20));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    CHECK(cudaEventRecord(a));
    probe_kernel<<<c.ctas, 32, smem>>>(map, c.pages, c.tiles, c.share, evict_first, out);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    std::vector<long long> host(2 * c.ctas * kIters), first, all;
    CHECK(cudaMemcpy(host.data(), out, sizeof(long long) * host.size(), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < host.size(); i += 2) {
      first.push_back(host[i]);
      all.push_back(host[i + 1]);
    }
    const double bytes = double(c.ctas) * kIters * c.tiles * kvpager::kPageTileBytes;
    std::printf("%-50s %8lld %8lld %8lld %8lld %10.0f\n", c.name, percentile(first, 0.5), percentile(all, 0.5),
                percentile(all, 0.9), percentile(all, 0.99), bytes / (ms * 1e6));
  }
  return 0;
}
