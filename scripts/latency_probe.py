"""Where a small decode call's time goes: per-kernel GPU durations (torch.profiler) of the decode
and combine kernels, the gap between them, and the whole call timed as `kvpager bench kernel`
times it (CUDA-graph replay after an L2 clear). For the small-batch cases the benchmark shows
latency-bound (b=1, b=8).
    python scripts/latency_probe.py            (per-kernel durations)
    python scripts/latency_probe.py --trace    (with a KVPAGER_NVCC_EXTRA=-DKVPAGER_TRACE build:
                                                one CTA's seesaw timeline)
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


TRACE_CASES = [bench.Case(64, 1, 128, 1024, False), bench.Case(64, 1, 128, 4096, False),
               bench.Case(128, 2, 128, 8192, False)]
EVENTS = ["start", "segment", "Q landed", "first S", "pair", "loop end", "epilogue end"]


def trace(case: bench.Case) -> None:
    """With a -DKVPAGER_TRACE build, the seesaw kernel prints one CTA's timeline (clock64 per
    event); this captures the third call's lines and prints them compactly (pairs as deltas)."""
    import re

    from device_printf import device_printf

    x = bench.make_inputs(case, torch.bfloat16, 0)
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], case.s_q * case.h_q // case.h_kv, case.h_kv)
    mhz = torch.cuda.get_device_properties(0).clock_rate / 1e3 if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 1980.0
    with device_printf() as printed:
        for _ in range(3):
            torch.empty(256 << 20, dtype=torch.int8, device="cuda").zero_()  # cold L2
            kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                           bench.DV, meta, splits)
        lines = [m.groups() for m in re.finditer(r"TRACE part (\d+) wg (\d+) #(\d+) event (\d+) cycle (\d+)", printed())]
    per_wg: dict[int, list[tuple[int, int]]] = {}
    for part, wg, idx, ev, cyc in lines:
        if int(idx) == 0:
            per_wg[int(wg)] = []
        per_wg[int(wg)].append((int(ev), int(cyc)))
    print(f"b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k} (µs at {mhz:.0f} MHz):")
    for wg, evs in sorted(per_wg.items()):
        pairs = [c for e, c in evs if EVENTS[e] == "pair"]
        deltas = [(b - a) / mhz for a, b in zip(pairs, pairs[1:])]
        marks = " ".join(f"{EVENTS[e]}@{c / mhz:.1f}" for e, c in evs if EVENTS[e] != "pair")
        d = (f"{len(pairs)} pairs, first pair ends @{pairs[0] / mhz:.1f}, pair Δ min {min(deltas):.2f} "
             f"med {statistics.median(deltas):.2f} max {max(deltas):.2f}") if len(deltas) > 1 else f"{len(pairs)} pairs"
        print(f"  wg{wg}: {marks} | {d}")


if __name__ == "__main__":
    import sys

    print(torch.cuda.get_device_name())
    if "--trace" in sys.argv:
        for case in TRACE_CASES:
            trace(case)
    else:
        for case in CASES:
            probe(case)
