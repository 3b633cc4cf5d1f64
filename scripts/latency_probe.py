"""Where a small decode call's time goes: per-kernel GPU durations (torch.profiler) of the decode
and combine kernels, the gap between them, and the whole call timed as `kvpager bench kernel`
times it (CUDA-graph replay after an L2 clear). For the small-batch cases the benchmark shows
latency-bound (b=1, b=8).
    python scripts/latency_probe.py            (per-kernel durations)
(One CTA's seesaw timeline, with a -DKVPAGER_TRACE build: scripts/seesaw_trace.py.)
"""
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from kvpager import kernels
from kvpager.benchmarks import kernel as bench

CASES = [bench.Case(1, 1, 128, 4096, False), bench.Case(8, 1, 16, 2048, False),
         bench.Case(8, 1, 128, 4096, False), bench.Case(32, 1, 128, 4096, False),
         bench.Case(64, 1, 128, 1024, False), bench.Case(32, 1, 128, 2048, True)]


def probe(case: bench.Case) -> None:
    x = bench.make_inputs(case, torch.bfloat16, 0)
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)

    def call():
        return kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"],
                                              x["cache_seqlens"], bench.DV, meta, splits)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    time_us, _ = bench.make_timer()
    total = time_us(graph.replay)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    durations: dict[str, list[float]] = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            flush.zero_()  # L2 cleared, as in the benchmark
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                    key=lambda e: e.time_range.start)
    gaps, last_end = [], None
    for e in events:
        name = "decode" if "decode" in e.name else "combine" if "combine" in e.name else None
        if name is None:
            last_end = None
            continue
        durations.setdefault(name, []).append(e.time_range.elapsed_us())
        if name == "combine" and last_end is not None:
            gaps.append(e.time_range.start - last_end)
        last_end = e.time_range.end
    parts = ", ".join(f"{k} {statistics.median(v):.1f} µs" for k, v in durations.items())
    gap = f", decode→combine gap {statistics.median(gaps):.1f} µs" if gaps else ""
    print(f"b={case.b} h_q={case.h_q} s_k={case.s_k}: call {total:.1f} µs | {parts}{gap} | "
          f"{meta.shape[0]} parts, {int(splits[-1])} splits")


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for case in CASES:
        probe(case)
