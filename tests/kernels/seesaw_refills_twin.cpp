// Host twin of order 19's refill order: prints, for every segment [first, end) with
// 0 <= first <= end <= N, each producer warp's refills as kernels/csrc/seesaw_refills.h computes
// them (the header the kernel's producer uses). tests/kernels/test_seesaw_refills.py compares them
// with the consumers' releases.
//   seesaw_refills_twin N    ->  lines "first end warp buf page"
#include <cstdio>
#include <cstdlib>

#include "seesaw_refills.h"

template <int W>
void print_refills(int first, int end) {
  kvpager::for_each_refill<W>(first, end, [&](int buf, int page) { std::printf("%d %d %d %d %d\n", first, end, W, buf, page); });
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: seesaw_refills_twin N\n");
    return 2;
  }
  const int n = std::atoi(argv[1]);
  for (int first = 0; first <= n; ++first)
    for (int end = first; end <= n; ++end) {
      print_refills<0>(first, end);
      print_refills<1>(first, end);
    }
  return 0;
}
