// A CTA's share of the split-KV schedule (written by metadata.cu; format in kernels/schedule.py):
// the sequences b = begin_b .. end_b of its part, each as a segment of its pages. Every decode
// kernel iterates it the same way:
//   for (TileScheduler sched(p, part); sched.valid(); sched.next()) { Segment seg = sched.segment(); ... }
// Needs only config.h and params.h: tests/kernels/scheduler_twin.cpp compiles it on the host.
#pragma once
#include "config.h"
#include "params.h"

namespace kvpager {

// One sequence's pages [first_page, end_page) within a part; its partial goes to split_slot of
// the workspace when the sequence has more than one split.
struct Segment {
  int b, seqlen, first_page, end_page, split_slot, num_splits;
  const int32_t* block_table;  // the sequence's row of the block table

  __device__ __forceinline__ int num_pages() const { return end_page - first_page; }
  // Rows of page `page` that hold tokens (< kPageSize only for the sequence's last page).
  __device__ __forceinline__ int valid_rows(int page) const { return seqlen - page * kPageSize; }
};

// Sequence b's segment in its part: `first` / `final` say whether b is the part's first / last
// sequence, field(f) returns the part's metadata field f (1 begin_page, 2 begin_split, 4 end_page),
// read only where needed.
template <typename Field>
__device__ __forceinline__ Segment make_segment(const DecodeParams& p, int b, bool first, bool final, Field field) {
  Segment s;
  s.b = b;
  s.seqlen = p.cache_seqlens[b];
  s.first_page = first ? field(1) : 0;
  s.end_page = final ? field(4) : ceil_div(s.seqlen, kPageSize);
  const int split_base = p.num_splits[b];
  s.num_splits = p.num_splits[b + 1] - split_base;
  s.split_slot = split_base + (first ? field(2) : 0);
  s.block_table = p.block_table + int64_t(b) * p.block_table_stride;
  return s;
}

class TileScheduler {
 public:
  __device__ __forceinline__ TileScheduler(const DecodeParams& p, int part) : p_(p) {
    const int32_t* m = p.tile_metadata + part * kMetadataFields;
    begin_b_ = m[0];
    begin_page_ = m[1];
    begin_split_ = m[2];
    end_b_ = m[3];
    end_page_ = m[4];
    b_ = begin_b_;
  }
  __device__ __forceinline__ bool valid() const { return b_ <= end_b_; }
  __device__ __forceinline__ bool last() const { return b_ == end_b_; }
  __device__ __forceinline__ void next() { ++b_; }

  __device__ __forceinline__ Segment segment() const {
    const int fields[5] = {begin_b_, begin_page_, begin_split_, end_b_, end_page_};
    return make_segment(p_, b_, b_ == begin_b_, b_ == end_b_, [&](int f) { return fields[f]; });
  }

 private:
  const DecodeParams& p_;
  int begin_b_, begin_page_, begin_split_, end_b_, end_page_, b_;
};

// TileScheduler's interface holding two registers instead of six: the part's metadata fields are
// read again (L1-resident) where they are needed. For a kernel whose registers are too few to keep
// six values live across its page loop (the FP8 seesaw's consumers, setmaxnreg 232: s18).
class LeanTileScheduler {
 public:
  __device__ __forceinline__ LeanTileScheduler(const DecodeParams& p, int part) : p_(p), part_(part), b_(m(0)) {}
  __device__ __forceinline__ bool valid() const { return b_ <= m(3); }
  __device__ __forceinline__ bool last() const { return b_ == m(3); }
  __device__ __forceinline__ void next() { ++b_; }

  __device__ __forceinline__ Segment segment() const {
    return make_segment(p_, b_, b_ == m(0), b_ == m(3), [this](int f) { return m(f); });
  }

 private:
  // Field f of this part's metadata (TileScheduler's order); the pointer is rebuilt from the
  // kernel parameter each time rather than held.
  __device__ __forceinline__ int m(int f) const { return p_.tile_metadata[part_ * kMetadataFields + f]; }
  const DecodeParams& p_;
  int part_, b_;
};

// Lets the dependent grid (the combine kernel, launched with programmatic stream serialization)
// start its launch; it still waits for this grid's completion before reading any result.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

}  // namespace kvpager
