// Host twin of the kernels' schedule walk: kernels/csrc/tile_scheduler.cuh compiled for the host
// (its __device__ qualifiers and the PDL asm unused), run over a schedule written by
// kernels/schedule.py. For every part it prints the segments of TileScheduler and of
// LeanTileScheduler (the FP8 seesaw's consumers since s18), for tests/kernels/test_scheduler_twin.py.
//   scheduler_twin FILE   FILE: int32 batch, num_parts, cache_seqlens[batch], metadata[num_parts * 8],
//                         num_splits[batch + 1]
//   -> lines "full|lean part b seqlen first_page end_page split_slot num_splits"
#define __device__
#define __forceinline__ inline
#include <cstdint>
#include <cstdio>
#include <vector>

#include "tile_scheduler.cuh"

template <typename Scheduler>
void print_segments(const char* name, const kvpager::DecodeParams& p, int part) {
  for (Scheduler sched(p, part); sched.valid(); sched.next()) {
    const kvpager::Segment s = sched.segment();
    std::printf("%s %d %d %d %d %d %d %d\n", name, part, s.b, s.seqlen, s.first_page, s.end_page, s.split_slot,
                s.num_splits);
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: scheduler_twin FILE\n");
    return 2;
  }
  std::FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr) return 1;
  int32_t head[2];
  if (std::fread(head, sizeof(int32_t), 2, f) != 2) return 1;
  const int batch = head[0], parts = head[1];
  std::vector<int32_t> seqlens(batch), meta(size_t(parts) * kvpager::kMetadataFields), splits(batch + 1);
  std::vector<int32_t> table(1, 0);
  const bool ok = std::fread(seqlens.data(), sizeof(int32_t), seqlens.size(), f) == seqlens.size() &&
                  std::fread(meta.data(), sizeof(int32_t), meta.size(), f) == meta.size() &&
                  std::fread(splits.data(), sizeof(int32_t), splits.size(), f) == splits.size();
  std::fclose(f);
  if (!ok) return 1;
  kvpager::DecodeParams p{};
  p.cache_seqlens = seqlens.data();
  p.tile_metadata = meta.data();
  p.num_splits = splits.data();
  p.block_table = table.data();
  p.block_table_stride = 0;
  for (int part = 0; part < parts; ++part) {
    print_segments<kvpager::TileScheduler>("full", p, part);
    print_segments<kvpager::LeanTileScheduler>("lean", p, part);
  }
  return 0;
}
