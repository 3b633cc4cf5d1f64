"""Batched prefill's attention on the kernel: chunks of different lengths left-padded to the
call's longest (runtime/models/protocol.py). The real columns must match the reference; the
padding columns of a chunk that starts at 0 see no key at all (limit <= 0), a case the kernel
tests' causal inputs never build: out 0, lse +inf, no NaN, and nothing leaks into real rows."""
from __future__ import annotations

import math

import pytest
import torch

from kvpager import kernels
from kvpager.mla import flash_mla_with_kvcache, get_mla_metadata
from kvpager.reference import mla_decode_reference

D, DV, PAGE = 576, 512, 64


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the kernel needs sm_90"
    if not kernels.available():
        return kernels.unavailable_reason()
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ready")]


@pytest.mark.parametrize("h_q", [16, 128])
@pytest.mark.parametrize("starts, lens", [
    ([0, 100, 0, 5], [40, 33, 7, 40]),          # fresh prompts and chunks at an offset
    ([0, 0, 0], [300, 1, 150]),                 # one long chunk, a one-token one
    ([1000, 0], [64, 64]),                      # equal lengths: no padding
])
def test_left_padded_prefill_matches_reference(h_q, starts, lens):
    torch.manual_seed(h_q + sum(lens))
    b, s_q = len(lens), max(lens)
    seqlens = torch.tensor([s + n for s, n in zip(starts, lens)], dtype=torch.int32, device="cuda")
    pages = [math.ceil(int(n) / PAGE) for n in seqlens.tolist()]
    block_table = torch.zeros(b, max(pages) + 1, dtype=torch.int32, device="cuda")
    first = 1  # page 0 is the null page: padding writes land there in the engine
    for i, p in enumerate(pages):
        block_table[i, :p] = torch.arange(first, first + p, dtype=torch.int32)
        first += p
    k_cache = torch.randn(first, PAGE, 1, D, device="cuda").to(torch.bfloat16)
    k_cache[0] = float("nan")  # the null page: never read as a key
    q = torch.randn(b, s_q, h_q, D, device="cuda").to(torch.bfloat16)
    meta, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits, causal=True)
    ref_out, ref_lse = mla_decode_reference(q.float(), torch.nan_to_num(k_cache.float()), block_table,
                                            seqlens, DV, causal=True)
    assert not out.isnan().any() and not lse.isnan().any()
    for row, (start, n) in enumerate(zip(starts, lens)):
        real = slice(s_q - n, s_q)
        o, r = out[row, real].double(), ref_out[row, real].double()
        assert (o - r).abs().max().item() <= 2e-2 * r.abs().max().item(), f"row {row}"
        assert (lse[row, :, real] - ref_lse[row, :, real]).abs().max().item() <= 1e-3
        blind = max(0, s_q - n - start)  # padding columns whose causal limit is <= 0
        if blind:
            assert (out[row, :blind] == 0).all() and (lse[row, :, :blind] == math.inf).all()
