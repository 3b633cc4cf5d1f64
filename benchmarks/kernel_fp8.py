"""`kvpager bench kernel --kv-cache-dtype fp8`: the fused FP8 decode against the bf16 kernel, in
one run, on the same values.

For every case of the chosen set that the fused FP8 decode covers (every one when
KVPAGER_FP8_SEESAW=1; with it off, those of more than 32 query rows per kv head run on the reference
and are listed as skipped), the random bf16 cache of
`kvpager bench kernel` is quantized (kvpager.fp8.quantize) and the bf16 kernel is timed on its
dequantized copy, so both kernels read the same numbers: their outputs must agree to rounding
(1 - cos printed), and the time ratio is the FP8 cache's speed-up. GB/s and ×read count what the
FP8 call moves: b * mean_s_k * h_kv * 656 cache bytes plus q and out (bf16). Timing and ceilings
as in benchmarks/kernel.py (CUDA-graph replays, L2 cleared before each).

Issue 14's bars: memory-bound (h_q = 16, s_q = 1, s_k = 8192, b = 128, fixed and varlen) ×read >=
0.85 and fp8 / bf16 time <= 0.62; compute-bound (h_q = 128, s_q = 2) >= 0.85x the bf16 kernel's
speed, i.e. fp8 / bf16 time <= 1.18 (×mm: TFLOPS over the cuBLAS ceiling of the same run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import asdict
from typing import Callable

import torch

from kvpager import fp8
from kvpager.benchmarks import kernel as bench

D, DV = bench.D, bench.DV


@contextlib.contextmanager
def pdl_env(on: bool):
    """KVPAGER_PDL for the calls and graph captures inside (the only switch that matters for rows <= 32:
    the combine kernel's launch), then restored."""
    saved = os.environ.get("KVPAGER_PDL")
    os.environ["KVPAGER_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KVPAGER_PDL", None)
        else:
            os.environ["KVPAGER_PDL"] = saved


def fp8_bytes(case: bench.Case, mean_s_k: float) -> float:
    """Bytes one FP8 decode call moves: the 656-byte cache rows, q read and out written in bf16."""
    return case.b * mean_s_k * case.h_kv * fp8.TOKEN_BYTES + 2 * case.b * case.s_q * case.h_q * (D + DV)


def graph_time(time_us: Callable, call: Callable) -> tuple[float, torch.Tensor]:
    """µs of a CUDA-graph replay of `call` (after one eager call), and the eager output."""
    out, _ = call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return time_us(graph.replay), out


def bench_case(case: bench.Case, seed: int, time_us: Callable, ceilings: dict) -> dict:
    from kvpager import kernels

    x = bench.make_inputs(case, torch.bfloat16, seed)
    packed = fp8.quantize(x.pop("k_cache"))
    same_values = fp8.dequantize(packed)  # what the bf16 kernel reads: FP8's values, in bf16
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
    mean_s_k, flops, bf16_bytes = bench.work(case, x["cache_seqlens"].cpu())

    def call(cache: torch.Tensor, is_fp8: bool):
        return lambda: kernels.flash_mla_with_kvcache(x["q"], cache, x["block_table"], x["cache_seqlens"], DV,
                                                      meta, splits, causal=True, is_fp8_kvcache=is_fp8)

    t_fp8, out_fp8 = graph_time(time_us, call(packed, True))
    t_bf16, out_bf16 = graph_time(time_us, call(same_values, False))
    a, b = out_fp8.double().flatten(), out_bf16.double().flatten()
    cos = float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))
    gbps = fp8_bytes(case, mean_s_k) / (t_fp8 * 1e-6) / 1e9
    return {
        **asdict(case),
        "kv_cache_dtype": "fp8",
        "mean_s_k": round(mean_s_k, 1),
        "time_us": round(t_fp8, 2),
        "bf16_us": round(t_bf16, 2),
        "fp8_over_bf16": round(t_fp8 / t_bf16, 3),
        "tflops": round(flops / (t_fp8 * 1e-6) / 1e12, 1),
        "frac_mm": round(flops / (t_fp8 * 1e-6) / 1e12 / ceilings["matmul_tflops"], 3),
        "gbps": round(gbps, 1),
        "frac_read": round(gbps / ceilings["read_gbps"], 3),
        "bf16_frac_read": round(bf16_bytes / (t_bf16 * 1e-6) / 1e9 / ceilings["read_gbps"], 3),
        "total_splits": int(splits[-1]),
        "finite": bool(torch.isfinite(out_fp8).all()),
        "one_minus_cos_vs_bf16": 1 - cos,
    }


COLUMNS = [  # (header, key, format)
    ("b", "b", "{}"), ("s_q", "s_q", "{}"), ("h_q", "h_q", "{}"), ("s_k", "mean_s_k", "{:.0f}"),
    ("varlen", "varlen", "{}"), ("fp8 µs", "time_us", "{:.1f}"), ("bf16 µs", "bf16_us", "{:.1f}"),
    ("fp8/bf16", "fp8_over_bf16", "{:.3f}"), ("GB/s", "gbps", "{:.0f}"), ("×read", "frac_read", "{:.2f}"),
    ("bf16 ×read", "bf16_frac_read", "{:.2f}"), ("TFLOPS", "tflops", "{:.0f}"), ("×mm", "frac_mm", "{:.2f}"),
    ("splits", "total_splits", "{}"),
    ("1-cos vs bf16", "one_minus_cos_vs_bf16", "{:.1e}"), ("finite", "finite", "{}"),
]


def print_table(results: list[dict], plain: bool) -> None:
    bench.print_table(results, plain, COLUMNS, "MLA decode on the FP8 cache (GB/s on 656-byte rows; "
                      "bf16 kernel on the same values)")


def run(args: argparse.Namespace, time_us: Callable, method: str, props, ceilings: dict) -> int:
    from kvpager import kernels

    if not kernels.supports_fp8_kvcache():
        print(f"kvpager bench kernel --kv-cache-dtype fp8: {kernels.fp8_unavailable_reason()}")
        return 1
    pdl = args.pdl.split(",")[0].strip() or "on"
    results, skipped = [], []
    with pdl_env(pdl == "on"):
        for i, case in enumerate(bench.cases(args.case_set)):
            if not kernels.supports_fp8_kvcache(case.s_q * case.h_q // case.h_kv):
                skipped.append(case)
                continue
            results.append(bench_case(case, args.seed + i, time_us, ceilings))
            torch.cuda.empty_cache()
    print_table(results, args.plain)
    if skipped:
        names = ", ".join(f"b={c.b} s_q={c.s_q} h_q={c.h_q} s_k={c.s_k}{' varlen' if c.varlen else ''}"
                          for c in skipped)
        print(f"not covered by the fused FP8 decode (more than {kernels.FP8_MMA_SYNC_MAX_ROWS} query rows per "
              f"kv head need {kernels.FP8_SEESAW_ENV}=1; kvpager.mla runs them on the reference): {names}")
    report = {
        "device": props.name,
        "num_sms": props.multi_processor_count,
        "torch": torch.__version__,
        "kv_cache_dtype": "fp8",
        "timing": method,
        "pdl": pdl,
        "ceilings": {k: round(v, 1) for k, v in ceilings.items()},
        "results": results,
        "skipped": [asdict(c) for c in skipped],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    bad = [r for r in results if not r["finite"] or r["one_minus_cos_vs_bf16"] > 1e-4]
    if bad:
        print(f"WARNING: {len(bad)} case(s) non-finite or disagreeing with the bf16 kernel on the same values")
    return 0
