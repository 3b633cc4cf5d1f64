// Reading a CTA's share of the split-KV schedule (written by metadata.cu; format in
// kernels/schedule.py): the sequences b = begin_b .. end_b, each as a segment of its pages.
#pragma once
#include "config.h"
#include "params.h"
#include "tile_ops.h"

namespace kvpager {

struct PartWork {
  int begin_b, begin_page, begin_split, end_b, end_page;
};

// One sequence's pages [first_page, end_page) within a part; its partial goes to split_slot of
// the workspace when the sequence has more than one split.
struct Segment {
  int seqlen, first_page, end_page, split_slot, num_splits;
};

__device__ __forceinline__ PartWork part_work(const DecodeParams& p, int part) {
  const int32_t* m = p.tile_metadata + part * kMetadataFields;
  return {m[0], m[1], m[2], m[3], m[4]};
}

__device__ __forceinline__ Segment segment_of(const DecodeParams& p, const PartWork& w, int b) {
  Segment s;
  s.seqlen = p.cache_seqlens[b];
  s.first_page = b == w.begin_b ? w.begin_page : 0;
  s.end_page = b == w.end_b ? w.end_page : ceil_div(s.seqlen, kPageSize);
  const int split_base = p.num_splits[b];
  s.num_splits = p.num_splits[b + 1] - split_base;
  s.split_slot = split_base + (b == w.begin_b ? w.begin_split : 0);
  return s;
}

}  // namespace kvpager
