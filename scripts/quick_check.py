"""Smoke test of the CUDA ops against a dense float32 attention, plus a few timings.
Self-contained (torch + the built extension only), for the first device runs of a kernel change:
    python scripts/quick_check.py [--kernels seesaw,lockstep] [--bench]
Each case runs once per 64-row kernel named (KVPAGER_MLA_KERNEL; cases under 64 rows per kv head
use mma.sync either way).
"""
import argparse
import importlib
import math
import os
import sys

import torch

importlib.import_module("kvpager.kernels._C")
sys.path.insert(0, "kernels")
import schedule  # noqa: E402

ops = torch.ops.kvpager


def make_case(b, s_q, h_q, h_kv, lens, dtype, dev="cuda", poison=True):
    d = 576
    pages = [math.ceil(l / 64) for l in lens]
    max_pages = max(1, max(pages))
    num_pages = sum(pages) + 7
    perm = torch.randperm(num_pages, device=dev)
    bt = torch.full((b, max_pages), 2**30, dtype=torch.int32, device=dev)
    k = torch.randn(num_pages, 64, h_kv, d, device=dev, dtype=dtype)
    if poison:
        k[:] = float("nan")
    used = 0
    for i, n in enumerate(pages):
        ids = perm[used:used + n]
        used += n
        bt[i, :n] = ids.to(torch.int32)
        for j, pid in enumerate(ids.tolist()):
            valid = min(64, lens[i] - j * 64)
            k[pid, :valid] = torch.randn(valid, h_kv, d, device=dev, dtype=dtype)
    q = torch.randn(b, s_q, h_q, d, device=dev, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    return q, k, bt, seqlens


def dense_ref(q, k, bt, seqlens, causal, scale):
    b, s_q, h_q, d = q.shape
    h_kv = k.shape[2]
    out = torch.zeros(b, s_q, h_q, 512, device=q.device)
    lse = torch.full((b, h_q, s_q), float("inf"), device=q.device)
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        np_ = math.ceil(n / 64)
        kk = k[bt[i, :np_].long()].reshape(np_ * 64, h_kv, d)[:n].float()  # [n, h_kv, d]
        qq = q[i].float()  # [s_q, h_q, d]
        kh = kk.repeat_interleave(h_q // h_kv, dim=1)  # [n, h_q, d]
        s = torch.einsum("shd,nhd->hsn", qq, kh) * scale
        if causal:
            row = torch.arange(s_q, device=q.device)[:, None]
            col = torch.arange(n, device=q.device)[None, :]
            s = s.masked_fill(col > n - s_q + row, float("-inf"))
        l = torch.logsumexp(s, dim=-1)  # [h, s_q]
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = torch.einsum("hsn,nhd->shd", p, kh[..., :512])
        out[i] = o
        lse[i] = torch.where(torch.isfinite(l), l, torch.full_like(l, float("inf")))
    return out, lse


def check(b, s_q, h_q, h_kv, lens, causal, dtype=torch.bfloat16):
    q, k, bt, seqlens = make_case(b, s_q, h_q, h_kv, lens, dtype)
    meta, ns = ops.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    ref_meta, ref_ns = schedule.plan(seqlens.cpu(), meta.shape[0])
    meta_ok = torch.equal(meta.cpu(), ref_meta) and torch.equal(ns.cpu(), ref_ns)
    scale = 576 ** -0.5
    out, lse = ops.mla_decode(q, k, bt, seqlens, 512, meta, ns, scale, causal)
    torch.cuda.synchronize()
    ro, rl = dense_ref(q, k, bt, seqlens, causal, scale)
    o = out.float()
    nan = bool(torch.isnan(o).any() or torch.isnan(lse).any())
    cos = torch.nn.functional.cosine_similarity(o.flatten(), ro.flatten(), dim=0).item() if ro.abs().sum() > 0 else 1.0
    err = (o - ro).abs().max().item()
    fin = torch.isfinite(rl)
    lse_err = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    inf_ok = bool(torch.equal(torch.isinf(lse), ~fin))
    ok = meta_ok and not nan and (1 - cos) <= 1e-5 and err < 0.05 and lse_err < 1e-3 and inf_ok
    print(f"{'OK ' if ok else 'BAD'} [{os.environ.get('KVPAGER_MLA_KERNEL', 'seesaw')}] b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} causal={int(causal)} {str(dtype)[6:]} "
          f"lens={lens[:6]}{'...' if len(lens) > 6 else ''} meta_ok={meta_ok} nan={nan} 1-cos={1 - cos:.2e} "
          f"maxerr={err:.3e} lse_err={lse_err:.2e} inf_ok={inf_ok}", flush=True)
    return ok


def bench():
    from triton.testing import do_bench
    x = torch.randn(2**30 // 2 * 2, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    t = do_bench(lambda: x.sum(), warmup=25, rep=200, return_mode="median") * 1e-3
    read_bw = x.numel() * 2 / t
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ bm, warmup=25, rep=200, return_mode="median") * 1e-3
    mm = 2 * 8192**3 / t
    del x, a, bm
    print(f"ceilings: read {read_bw/1e9:.0f} GB/s, bf16 matmul {mm/1e12:.0f} TFLOP/s")
    for b, sk, h_q, s_q in [(128, 8192, 16, 1), (128, 4096, 16, 1), (128, 8192, 128, 1), (128, 4096, 128, 2),
                            (128, 8192, 64, 1), (1, 4096, 128, 1), (8, 2048, 16, 1)]:
        q, k, bt, seqlens = make_case(b, s_q, h_q, 1, [sk] * b, torch.bfloat16, poison=False)
        meta, ns = ops.get_mla_metadata(seqlens, s_q * h_q, 1)
        fn = lambda: ops.mla_decode(q, k, bt, seqlens, 512, meta, ns, 576 ** -0.5, True)
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        t = do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e-3
        flops = 2 * b * s_q * h_q * sk * (576 + 512)
        byts = 2 * (b * sk * 576 + b * s_q * h_q * (576 + 512))
        print(f"b={b} s_k={sk} h_q={h_q} s_q={s_q}: {t*1e6:8.1f} us  {flops/t/1e12:6.1f} TFLOP/s ({flops/t/mm:.2f})"
              f"  {byts/t/1e9:6.0f} GB/s ({byts/t/read_bw:.2f})", flush=True)
        del q, k


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--kernels", default="seesaw", help="64-row kernels, comma-separated: seesaw, lockstep")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [
        (1, 1, 16, 1, [1], False), (1, 1, 16, 1, [64], False), (2, 1, 16, 1, [65, 140], False),
        (2, 1, 128, 1, [4096, 20], False), (6, 2, 16, 1, [0, 63, 64, 65, 140, 1], True),
        (4, 4, 16, 1, [3, 70, 200, 0], True), (2, 1, 3, 1, [100, 5], False), (3, 2, 9, 1, [30, 129, 300], True),
        (2, 1, 63, 1, [500, 64], False), (2, 2, 64, 2, [130, 70], True), (2, 1, 126, 2, [1000, 77], False),
        (64, 1, 16, 1, [int(x) for x in torch.randint(0, 3000, (64,))], False),
        (128, 2, 128, 1, [int(x) for x in torch.randint(0, 700, (128,))], True),
        (1, 1, 1, 1, [4096], False), (2, 4, 128, 2, [4096, 1], True),
        # prefill through the decode API: s_q = chunk length, causal
        (1, 128, 16, 1, [300], True), (2, 256, 16, 1, [256, 400], True), (1, 64, 128, 1, [64], True),
    ]
    cases += [  # seesaw shapes: odd / even page counts, partial pages, splits, fp16
        (3, 1, 128, 1, [1, 64, 129], False), (2, 2, 64, 1, [193, 191], True), (1, 3, 96, 1, [4100], True),
        (64, 1, 128, 1, [1024] * 64, False), (4, 1, 128, 2, [0, 5000, 65, 300], False),
    ]
    results = []
    for kernel in args.kernels.split(","):
        os.environ["KVPAGER_MLA_KERNEL"] = kernel
        results += [check(*c) for c in cases]
        results.append(check(2, 2, 16, 1, [300, 65], True, torch.float16))
        results.append(check(3, 2, 64, 1, [300, 65, 128], True, torch.float16))
    print(f"quick_check: {sum(results)} passed, {len(results) - sum(results)} failed")
    if args.bench:
        bench()
