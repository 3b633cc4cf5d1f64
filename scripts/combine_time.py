"""Times the combine kernel's switches against each other in one process: for every case, each mode
of KVPAGER_COMBINE_GRID / KVPAGER_COMBINE_LOADS in turn, ROUNDS times (CUDA-graph replays, L2
cleared before each: benchmarks/kernel.py's timer). The switches are read at each call, so one
build serves every mode; a mode's graph is captured under its own setting. Outputs of every mode are
compared with the first mode's (the grid modes do the same arithmetic per row: expect 0).

    python scripts/combine_time.py [--modes unit:4,wave:4,wave:8,wave:16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os

import torch

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

# The benchmark's mid and small batches, b 8 h_q 128 (8 splits) and one long case.
CASES = bench.MID + [bench.Case(8, 1, 128, 4096, False)] + bench.SMALL + [bench.Case(128, 1, 128, 8192, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="unit:4,wave:4,wave:8,wave:16",
                    help="grid:loads, comma-separated; the first is the reference of the max diff (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    modes = [m.split(":") for m in a.modes.split(",")]
    time_us, _ = bench.make_timer()
    for i, case in enumerate(CASES):
        x = bench.make_inputs(case, torch.bfloat16, i)
        rows = case.s_q * case.h_q // case.h_kv
        meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)

        def call():
            return kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                                  bench.DV, meta, splits, causal=True)

        graphs, first, diffs = {}, None, {}
        for grid, loads in modes:
            os.environ["KVPAGER_COMBINE_GRID"], os.environ["KVPAGER_COMBINE_LOADS"] = grid, loads
            out, lse = call()
            if first is None:
                first = (out.float(), lse)
            diffs[(grid, loads)] = max(float((out.float() - first[0]).abs().max()), float((lse - first[1]).abs().max()))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                call()
            graphs[(grid, loads)] = g
        times = {m: [] for m in graphs}
        for _ in range(a.rounds):
            for m, g in graphs.items():
                times[m].append(time_us(g.replay))
        label = f"b={case.b} h_q={case.h_q} s_k={case.s_k}{' varlen' if case.varlen else ''} splits {int(splits[-1])}"
        cells = "  ".join(f"{g}:{l} {' / '.join(f'{t:.1f}' for t in ts)} (max diff {diffs[(g, l)]:.1e})"
                          for (g, l), ts in times.items())
        print(f"{label}: {cells}", flush=True)


if __name__ == "__main__":
    main()
