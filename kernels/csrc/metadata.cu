// The split-KV tile scheduler on the GPU: one CTA, no host synchronisation, so it can be
// captured in a CUDA graph. The algorithm (and the metadata format) is documented in
// kernels/schedule.py, its PyTorch twin and test oracle.
//
// Each sequence b sits on a cost line at [start_b, start_b + pages_b + overhead), overhead
// first; part q owns positions [q*W, (q+1)*W). first(b)/last(b) are the parts holding b's first
// and last page. Because first/last never decrease with b, part q's first sequence is the b with
// last(b-1) < q <= last(b), and its last sequence the b with first(b) <= q < first(b+1): each
// thread writes the parts whose boundaries its own sequence defines.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "config.h"
#include "launch.h"
#include "tile_ops.h"

namespace kvpager {
namespace {

struct PartRange {
  int first, last, pages, start;
};

__device__ __forceinline__ int pages_of(const int32_t* lens, int b) {
  return ceil_div(max(lens[b], 0), kPageSize);
}

__device__ __forceinline__ PartRange part_range(int start, int pages, int width) {
  const int first_page_pos = start + kFixedOverheadPages;
  PartRange r;
  r.pages = pages;
  r.start = start;
  r.first = pages > 0 ? first_page_pos / width : start / width;
  r.last = pages > 0 ? (first_page_pos + pages - 1) / width : r.first;
  return r;
}

__device__ void write_parts_of(const MetadataParams& p, int b, const PartRange& me,
                               int prev_last, int next_first, int width) {
  int32_t* meta = p.tile_metadata;
  const int first_page_pos = me.start + kFixedOverheadPages;
  for (int q = prev_last + 1; q <= me.last; ++q) {  // parts that begin with b
    int32_t* m = meta + q * kMetadataFields;
    const bool empty = me.first > q;  // q holds only b's overhead: no page of anyone
    m[0] = b;
    m[1] = (empty || me.pages == 0) ? 0 : max(0, q * width - first_page_pos);
    m[2] = empty ? 0 : q - me.first;
  }
  for (int q = me.first; q < next_first; ++q) {  // parts that end with b
    int32_t* m = meta + q * kMetadataFields;
    m[3] = b;
    m[4] = (q > me.last || me.pages == 0) ? 0 : min(me.pages, (q + 1) * width - first_page_pos);
  }
}

__global__ void __launch_bounds__(kMetadataThreads)
    mla_metadata_kernel(const __grid_constant__ MetadataParams p) {
  using Scan = cub::BlockScan<int, kMetadataThreads>;
  using Reduce = cub::BlockReduce<int, kMetadataThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  __shared__ int s_total, s_cost_carry, s_split_carry;
  const int tid = threadIdx.x;
  const int batch = p.batch, parts = p.num_parts;
  const int32_t* lens = p.cache_seqlens;

  for (int q = tid; q < parts; q += kMetadataThreads)
    for (int f = 5; f < kMetadataFields; ++f) p.tile_metadata[q * kMetadataFields + f] = 0;
  if (batch == 0) {
    for (int q = tid; q < parts; q += kMetadataThreads) {
      int32_t* m = p.tile_metadata + q * kMetadataFields;
      m[0] = m[1] = m[2] = m[4] = 0;
      m[3] = -1;
    }
    if (tid == 0) p.num_splits[0] = 0;
    return;
  }

  int local = 0;
  for (int b = tid; b < batch; b += kMetadataThreads) local += pages_of(lens, b) + kFixedOverheadPages;
  const int total_sum = Reduce(tmp.reduce).Sum(local);
  if (tid == 0) {
    s_total = total_sum;
    s_cost_carry = 0;
    s_split_carry = 0;
    p.num_splits[0] = 0;
  }
  __syncthreads();
  const int width = max(1, ceil_div(s_total, parts));

  for (int base = 0; base < batch; base += kMetadataThreads) {
    const int b = base + tid;
    const bool in = b < batch;
    const int pages = in ? pages_of(lens, b) : 0;
    const int cost = in ? pages + kFixedOverheadPages : 0;
    int start, cost_total;
    Scan(tmp.scan).ExclusiveSum(cost, start, cost_total);
    start += s_cost_carry;
    const PartRange me = part_range(start, pages, width);
    const int splits = in ? me.last - me.first + 1 : 0;
    __syncthreads();  // temp storage reuse
    int split_prefix, split_total;
    Scan(tmp.scan).InclusiveSum(splits, split_prefix, split_total);
    split_prefix += s_split_carry;
    if (in) {
      p.num_splits[b + 1] = split_prefix;
      int prev_last = -1, next_first = parts;
      if (b > 0) {
        const int prev_pages = pages_of(lens, b - 1);
        prev_last = part_range(start - prev_pages - kFixedOverheadPages, prev_pages, width).last;
      }
      if (b + 1 < batch) next_first = part_range(start + cost, pages_of(lens, b + 1), width).first;
      write_parts_of(p, b, me, prev_last, next_first, width);
      if (b == 0) {
        for (int q = 0; q < me.first; ++q) {  // parts before any page: empty
          p.tile_metadata[q * kMetadataFields + 3] = -1;
          p.tile_metadata[q * kMetadataFields + 4] = 0;
        }
      }
      if (b == batch - 1) {
        for (int q = me.last + 1; q < parts; ++q) {  // parts past the last page: empty
          int32_t* m = p.tile_metadata + q * kMetadataFields;
          m[0] = batch;
          m[1] = m[2] = 0;
        }
      }
    }
    __syncthreads();
    if (tid == 0) {
      s_cost_carry += cost_total;
      s_split_carry += split_total;
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_mla_metadata(const MetadataParams& params, cudaStream_t stream) {
  mla_metadata_kernel<<<1, kMetadataThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace kvpager
