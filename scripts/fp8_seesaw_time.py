"""The FP8 seesaw kernel (64-row blocks) against the bf16 kernel on the same values, on the cases
that decide issue 14's compute-bound bar: benchmarks/kernel_fp8.py's bench_case (CUDA-graph replays,
L2 cleared before each), one line per case. For comparing builds of converter variants quickly;
`--set ws` times the warp-specialized kernel's cases (16 rows a kv head) instead.

    python scripts/fp8_seesaw_time.py [--label NAME] [--set seesaw|ws|all] [--read-ceiling]
"""
from __future__ import annotations

import argparse

from kvpager.benchmarks import kernel as bench
from kvpager.benchmarks import kernel_fp8

CASES = {
    "seesaw": [bench.Case(128, 2, 128, 8192, False), bench.Case(128, 1, 128, 8192, False),
               bench.Case(64, 1, 128, 1024, False)],
    # the warp-specialized kernel (16 rows a kv head): issue 14's memory-bound bar, small batches
    "ws": [bench.Case(128, 1, 16, 8192, False), bench.Case(128, 1, 16, 8192, True),
           bench.Case(8, 1, 16, 2048, False), bench.Case(2, 1, 16, 32768, False)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="", help="printed in front of every line")
    ap.add_argument("--set", default="seesaw", choices=[*CASES, "all"], help="which cases (default: %(default)s)")
    ap.add_argument("--read-ceiling", action="store_true", help="measure the read ceiling first (GB/s / it = x read)")
    a = ap.parse_args()
    time_us, _ = bench.make_timer()
    ceilings = {"read_gbps": 1.0, "matmul_tflops": 1.0}  # ratios only: the ceilings are not measured here
    if a.read_ceiling:
        read = bench.read_ceiling_gbps(time_us)
        print(f"{a.label} read ceiling {read:.0f} GB/s (bf16 sum of 2 GiB, this process)", flush=True)
    for case in [c for name, cs in CASES.items() if a.set in (name, "all") for c in cs]:
        r = kernel_fp8.bench_case(case, 0, time_us, ceilings)
        shape = f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}{' varlen' if case.varlen else ''}"
        print(f"{a.label} {shape}: fp8 {r['time_us']:.1f} us, "
              f"bf16 {r['bf16_us']:.1f} us, fp8/bf16 {r['fp8_over_bf16']:.3f}, fp8 {r['gbps']:.0f} GB/s, "
              f"1-cos {r['one_minus_cos_vs_bf16']:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
