"""A handful of small MLA decode calls for compute-sanitizer (scripts/sanitize.sh runs this under
memcheck and racecheck). Pages in random order, NaN in every slot no sequence owns, a huge page id
in the padded table column, zero-length sequences; every case also checks its output for NaN and
against the reference when kvpager.reference is importable. Exits 1 on a wrong result.

    python scripts/sanitize_cases.py [--quick] [--fp8]

--fp8: only the cases of the fused FP8 decode (656-byte rows, poisoned with 0xFF bytes, some with
65-row pages), e.g. CASES_ARGS=--fp8 KERNEL_FILTER=fp8 bash scripts/sanitize.sh.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from kvpager import fp8, kernels

D, DV, PAGE = 576, 512, 64


def cases(quick: bool) -> list[dict]:
    grid = [
        dict(b=2, s_q=s_q, h_q=h_q, h_kv=1, lens=[s_k, 0 if i % 2 else max(1, s_k // 2)], dtype=torch.bfloat16)
        for i, (s_k, h_q, s_q) in enumerate(
            (s_k, h_q, s_q) for s_k in (1, 65, 140) for h_q in (16, 64) for s_q in (1, 2)
        )
    ]
    extra = [
        dict(b=2, s_q=2, h_q=32, h_kv=2, lens=[140, 0], dtype=torch.float16),
        dict(b=1, s_q=1, h_q=128, h_kv=1, lens=[1000], dtype=torch.bfloat16),  # split + combine
        dict(b=3, s_q=1, h_q=16, h_kv=1, lens=[0, 0, 0], dtype=torch.bfloat16),  # all empty
        # seesaw: odd page counts, a partial last page, two row blocks, two kv heads
        dict(b=2, s_q=1, h_q=128, h_kv=1, lens=[193, 64], dtype=torch.bfloat16),
        dict(b=2, s_q=3, h_q=96, h_kv=2, lens=[300, 1], dtype=torch.float16),
    ]
    return (grid[:4] + extra[:2]) if quick else grid + extra


def fp8_cases() -> list[dict]:
    """The fused FP8 decode's shapes (16/32-row blocks, then 64-row blocks: the seesaw kernel and its
    converter warpgroup); page_rows 65 = a padded page stride."""
    return [
        dict(b=2, s_q=1, h_q=16, h_kv=1, lens=[140, 0], dtype="fp8", page_rows=64),
        dict(b=2, s_q=2, h_q=16, h_kv=1, lens=[65, 1], dtype="fp8", page_rows=65),
        dict(b=2, s_q=1, h_q=32, h_kv=2, lens=[0, 200], dtype="fp8", page_rows=65),
        dict(b=3, s_q=2, h_q=16, h_kv=1, lens=[300, 0, 64], dtype="fp8", page_rows=64),
        dict(b=1, s_q=1, h_q=16, h_kv=1, lens=[3000], dtype="fp8", page_rows=64),  # split + combine
        dict(b=2, s_q=1, h_q=128, h_kv=1, lens=[140, 0], dtype="fp8", page_rows=65),
        dict(b=3, s_q=2, h_q=64, h_kv=1, lens=[65, 1, 300], dtype="fp8", page_rows=64),  # 2 row blocks
        dict(b=2, s_q=2, h_q=20, h_kv=1, lens=[200, 3], dtype="fp8", page_rows=64),  # 40 rows: padded block
        dict(b=1, s_q=1, h_q=128, h_kv=2, lens=[3000], dtype="fp8", page_rows=64),  # split + combine
    ]


def run_case(c: dict) -> str:
    b, s_q, h_q, h_kv, lens = c["b"], c["s_q"], c["h_q"], c["h_kv"], c["lens"]
    pages = [math.ceil(n / PAGE) for n in lens]
    num_pages = sum(pages) + 2
    perm = torch.randperm(num_pages).tolist()
    table = torch.full((b, max(pages + [1]) + 1), 2**30, dtype=torch.int32)
    is_fp8 = c["dtype"] == "fp8"
    dtype = torch.bfloat16 if is_fp8 else c["dtype"]
    if is_fp8:  # 0xFF everywhere no sequence owns: NaN values, NaN scales, NaN RoPE
        k_cache = torch.full((num_pages, c["page_rows"], h_kv, fp8.TOKEN_BYTES), 0xFF, dtype=torch.uint8)[:, :PAGE]
    else:
        k_cache = torch.full((num_pages, PAGE, h_kv, D), float("nan"), dtype=dtype)
    for i, n in enumerate(lens):
        for p in range(pages[i]):
            table[i, p] = page = perm.pop()
            rows = min(PAGE, n - p * PAGE)
            latent = torch.randn(rows, h_kv, D).to(dtype)
            k_cache[page, :rows] = fp8.quantize(latent) if is_fp8 else latent
    q = torch.randn(b, s_q, h_q, D).to(dtype).cuda()
    k_cache, table = k_cache.cuda(), table.cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # Causal only where every non-empty sequence holds the s_q new tokens (each query sees a key).
    causal = all(n == 0 or n >= s_q for n in lens)
    meta, splits = kernels.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, table, seqlens, DV, meta, splits, causal=causal,
                                              is_fp8_kvcache=is_fp8)
    torch.cuda.synchronize()
    if out.isnan().any() or lse.isnan().any():
        return "NaN in the output"
    try:
        from kvpager.reference import mla_decode_reference
    except ImportError:
        return ""
    if is_fp8:  # the reference dequantizes the gathered pages and uses only the tokens in range
        ref, _ = mla_decode_reference(q.float(), k_cache, table, seqlens, DV, causal=causal, is_fp8_kvcache=True)
    else:
        ref, _ = mla_decode_reference(q.float(), k_cache.float().nan_to_num(0.0), table, seqlens, DV,
                                      causal=causal)
    err = (out.float() - ref).abs().max().item()
    return f"max abs error {err:.3g} vs the reference" if err > 2e-2 * max(ref.abs().max().item(), 1e-6) else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="only the fused FP8 decode's cases")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and kernels.available() and kernels.supports_device("cuda")):
        print(f"sanitize_cases: the kernel cannot run here ({kernels.unavailable_reason() or 'no sm_90 GPU'})")
        return 2
    torch.manual_seed(0)
    bad = 0
    for c in fp8_cases() if args.fp8 else cases(args.quick):
        problem = run_case(c)
        name = f"b={c['b']} s_q={c['s_q']} h_q={c['h_q']} h_kv={c['h_kv']} lens={c['lens']} {c['dtype']}"
        print(f"{'FAIL' if problem else 'ok  '} {name} {problem}", flush=True)
        bad += bool(problem)
    print(f"sanitize_cases: {bad} wrong result(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
