"""Trial (s20): the combine kernel's load depth, 4 partial rows a warp at a time (the old kernel's
depth) against 16, timed in one process as `kvpager bench kernel` times a call (CUDA-graph replay
after an L2 clear), each case's two graphs alternated over three rounds. Also checks that both give
bit-identical output (the sum runs in the same order).
    python scripts/combine_trial.py
"""
import os
import statistics

import torch

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

CASES = [bench.Case(1, 1, 128, 4096, False), bench.Case(8, 1, 16, 2048, False),
         bench.Case(2, 1, 16, 32768, False), bench.Case(8, 1, 128, 4096, False),
         bench.Case(64, 1, 128, 1024, False), bench.Case(32, 1, 128, 2048, True),
         bench.Case(128, 2, 128, 8192, False)]
DEPTHS = ("4", "16")


def graph_for(case: bench.Case, x: dict, depth: str):
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
    os.environ["KVPAGER_COMBINE_BATCH"] = depth

    def call():
        return kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                              bench.DV, meta, splits, causal=True)
    out = call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        held = call()
    os.environ.pop("KVPAGER_COMBINE_BATCH")
    return graph, held, out, int(splits[-1]), (meta, splits)  # the graph reads meta and splits


def main() -> None:
    print(torch.cuda.get_device_name())
    time_us, method = bench.make_timer()
    print("timer:", method)
    for case in CASES:
        x = bench.make_inputs(case, torch.bfloat16, 0)
        graphs = {d: graph_for(case, x, d) for d in DEPTHS}  # each keeps its metadata alive with its graph
        same = all(torch.equal(graphs[DEPTHS[0]][2][i], graphs[d][2][i]) for d in DEPTHS for i in (0, 1))
        times = {d: [] for d in DEPTHS}
        for _ in range(3):
            for d in DEPTHS:
                times[d].append(time_us(graphs[d][0].replay))
        med = {d: statistics.median(v) for d, v in times.items()}
        print(f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k} varlen={case.varlen} "
              f"splits={graphs['4'][3]}: depth 4 {med['4']:.1f} µs, depth 16 {med['16']:.1f} µs "
              f"({(med['16'] / med['4'] - 1) * 100:+.1f} %), identical={same}")


if __name__ == "__main__":
    main()
