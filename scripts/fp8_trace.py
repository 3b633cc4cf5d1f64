"""One CTA's timeline of the warp-specialized FP8 decode, per page: where the consumer and the
converters spend their cycles. Needs a build with KVPAGER_NVCC_EXTRA=-DKVPAGER_TRACE (the kernel
records clock64() at four points of each of its first 48 pages; a small kernel prints them).

    python scripts/fp8_trace.py [--b 128] [--s-k 8192]

Per page n, in cycles (medians over the steady-state pages 4..44, with min / max):
  consumer  full-wait  C0(n) - C2(n-1)  waiting for the converters' `full` of page n
            S          C1(n) - max(C0(n), C3(n-1))  S^T(n) on the tensor pipe after PV(n-1)
            PV         C3(n-1) - C2(n-1)  O^T += V^T P^T of page n-1
            softmax    C2(n) - C1(n), split at C4 (page maxima exchanged) and C5 (P stored, fenced)
            period     C2(n) - C2(n-1)
  converter data-wait  V0(n) - V3(n-1)  this thread's latent bytes (and scales) not yet landed
            empty-wait V1(n) - V0(n)    buffer n % 2 not yet released (PV of page n - 2)
            convert    V2(n) - V1(n)    dequantize + store + fence + arrive
            issue      V3(n) - V2(n)    loads of page n + 2, split (builds since s23) into
              prefetch V4(n) - V2(n)  the L2 prefetch (warp 0's first lane) and the page's address
              latent   V5(n) - V4(n)  its eight 16-byte register loads issued
              side     V3(n) - V5(n)  its scale and RoPE cp.async issued
"""
from __future__ import annotations

import argparse
import os
import re
import statistics

import torch
from device_printf import device_printf

from kvpager import fp8
from kvpager.benchmarks import kernel as bench

LINE = re.compile(r"FP8TRACE role (\d) page (\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+)")


def capture(case: bench.Case) -> dict[int, list[list[int]]]:
    from kvpager import kernels

    os.environ["KVPAGER_FP8_DECODE"] = "ws"
    x = bench.make_inputs(case, torch.bfloat16, 0)
    packed = fp8.quantize(x.pop("k_cache"))
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
    with device_printf() as printed:
        for _ in range(3):  # the last call's lines are kept
            torch.empty(256 << 20, dtype=torch.int8, device="cuda").zero_()  # cold L2
            kernels.flash_mla_with_kvcache(x["q"], packed, x["block_table"], x["cache_seqlens"], bench.DV,
                                           meta, splits, causal=True, is_fp8_kvcache=True)
        found = LINE.findall(printed())
    roles: dict[int, list[list[int]]] = {0: [], 1: [], 2: []}
    for role, page, *events in found[-3 * 48:]:
        roles[int(role)].append([int(e) for e in events])
    return roles


def summary(name: str, values: list[int]) -> str:
    return f"{name} {statistics.median(values):6.0f} ({min(values)}..{max(values)})"


def report(roles: dict[int, list[list[int]]], first: int = 4, last: int = 44) -> None:
    c = roles[0]
    pages = range(first, min(last, len(c)))
    print("  consumer : " + " | ".join([
        summary("full-wait", [c[n][0] - c[n - 1][2] for n in pages]),
        summary("S", [c[n][1] - max(c[n][0], c[n - 1][3]) for n in pages]),
        summary("PV", [c[n - 1][3] - c[n - 1][2] for n in pages]),
        summary("softmax", [c[n][2] - c[n][1] for n in pages]),
        summary("->C4", [c[n][4] - c[n][1] for n in pages]),
        summary("C4->C5", [c[n][5] - c[n][4] for n in pages]),
        summary("->C2", [c[n][2] - c[n][5] for n in pages]),
        summary("period", [c[n][2] - c[n - 1][2] for n in pages]),
    ]))
    for role in (1, 2):
        v = roles[role]
        print(f"  conv w{(role - 1) * 7}  : " + " | ".join([
            summary("data-wait", [v[n][0] - v[n - 1][3] for n in pages]),
            summary("empty-wait", [v[n][1] - v[n][0] for n in pages]),
            summary("convert", [v[n][2] - v[n][1] for n in pages]),
            summary("issue", [v[n][3] - v[n][2] for n in pages]),
        ] + ([
            summary("prefetch", [v[n][4] - v[n][2] for n in pages]),
            summary("latent", [v[n][5] - v[n][4] for n in pages]),
            summary("side", [v[n][3] - v[n][5] for n in pages]),
        ] if all(v[n][4] > 0 and v[n][5] > 0 for n in pages) else [])))
    print("  full arrives before the consumer waits (V2(n) - C2(n-1), < 0 = early): " +
          summary("", [roles[1][n][2] - c[n - 1][2] for n in pages]))
    print("  raw pages 8-11 (C0..C5 | V0..V5 of warp 0):")
    for n in range(8, 12):
        print(f"    {n:2d}: {c[n]} | {roles[1][n]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--s-k", type=int, default=8192)
    a = ap.parse_args()
    case = bench.Case(a.b, 1, 16, a.s_k, False)
    print(f"{torch.cuda.get_device_name()}; b={case.b} h_q=16 s_q=1 s_k={case.s_k}; cycles (clock64)")
    roles = capture(case)
    if len(roles[0]) < 44:
        raise SystemExit(f"only {len(roles[0])} consumer pages traced: not a -DKVPAGER_TRACE build?")
    report(roles)


if __name__ == "__main__":
    main()
