"""The FP8 seesaw kernel (64-row blocks) against the bf16 kernel on the same values, on the cases
that decide issue 14's compute-bound bar: benchmarks/kernel_fp8.py's bench_case (CUDA-graph replays,
L2 cleared before each), one line per case. For comparing builds of converter variants quickly.

    python scripts/fp8_seesaw_time.py [--label NAME]
"""
from __future__ import annotations

import argparse

from kvpager.benchmarks import kernel as bench
from kvpager.benchmarks import kernel_fp8

CASES = [bench.Case(128, 2, 128, 8192, False), bench.Case(128, 1, 128, 8192, False),
         bench.Case(64, 1, 128, 1024, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="", help="printed in front of every line")
    a = ap.parse_args()
    time_us, _ = bench.make_timer()
    ceilings = {"read_gbps": 1.0, "matmul_tflops": 1.0}  # ratios only: the ceilings are not measured here
    for case in CASES:
        r = kernel_fp8.bench_case(case, 0, time_us, ceilings)
        print(f"{a.label} b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}: fp8 {r['time_us']:.1f} us, "
              f"bf16 {r['bf16_us']:.1f} us, fp8/bf16 {r['fp8_over_bf16']:.3f}, 1-cos {r['one_minus_cos_vs_bf16']:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
