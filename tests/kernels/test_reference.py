"""Reference MLA decode vs a naive dense float64 attention."""
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpager import flash_mla_with_kvcache, get_mla_metadata

D, DV, PAGE = 72, 64, 64  # small head dims keep the CPU suite fast; the code is dim-agnostic


def dense(q, ks, seqlens, dv, scale, causal):
    """Per sequence: plain softmax attention in float64 over its contiguous keys."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        k = ks[i].double()  # [L, h_kv, d]
        g = h_q // k.shape[1]
        for h in range(h_q):
            kh = k[:, h // g]
            for r in range(s_q):
                n = seqlens[i] - s_q + r + 1 if causal else seqlens[i]
                if n <= 0:
                    continue
                s = (kh[:n] @ q[i, r, h].double()) * scale
                out[i, r, h] = torch.softmax(s, 0) @ kh[:n, :dv]
                lse[i, h, r] = torch.logsumexp(s, 0)
    return out, lse


def build(seqlens, h_kv, dtype, seed, max_pages=None):
    """A paged cache with shuffled page ids, NaN in every unused slot, huge ids in the padding."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_per = [-(-n // PAGE) for n in seqlens]
    max_pages = max_pages or max(max(pages_per), 1)
    num_pages = sum(pages_per) + 3
    k_cache = torch.full((num_pages, PAGE, h_kv, D), float("nan"), dtype=dtype)
    ids = list(range(num_pages))
    rng.shuffle(ids)
    block_table = torch.full((len(seqlens), max_pages), 2**31 - 1, dtype=torch.int32)
    ks = []
    for i, n in enumerate(seqlens):
        k = torch.randn(n, h_kv, D, generator=gen).to(dtype)
        ks.append(k)
        mine = [ids.pop() for _ in range(pages_per[i])]
        block_table[i, :len(mine)] = torch.tensor(mine, dtype=torch.int32)
        for j, page in enumerate(mine):
            chunk = k[j * PAGE:(j + 1) * PAGE]
            k_cache[page, :len(chunk)] = chunk
    return k_cache, block_table, torch.tensor(seqlens, dtype=torch.int32), ks


CASES = [(s_q, causal, h_kv) for s_q in (1, 2, 4) for causal in (False, True) for h_kv in (1, 2)]


@pytest.mark.parametrize("s_q,causal,h_kv", CASES)
def test_matches_dense_attention(s_q, causal, h_kv):
    seed = s_q * 10 + causal * 2 + h_kv
    rng = random.Random(seed)
    seqlens = [0, 1, 3, 64, 65, 130] + [rng.randint(0, 200) for _ in range(3)]
    rng.shuffle(seqlens)
    h_q = 4 * h_kv
    k_cache, block_table, cache_seqlens, ks = build(seqlens, h_kv, torch.float32, seed)
    q = torch.randn(len(seqlens), s_q, h_q, D, generator=torch.Generator().manual_seed(seed))
    meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                      causal=causal)
    ref_out, ref_lse = dense(q, ks, seqlens, DV, 1 / math.sqrt(D), causal)
    assert out.shape == (len(seqlens), s_q, h_q, DV) and out.dtype == torch.float32
    assert lse.shape == (len(seqlens), h_q, s_q) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_empty_rows_give_zero_and_inf():
    k_cache, block_table, cache_seqlens, _ = build([0, 2], 1, torch.float32, 0)
    q = torch.randn(2, 4, 2, D)
    meta, splits = get_mla_metadata(cache_seqlens, 8, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                      causal=True)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()
    # seqlen 2 < s_q 4: the first two rows see no key, the last sees both.
    assert (out[1, :2] == 0).all() and (lse[1, :, :2] == math.inf).all()
    assert torch.isfinite(lse[1, :, 2:]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_and_scale(dtype):
    seqlens = [5, 70]
    k_cache, block_table, cache_seqlens, ks = build(seqlens, 1, dtype, 3)
    q = torch.randn(2, 1, 2, D).to(dtype)
    meta, splits = get_mla_metadata(cache_seqlens, 2, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                      softmax_scale=0.3)
    ref_out, ref_lse = dense(q, ks, seqlens, DV, 0.3, False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)


def test_full_size_mla_heads():
    """DeepSeek dims: d=576, dv=512, 16 heads, one latent head."""
    global D, DV
    seqlens = [100, 1]
    d, dv = D, DV
    try:
        D, DV = 576, 512
        k_cache, block_table, cache_seqlens, ks = build(seqlens, 1, torch.bfloat16, 5)
        q = torch.randn(2, 1, 16, D).bfloat16()
        meta, splits = get_mla_metadata(cache_seqlens, 16, 1)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits)
        ref_out, ref_lse = dense(q, ks, seqlens, DV, 1 / math.sqrt(D), False)
    finally:
        D, DV = d, dv
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_query_rows_in_chunks_match_dense_attention(causal, monkeypatch):
    """A budget of a few rows per chunk: the row offsets of the causal mask carry over."""
    import kvpager.reference

    monkeypatch.setattr(kvpager.reference, "SCORE_CHUNK_ELEMENTS", 3 * 4 * 130)  # ~3 rows
    seqlens = [130, 7, 0, 64]
    k_cache, block_table, cache_seqlens, ks = build(seqlens, 1, torch.float32, 11)
    q = torch.randn(len(seqlens), 7, 4, D, generator=torch.Generator().manual_seed(11))
    meta, splits = get_mla_metadata(cache_seqlens, 7 * 4, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits,
                                      causal=causal)
    ref_out, ref_lse = dense(q, ks, seqlens, DV, 1 / math.sqrt(D), causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


MEMORY_BOUNDED_PREFILL = """
import resource, sys
import torch
torch.set_num_threads(1)
from kvpager.reference import mla_decode_reference
n, h = 2048, 16  # a causal prefill: 2048 query rows over 2048 keys, 16 heads
gen = torch.Generator().manual_seed(0)
k_cache = torch.randn(n // 64, 64, 1, 64, generator=gen)
q = torch.randn(1, n, h, 64, generator=gen)
table = torch.arange(n // 64, dtype=torch.int32)[None]
mla_decode_reference(q[:, :4], k_cache, table, torch.tensor([4], dtype=torch.int32), 32, causal=True)
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = vm + 300 * 2**20  # 300 MiB more address space; the whole score matrix alone is 256 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out, lse = mla_decode_reference(q, k_cache, table, torch.tensor([n], dtype=torch.int32), 32, causal=True)
print("ok", bool(torch.isfinite(lse).all()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc (Linux)")
def test_a_long_prefill_costs_time_not_memory():
    """Query rows in chunks of SCORE_CHUNK_ELEMENTS scores: a 2048 x 2048 causal prefill runs in
    300 MiB of extra address space (all its scores at once would need ~1 GiB with temporaries)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_BOUNDED_PREFILL], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "True"], result.stderr[-2000:]
