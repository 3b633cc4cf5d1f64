"""`kvpager bench kernel`: the MLA decode kernel against the GPU's own ceilings, in one run.

Measures the read-bandwidth ceiling (a large bf16 sum) and the cuBLAS bf16 8192^3 matmul rate,
then the kernel (through kvpager.kernels.flash_mla_with_kvcache, metadata computed once per case).
Case sets: `grid` (default: b=128, s_k in {4096, 8192}, h_q in {16, 32, 64, 128}, s_q in {1, 2},
varlen off/on, plus the small and mid-size batches), `issue` (the cases of issue 9's table plus the
mid-size batches), `quick`. Reports time, TFLOPS = 2*b*s_q*h_q*mean_s_k*(d+dv)/t and
GB/s = 2*(b*mean_s_k*h_kv*d + b*s_q*h_q*(d+dv))/t, each also as a fraction of its ceiling, and
L2 GB/s: the bytes the SMs pull through L2 (every row block of a kv head reads all its pages: 4x the
cache at h_q 128 s_q 2). No L2 ceiling is printed: s15's (a bf16 sum over a third of L2) measured
less than HBM (docs/kernel-perf.md, s16), so it was removed until a sound one exists.

`--kernels seesaw,lockstep` times every case whose kv head has >= 64 query rows with both 64-row
kernels (KVPAGER_MLA_KERNEL), `--hint first,normal,last` the seesaw kernel's TMA eviction hint
(KVPAGER_TMA_HINT), `--pdl on,off` the combine launch both ways (KVPAGER_PDL): side by side on
the same card, in the same process.

Timing: triton.testing.do_bench(warmup=25, rep=200, return_mode="median"), which clears L2 before
every call; without triton, CUDA events around each call after an L2-clearing write, median.
The kernel is timed as a CUDA-graph replay of one decode call (µs), as serving runs it, and
eagerly through the Python wrapper (eager µs, `--eager`).
Random data; KV pages are drawn in random order from a pool of at least 128 MB, so even the
small cases read their pages from HBM, scattered as in a long-running server.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

D, DV, PAGE = 576, 512, 64
POOL_MIN_BYTES = 128 << 20
FLUSH_BYTES = 256 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    b: int
    s_q: int
    h_q: int
    s_k: int  # mean sequence length
    varlen: bool
    h_kv: int = 1


SMALL = [Case(1, 1, 128, 4096, False), Case(8, 1, 16, 2048, False), Case(2, 1, 16, 32768, False)]
MID = [Case(64, 1, 128, 1024, False), Case(32, 1, 128, 2048, True), Case(64, 1, 128, 4096, False)]
ISSUE = [  # issue 9's table (b = 128 unless noted), in its order
    Case(128, 1, 16, 8192, False), Case(128, 1, 64, 8192, False), Case(128, 2, 32, 4096, False),
    Case(128, 1, 128, 8192, False), Case(128, 1, 128, 4096, True), Case(128, 2, 64, 8192, False),
    Case(128, 2, 128, 8192, False), Case(128, 2, 128, 4096, True),
]


def cases(which: str) -> list[Case]:
    if which == "issue":
        return ISSUE + MID + SMALL
    grid = [
        Case(128, s_q, h_q, s_k, varlen)
        for s_k in (4096, 8192)
        for h_q in (16, 32, 64, 128)
        for s_q in (1, 2)
        for varlen in (False, True)
    ]
    if which == "quick":
        grid = [c for c in grid if c.s_k == 8192 and c.h_q in (16, 128)]
    return grid + MID + SMALL


REFERENCE_CASES = [Case(8, 1, 16, 2048, False), Case(1, 1, 128, 4096, False)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench-kernel.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--set", dest="case_set", choices=("grid", "issue", "quick"), default="grid",
                        help="which cases (default: %(default)s)")
    parser.add_argument("--quick", action="store_const", dest="case_set", const="quick",
                        help="same as --set quick: s_k=8192, h_q in {16,128} and the small cases")
    parser.add_argument("--kernels", default="seesaw",
                        help="64-row kernels to time, comma-separated: seesaw, seesaw-oN (hand-off order N: "
                             "KVPAGER_SEESAW_ORDER), lockstep (default: %(default)s)")
    parser.add_argument("--pdl", default="on", help="combine launch: on, off or on,off (default: %(default)s)")
    parser.add_argument("--hint", default="first",
                        help="seesaw TMA L2 eviction hints, e.g. first,normal,last (default: %(default)s)")
    parser.add_argument("--eager", action="store_true", help="also time eager calls through the wrapper")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q and cache dtype")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: the fused FP8 decode on 656-byte rows vs the bf16 kernel on the same values "
                             "(benchmarks/kernel_fp8.py; default: %(default)s)")
    parser.add_argument("--compare-reference", action="store_true",
                        help="also time the PyTorch reference on a couple of small cases")
    parser.add_argument("--seed", type=int, default=0, help="random inputs seed")
    parser.add_argument("--plain", action="store_true", help="plain-text table instead of rich")


# ---- timing ---------------------------------------------------------------------------------


def make_timer() -> tuple[Callable[[Callable[[], object]], float], str]:
    """Returns (time_us(fn), method)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _event_timer, "CUDA events, L2 cleared before each call, median"

    def time_us(fn: Callable[[], object]) -> float:
        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3

    return time_us, "triton.testing.do_bench(warmup=25, rep=200, median)"


def _event_timer(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n = max(10, int(rep_ms / estimate_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


# ---- ceilings -------------------------------------------------------------------------------


def read_ceiling_gbps(time_us: Callable) -> float:
    x = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    t = time_us(lambda: x.sum())
    del x
    return (1 << 30) * 2 / (t * 1e-6) / 1e9


def l2_traffic_bytes(case: Case, mean_s_k: float) -> float:
    """Bytes the SMs pull through L2 in one call: every row block of a kv head reads all of its
    pages (the blocks share them in L2, so HBM sees them once), plus q and the output."""
    from kvpager.kernels.schedule import num_m_blocks

    row_blocks = num_m_blocks(case.s_q * case.h_q // case.h_kv)
    return 2 * (row_blocks * case.b * mean_s_k * case.h_kv * D + case.b * case.s_q * case.h_q * (D + DV))


def matmul_ceiling_tflops(time_us: Callable) -> float:
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    c = torch.empty_like(a)
    t = time_us(lambda: torch.matmul(a, b, out=c))
    return 2 * n**3 / (t * 1e-6) / 1e12


# ---- inputs ---------------------------------------------------------------------------------


def make_inputs(case: Case, dtype: torch.dtype, seed: int) -> dict:
    """Random q and paged cache for `case`; pages in random order from a >= 128 MB pool."""
    torch.manual_seed(seed)
    if case.varlen:
        lens = torch.normal(float(case.s_k), case.s_k / 2, (case.b,)).clamp(1, 2 * case.s_k).round()
    else:
        lens = torch.full((case.b,), float(case.s_k))
    lens = lens.to(torch.int32)
    pages = (lens + PAGE - 1) // PAGE
    total_pages = int(pages.sum())
    page_bytes = PAGE * case.h_kv * D * torch.finfo(dtype).bits // 8
    num_pages = max(total_pages, math.ceil(POOL_MIN_BYTES / page_bytes))
    max_pages = int(pages.max())
    block_table = torch.zeros(case.b, max_pages, dtype=torch.int32)
    block_table[torch.arange(max_pages) < pages[:, None]] = torch.randperm(num_pages)[:total_pages].to(torch.int32)
    return {
        "q": torch.randn(case.b, case.s_q, case.h_q, D, dtype=dtype, device="cuda"),
        "k_cache": torch.randn(num_pages, PAGE, case.h_kv, D, dtype=dtype, device="cuda"),
        "block_table": block_table.cuda(),
        "cache_seqlens": lens.cuda(),
    }


def work(case: Case, lens: torch.Tensor) -> tuple[float, float, float]:
    """(mean s_k, FLOPs, bytes) of one call, as the issue defines them."""
    mean_s_k = float(lens.double().mean())
    flops = 2 * case.b * case.s_q * case.h_q * mean_s_k * (D + DV)
    nbytes = 2 * (case.b * mean_s_k * case.h_kv * D + case.b * case.s_q * case.h_q * (D + DV))
    return mean_s_k, flops, nbytes


# ---- the run --------------------------------------------------------------------------------


ENV = {"kernel": "KVPAGER_MLA_KERNEL", "pdl": "KVPAGER_PDL", "hint": "KVPAGER_TMA_HINT",
       "order": "KVPAGER_SEESAW_ORDER"}


@contextlib.contextmanager
def kernel_env(variant: dict):
    """The KVPAGER_* switches of `variant` for the calls (and graph captures) inside, then restored."""
    saved = {v: os.environ.get(v) for v in ENV.values()}
    os.environ[ENV["kernel"]] = "lockstep" if variant["kernel"] == "lockstep" else "seesaw"
    order = variant["kernel"].partition("-o")[2]  # seesaw-o11: the seesaw kernel with hand-off order 11
    if order:
        os.environ[ENV["order"]] = order
    else:
        os.environ.pop(ENV["order"], None)
    os.environ[ENV["pdl"]] = "1" if variant["pdl"] else "0"
    os.environ[ENV["hint"]] = variant["hint"]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variants(case: Case, kernels_: list[str], pdls: list[bool], hints: list[str]) -> list[dict]:
    """Switch settings to time: the 64-row kernels (and the seesaw's TMA cache hint) only matter when
    a kv head has more than 32 query rows."""
    if case.s_q * case.h_q // case.h_kv <= 32:
        return [dict(kernel="mma.sync", pdl=pdl, hint=hints[0]) for pdl in pdls]
    out = []
    for kernel in kernels_:
        seesaw = kernel.startswith("seesaw")
        for hint in hints if seesaw else hints[:1]:
            out += [dict(kernel=kernel, pdl=pdl, hint=hint) for pdl in pdls]
    return out


def bench_case(case: Case, dtype: torch.dtype, seed: int, time_us: Callable, ceilings: dict,
               kernels_: list[str], pdls: list[bool], hints: list[str], eager: bool) -> list[dict]:
    from kvpager import kernels

    x = make_inputs(case, dtype, seed)
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)
    t_meta = time_us(lambda: kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv))
    mean_s_k, flops, nbytes = work(case, x["cache_seqlens"].cpu())
    l2_bytes = l2_traffic_bytes(case, mean_s_k)

    def call():
        return kernels.flash_mla_with_kvcache(
            x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], DV, meta, splits, causal=True
        )

    results, first_out = [], None
    for variant in variants(case, kernels_, pdls, hints):
        with kernel_env(variant):
            out, _ = call()
            finite = bool(torch.isfinite(out).all())
            if first_out is None:
                first_out = out.float()
            agree = float(torch.nn.functional.cosine_similarity(out.float().flatten(), first_out.flatten(), dim=0))
            # Decode steps run as CUDA graphs in serving; the graph replay drops the host-side cost
            # (checks, dispatch, two launches) that eager timing adds to microsecond-sized cases.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            t = time_us(graph.replay)
            t_eager = time_us(call) if eager else float("nan")
        tflops, gbps = flops / (t * 1e-6) / 1e12, nbytes / (t * 1e-6) / 1e9
        results.append({
            **asdict(case),
            **variant,
            "mean_s_k": round(mean_s_k, 1),
            "time_us": round(t, 2),
            "eager_us": round(t_eager, 2),
            "tflops": round(tflops, 1),
            "frac_matmul": round(tflops / ceilings["matmul_tflops"], 3),
            "gbps": round(gbps, 1),
            "frac_read": round(gbps / ceilings["read_gbps"], 3),
            "l2_gbps": round(l2_bytes / (t * 1e-6) / 1e9, 1),
            "num_parts": meta.shape[0],
            "total_splits": int(splits[-1]),
            "metadata_us": round(t_meta, 2),
            "finite": finite,
            "one_minus_cos_vs_first": round(1 - agree, 9),
        })
    return results


def bench_reference(case: Case, dtype: torch.dtype, seed: int, time_us: Callable) -> dict:
    from kvpager import kernels
    from kvpager.reference import mla_decode_reference

    x = make_inputs(case, dtype, seed)
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], case.s_q * case.h_q // case.h_kv, case.h_kv)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], DV)
    ours = kernels.flash_mla_with_kvcache(*args, meta, splits, causal=True)[0].double().flatten()
    ref = mla_decode_reference(*args, causal=True)[0].double().flatten()
    t_ref = time_us(lambda: mla_decode_reference(*args, causal=True))
    t_ours = time_us(lambda: kernels.flash_mla_with_kvcache(*args, meta, splits, causal=True))
    cos = float((ours @ ref) / (ours.norm() * ref.norm()).clamp(min=1e-300))
    return {**asdict(case), "reference_us": round(t_ref, 1), "kernel_us": round(t_ours, 2),
            "speedup": round(t_ref / t_ours, 1), "one_minus_cos": 1 - cos}


def run(args: argparse.Namespace) -> int:
    from kvpager import kernels
    from kvpager.errors import KernelUnavailable

    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device here; run it on an H100 / H200")
    device = torch.device("cuda")
    if not kernels.available() or not kernels.supports_device(device):
        why = kernels.unavailable_reason() or f"{torch.cuda.get_device_name()} is not sm_90"
        raise KernelUnavailable(f"the kernel cannot run here: {why}")
    dtype = DTYPES[args.dtype]
    time_us, method = make_timer()
    props = torch.cuda.get_device_properties(device)
    print(f"{props.name}: {props.multi_processor_count} SMs, {props.L2_cache_size >> 20} MB L2; "
          f"torch {torch.__version__}; timing with {method}")
    ceilings = {"read_gbps": read_ceiling_gbps(time_us), "matmul_tflops": matmul_ceiling_tflops(time_us)}
    print(f"ceilings: read {ceilings['read_gbps']:.0f} GB/s (bf16 sum of 2 GiB), "
          f"cuBLAS bf16 8192^3 {ceilings['matmul_tflops']:.0f} TFLOP/s")
    if args.kv_cache_dtype == "fp8":
        from kvpager.benchmarks import kernel_fp8

        return kernel_fp8.run(args, time_us, method, props, ceilings)
    kernels_ = [k.strip() for k in args.kernels.split(",") if k.strip()]
    pdls = [{"on": True, "off": False}[v.strip()] for v in args.pdl.split(",") if v.strip()]
    hints = [v.strip() for v in args.hint.split(",") if v.strip()]
    results = []
    for i, case in enumerate(cases(args.case_set)):
        results.extend(bench_case(case, dtype, args.seed + i, time_us, ceilings, kernels_, pdls, hints,
                                  args.eager))
        torch.cuda.empty_cache()
    print_table(results, args.plain)
    reference = []
    if args.compare_reference:
        reference = [bench_reference(c, dtype, args.seed, time_us) for c in REFERENCE_CASES]
        for r in reference:
            print(f"reference b={r['b']} s_k={r['s_k']} h_q={r['h_q']}: {r['reference_us']:.0f} us, "
                  f"kernel {r['kernel_us']:.1f} us ({r['speedup']}x), 1-cos {r['one_minus_cos']:.1e}")
    report = {
        "device": props.name,
        "num_sms": props.multi_processor_count,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "timing": method,
        "ceilings": {k: round(v, 1) for k, v in ceilings.items()},
        "results": results,
        "reference": reference,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    bad = [r for r in results if not r["finite"]]
    if bad:
        print(f"WARNING: non-finite output in {len(bad)} case(s): the kernel is wrong there")
    return 0


COLUMNS = [  # (header, key, format)
    ("b", "b", "{}"), ("s_q", "s_q", "{}"), ("h_q", "h_q", "{}"), ("s_k", "mean_s_k", "{:.0f}"),
    ("varlen", "varlen", "{}"), ("kernel", "kernel", "{}"), ("pdl", "pdl", "{}"), ("hint", "hint", "{}"), ("µs", "time_us", "{:.1f}"),
    ("eager µs", "eager_us", "{:.1f}"), ("TFLOPS", "tflops", "{:.0f}"),
    ("×mm", "frac_matmul", "{:.2f}"), ("GB/s", "gbps", "{:.0f}"), ("×read", "frac_read", "{:.2f}"),
    ("L2 GB/s", "l2_gbps", "{:.0f}"),
    ("splits", "total_splits", "{}"), ("meta µs", "metadata_us", "{:.1f}"), ("finite", "finite", "{}"),
]


def print_table(results: list[dict], plain: bool, columns: list[tuple[str, str, str]] = COLUMNS,
                title: str = "MLA decode (fractions of the ceilings measured above)") -> None:
    """One row per result: a rich table, or aligned plain text (plain=True or no rich)."""
    rows = [[fmt.format(r[key]) for _, key, fmt in columns] for r in results]
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, (h, _, _) in enumerate(columns)]
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)))
        for row in rows:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=title)
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
