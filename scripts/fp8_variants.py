"""The fused FP8 decodes of 16-row blocks side by side in one process (alternating, same inputs):
the warp-specialized kernel (optionally with its L2 prefetch, KVPAGER_FP8_PREFETCH) and the split-K
kernel (KVPAGER_FP8_DECODE=ws|split), each against
the bf16 kernel on the same values (benchmarks/kernel_fp8.py's bench_case: CUDA-graph replays, L2
cleared before each). Prints one line per (case, variant) and writes JSON.

    python scripts/fp8_variants.py [--out fp8-variants.json] [--rounds 2] [--variants ws,ws+pf4,split]
"""
from __future__ import annotations

import argparse
import json
import os

from kvpager.benchmarks import kernel as bench
from kvpager.benchmarks import kernel_fp8

VARIANTS = "ws,split"
CASES = [bench.Case(128, 1, 16, 8192, False), bench.Case(128, 1, 16, 8192, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fp8-variants.json")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the variants")
    ap.add_argument("--variants", default=VARIANTS,
                    help="comma-separated: ws, split, ws+pfN (KVPAGER_FP8_PREFETCH=N for the ws kernel)")
    a = ap.parse_args()
    time_us, method = bench.make_timer()
    ceilings = {"read_gbps": bench.read_ceiling_gbps(time_us)}
    print(f"fp8_variants: read ceiling {ceilings['read_gbps']:.0f} GB/s; timing: {method}")
    results = []
    for case in CASES:
        for r in range(a.rounds):
            for name in a.variants.split(","):
                kind, _, prefetch = name.partition("+pf")
                os.environ["KVPAGER_FP8_DECODE"] = kind
                if prefetch:
                    os.environ["KVPAGER_FP8_PREFETCH"] = prefetch
                else:
                    os.environ.pop("KVPAGER_FP8_PREFETCH", None)  # the extension's default
                x = kernel_fp8.bench_case(case, 0, time_us, ceilings)
                x.update(variant=name, round=r)
                results.append(x)
                print(f"{name:7s} b={case.b} h_q={case.h_q} s_k={x['mean_s_k']:.0f} varlen={case.varlen} "
                      f"fp8 {x['time_us']:.1f} us ({x['frac_read']:.2f} xread)  bf16 {x['bf16_us']:.1f} us  "
                      f"fp8/bf16 {x['fp8_over_bf16']:.3f}  1-cos {x['one_minus_cos_vs_bf16']:.1e}", flush=True)
    json.dump({"ceilings": ceilings, "results": results}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
