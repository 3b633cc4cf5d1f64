"""How much of a short decode call is cold instruction fetch? Times each case as the benchmark does
(L2 cleared before each call, CUDA-graph replay) in two ways, alternated: cold, right after the
clear, as `kvpager bench kernel` times it; and warm, with a warm-up call of the same shape between
the clear and the timed call. The warm-up reads a separate pool of 64 pages (its block table is the
case's, its page ids taken modulo 64) and copies of every other input, schedule included, so it runs
the same schedule, kernels and code paths on every SM but leaves none of the timed call's data in
L2: what it warms is the instruction caches (each SM's and L2's) and the clocks. warm - cold is then the cost of cold code
(and those) in one call; the kernels' code is ~12 KB (combine) to ~178 KB (seesaw).

    python scripts/cold_code_probe.py [--reps 50]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

CASES = [bench.Case(64, 1, 128, 1024, False), bench.Case(1, 1, 128, 4096, False),
         bench.Case(8, 1, 16, 2048, False), bench.Case(32, 1, 128, 2048, True),
         bench.Case(128, 2, 128, 8192, False)]
WARM_POOL_PAGES = 64


def graph_of(x: dict, meta: torch.Tensor, splits: torch.Tensor) -> torch.cuda.CUDAGraph:
    def call():
        return kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                              bench.DV, meta, splits, causal=True)
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    flush = torch.empty(bench.FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for i, case in enumerate(CASES):
        x = bench.make_inputs(case, torch.bfloat16, i)
        rows = case.s_q * case.h_q // case.h_kv
        meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
        # Every tensor of the warm-up is its own copy (the schedule's too), so none of the timed call's
        # loads can hit in L2 because of it.
        warm = dict(block_table=x["block_table"] % WARM_POOL_PAGES, q=x["q"].clone(),
                    cache_seqlens=x["cache_seqlens"].clone(),
                    k_cache=torch.randn(WARM_POOL_PAGES, *x["k_cache"].shape[1:], dtype=x["k_cache"].dtype,
                                        device="cuda"))
        timed, warm_up = graph_of(x, meta, splits), graph_of(warm, meta.clone(), splits.clone())
        times = {"cold": [], "warm": []}
        for _ in range(a.reps):
            for mode in times:
                flush.zero_()
                if mode == "warm":
                    warm_up.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                timed.replay()
                end.record()
                end.synchronize()
                times[mode].append(start.elapsed_time(end) * 1e3)
        cold, hot = statistics.median(times["cold"]), statistics.median(times["warm"])
        print(f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}{' varlen' if case.varlen else ''}: "
              f"cold {cold:.1f} us, warm {hot:.1f} us, warm - cold {hot - cold:+.1f} us "
              f"({(hot - cold) / cold:+.1%})", flush=True)


if __name__ == "__main__":
    main()
