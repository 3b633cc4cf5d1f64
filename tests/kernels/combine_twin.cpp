// Host twin of the combine kernels' units (kernels/csrc/combine_units.h): for a batch shape and a
// grid it walks every block's rounds the way mla_combine_walk_kernel does and prints each unit a
// lane looks at, with its coordinates, for tests/kernels/test_combine_twin.py.
//   combine_twin BATCH H_KV ROWS GRID
//   -> first line "units N", then lines "block round lane unit b hk row_block quarter"
#include <cstdio>
#include <cstdlib>

#include "combine_units.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: combine_twin BATCH H_KV ROWS GRID\n");
    return 2;
  }
  const int batch = std::atoi(argv[1]), h_kv = std::atoi(argv[2]), rows = std::atoi(argv[3]);
  const int grid = std::atoi(argv[4]);
  const int per_sequence = kvpager::combine_units_per_sequence(h_kv, rows);
  const int units = batch * per_sequence;
  std::printf("units %d\n", units);
  for (int block = 0; block < grid; ++block)
    for (int round = 0; kvpager::combine_walk_unit(block, grid, round, 0) < units; ++round)
      for (int lane = 0; lane < 32; ++lane) {
        const int unit = kvpager::combine_walk_unit(block, grid, round, lane);
        if (unit >= units) continue;  // the kernel's lane finds n = 0 there
        const kvpager::CombineUnit u = kvpager::combine_unit_at(unit, per_sequence, h_kv);
        std::printf("%d %d %d %d %d %d %d %d\n", block, round, lane, unit, u.b, u.hk, u.row_block, u.quarter);
      }
  return 0;
}
