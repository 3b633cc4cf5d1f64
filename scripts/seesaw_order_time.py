"""Seesaw hand-off orders side by side (KVPAGER_SEESAW_ORDER) on the cases that decide issue 9's
compute-bound bars: benchmarks/kernel.py's bench_case (CUDA-graph replays, L2 cleared before each),
one line per case and order, with the cuBLAS ceiling measured in the same run. For a short device
call; `kvpager bench kernel --kernels seesaw,seesaw-oN` is the full grid.

    python scripts/seesaw_order_time.py [--orders 11,15]
"""
from __future__ import annotations

import argparse

import torch

from kvpager.benchmarks import kernel as bench

CASES = [bench.Case(128, 2, 128, 8192, False), bench.Case(128, 1, 128, 8192, False),
         bench.Case(128, 1, 64, 8192, False), bench.Case(64, 1, 128, 1024, False),
         bench.Case(1, 1, 128, 4096, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", default="11,15", help="comma-separated hand-off orders (default: %(default)s)")
    a = ap.parse_args()
    kernels_ = [f"seesaw-o{o.strip()}" for o in a.orders.split(",") if o.strip()]
    time_us, _ = bench.make_timer()
    ceilings = {"read_gbps": bench.read_ceiling_gbps(time_us), "matmul_tflops": bench.matmul_ceiling_tflops(time_us)}
    print(f"{torch.cuda.get_device_name()}: ceilings {ceilings}", flush=True)
    for case in CASES:
        for r in bench.bench_case(case, torch.bfloat16, 0, time_us, ceilings, kernels_, [True], ["first"], False):
            print(f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k} {r['kernel']}: {r['time_us']:.1f} us, "
                  f"x_mm {r['frac_matmul']:.3f}, x_read {r['frac_read']:.3f}, 1-cos vs first {r['one_minus_cos_vs_first']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
