"""Times the installed build of the bf16 kernel on the cases where a kv head has 64 or more query
rows (issue 9's, small and mid batches): benchmarks/kernel.py's bench_case (CUDA-graph replays, L2
cleared before each), one line per case. For comparing builds of scripts/build_variants.sh: the
first variant timed saves each case's output under --ref-dir, later ones print 1 - cos against it.

    python scripts/variant_time.py --label base [--ref-dir /tmp/variants/ref]
"""
from __future__ import annotations

import argparse
import os

import torch

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

CASES = [bench.Case(64, 1, 128, 1024, False), bench.Case(32, 1, 128, 2048, True),
         bench.Case(64, 1, 128, 4096, False), bench.Case(1, 1, 128, 4096, False),
         bench.Case(128, 2, 128, 8192, False), bench.Case(128, 1, 128, 8192, False),
         bench.Case(128, 1, 64, 8192, False), bench.Case(128, 2, 32, 4096, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="", help="printed in front of every line")
    ap.add_argument("--ref-dir", default="/tmp/variants/ref", help="outputs of the first variant timed")
    a = ap.parse_args()
    os.makedirs(a.ref_dir, exist_ok=True)
    time_us, _ = bench.make_timer()
    ceilings = {"read_gbps": 1.0, "matmul_tflops": 1.0}  # times only: ceilings come from the full bench
    for i, case in enumerate(CASES):
        (r,) = bench.bench_case(case, torch.bfloat16, i, time_us, ceilings, ["seesaw"], [True], ["first"], False)
        # bench_case keeps no output: the same inputs (same seed) again, once, for the agreement check
        x = bench.make_inputs(case, torch.bfloat16, i)
        rows = case.s_q * case.h_q // case.h_kv
        meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
        out, _ = kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                                bench.DV, meta, splits, causal=True)
        ref_path = os.path.join(a.ref_dir, f"case{i}.pt")
        if os.path.exists(ref_path):
            ref = torch.load(ref_path).to(out.device)
            agree = 1 - float(torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0))
        else:
            torch.save(out.float().cpu(), ref_path)
            agree = 0.0
        print(f"{a.label} b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}{' varlen' if case.varlen else ''}: "
              f"{r['time_us']:.1f} us, splits {r['total_splits']}, finite {r['finite']}, 1-cos vs first variant {agree:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
