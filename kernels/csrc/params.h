// Plain parameter structs for the kernels: pointers, strides, sizes. No torch types here.
#pragma once
#include <cstdint>

namespace kvpager {

struct DecodeParams {
  const void* q;              // [batch, s_q, h_q, 576]
  const void* k_cache;        // [num_pages, 64, h_kv, 576]
  const int32_t* block_table; // [batch, max_pages]
  const int32_t* cache_seqlens;        // [batch]
  const int32_t* tile_metadata;        // [num_parts, kMetadataFields]
  const int32_t* num_splits;           // [batch + 1] prefix sums
  void* out;                  // [batch, s_q, h_q, 512], contiguous
  float* lse;                 // [batch, h_q, s_q], contiguous
  float* out_accum;           // [batch + num_parts, h_kv, rows, 512] partials of split sequences
  float* lse_accum;           // [batch + num_parts, h_kv, rows]

  int64_t q_batch_stride, q_seq_stride, q_head_stride;        // in elements
  int64_t k_page_stride, k_token_stride, k_head_stride;       // in elements
  int64_t block_table_stride;                                 // in elements

  int batch;
  int s_q;
  int h_q;
  int h_kv;
  int groups;        // h_q / h_kv
  int rows;          // s_q * groups: query rows per (sequence, kv head)
  int num_parts;
  int num_pages;     // pool size, for debug bounds checks
  int max_pages;     // block_table columns
  float scale_log2;  // softmax_scale * log2(e)
  bool causal;
  int fp8_prefetch_pages; // FP8 ws: L2 prefetch distance in pages from the page loaded into registers
  uint64_t page_cache_hint;  // seesaw: L2 cache-policy operand of the page TMA loads
};

struct MetadataParams {
  const int32_t* cache_seqlens;  // [batch]
  int32_t* tile_metadata;        // [num_parts, kMetadataFields]
  int32_t* num_splits;           // [batch + 1]
  int batch;
  int num_parts;
};

}  // namespace kvpager
