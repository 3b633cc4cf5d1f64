"""One MLA decode case called a few times, for Nsight Compute (scripts/ncu_profile.sh profiles one
of the calls). Inputs as `kvpager bench kernel` makes them (benchmarks/kernel.py make_inputs).

    python scripts/ncu_profile.py --case 128,1,16,8192 [--fp8] [--varlen] [--calls 3]
"""
from __future__ import annotations

import argparse

import torch

from kvpager import fp8, kernels
from kvpager.benchmarks import kernel as bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True, help="b,s_q,h_q,s_k")
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="the FP8 cache (656-byte rows)")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    b, s_q, h_q, s_k = (int(v) for v in a.case.split(","))
    case = bench.Case(b, s_q, h_q, s_k, a.varlen)
    x = bench.make_inputs(case, torch.bfloat16, seed=0)
    cache = fp8.quantize(x["k_cache"]) if a.fp8 else x["k_cache"]
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], s_q * h_q, 1)
    for _ in range(a.calls):
        out, _ = kernels.flash_mla_with_kvcache(x["q"], cache, x["block_table"], x["cache_seqlens"], bench.DV,
                                                meta, splits, causal=True, is_fp8_kvcache=a.fp8)
    torch.cuda.synchronize()
    print(f"ncu_profile: {a.case} fp8={a.fp8} varlen={a.varlen} splits={int(splits[-1])} finite={bool(out.isfinite().all())}")


if __name__ == "__main__":
    main()
