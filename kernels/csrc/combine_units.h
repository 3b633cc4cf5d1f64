// The combine kernels' units of work and the walking kernel's order over them, host-compilable
// (tests/kernels/combine_twin.cpp walks them on the CPU). A unit is (sequence, kv head, block of
// kCombineRowsPerBlock query rows, column quarter); a block's warp w takes row w of its unit.
#pragma once
#include "config.h"

namespace kvpager {

struct CombineUnit {
  int b, hk, row_block, quarter;
};

KVPAGER_HD int combine_units_per_sequence(int h_kv, int rows) {
  return h_kv * ceil_div(rows, kCombineRowsPerBlock) * kCombineColSplits;
}

// Unit u of the whole batch, sequence-major (the default grid's (x, y, z) = (row block x 4 +
// quarter, kv head, sequence) in the same order).
KVPAGER_HD CombineUnit combine_unit_at(int unit, int units_per_sequence, int h_kv) {
  const int in_seq = unit % units_per_sequence;
  const int per_head = units_per_sequence / h_kv;
  return {unit / units_per_sequence, in_seq / per_head, in_seq % per_head / kCombineColSplits,
          in_seq % kCombineColSplits};
}

// The walking kernel: block `block` of `grid` looks at 32 units a round, lane k at the k-th:
// rounds cover block, block + grid, ..., so the blocks of one grid cover every unit exactly once.
KVPAGER_HD int combine_walk_unit(int block, int grid, int round, int lane) {
  return block + (round * 32 + lane) * grid;
}

}  // namespace kvpager
