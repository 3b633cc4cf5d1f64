"""The seesaw kernel (64-row blocks: h_q * s_q / h_kv > 32) against the float32 reference, on sm_90.

The pairwise grid covers h_q in {64, 96, 128} x s_q in {1, 2, 3} x varlen with sequence lengths
around page and pair boundaries (odd and even page counts, partial last pages), NaN in every slot
no sequence owns and zero-length rows (tests/gpu/test_kernel.py's make_batch). The lockstep
kernel (KVPAGER_MLA_KERNEL=lockstep), the combine launch without PDL (KVPAGER_PDL=0) and Q by
cp.async instead of TMA (KVPAGER_SEESAW_Q=cp.async) are run on the same inputs, since the benchmark
compares them.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from kvpager import kernels
from kvpager.errors import InvalidArgument
from test_kernel import (  # tests/gpu is on sys.path: pytest's default rootdir-relative imports
    DTYPES,
    DV,
    PAGE,
    _skip_reason,
    assert_matches_reference,
    fill_cache,
    make_batch,
    metadata,
    pairwise,
    reference,
    seqlens_for,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ready")]

SEESAW_MATRIX = {
    "h_q": [64, 96, 128],
    "s_q": [1, 2, 3],
    "varlen": [False, True],
    # pair boundaries: 1-2 pages, 2, 3 (odd), 4, partial last pages, long (split over parts)
    "s_k": [1, 63, 64, 65, 128, 129, 191, 193, 1000, 4096],
    "b": [1, 3, 17, 64],
    "h_kv": [1, 2],
    "causal": [False, True],
    "zeros": [False, True],
    "dtype": ["bf16", "fp16"],
}
PAIRWISE = pairwise(SEESAW_MATRIX, seed=9)
_covered = {(c["h_q"], c["s_q"], c["varlen"]) for c in PAIRWISE}
FULL_PRODUCT = [  # every h_q x s_q x varlen of the issue, not only every pair of them
    dict(h_q=h_q, s_q=s_q, varlen=v, s_k=SEESAW_MATRIX["s_k"][i % 10], b=SEESAW_MATRIX["b"][i % 4], h_kv=1,
         causal=bool(i % 2), zeros=bool(i % 3 == 0), dtype="bf16")
    for i, (h_q, s_q, v) in enumerate(
        (h, s, v) for h in SEESAW_MATRIX["h_q"] for s in SEESAW_MATRIX["s_q"] for v in (False, True))
    if (h_q, s_q, v) not in _covered
]
CASES = PAIRWISE + FULL_PRODUCT + [
    dict(h_q=128, s_q=1, varlen=False, s_k=16384 + 65, b=1, h_kv=1, causal=False, zeros=False, dtype="bf16"),
    dict(h_q=128, s_q=2, varlen=True, s_k=3000, b=128, h_kv=1, causal=True, zeros=True, dtype="bf16"),
    dict(h_q=128, s_q=1, varlen=False, s_k=1024, b=64, h_kv=1, causal=False, zeros=False, dtype="bf16"),
]


def case_id(c: dict) -> str:
    return (f"hq{c['h_q']}-sq{c['s_q']}-{'var' if c['varlen'] else 'fix'}-sk{c['s_k']}-b{c['b']}-hkv{c['h_kv']}-"
            f"{'causal' if c['causal'] else 'full'}-{'zeros' if c['zeros'] else 'nz'}-{c['dtype']}")


def run(c: dict):
    torch.manual_seed(zlib.crc32(case_id(c).encode()))
    lens = seqlens_for(c)
    q, k_cache, block_table, seqlens = make_batch(c["b"], c["s_q"], c["h_q"], c["h_kv"], lens, DTYPES[c["dtype"]])
    meta, splits = metadata(q, k_cache, seqlens)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits, causal=c["causal"])
    return (q, k_cache, block_table, seqlens), out, lse


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_seesaw_matches_reference(c: dict, monkeypatch) -> None:
    monkeypatch.setenv("KVPAGER_MLA_KERNEL", "seesaw")
    (q, k_cache, block_table, seqlens), out, lse = run(c)
    assert out.dtype == q.dtype
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, c["causal"]), seqlens)


@pytest.mark.parametrize("c", CASES[::4], ids=case_id)
def test_lockstep_and_seesaw_agree(c: dict, monkeypatch) -> None:
    monkeypatch.setenv("KVPAGER_MLA_KERNEL", "lockstep")
    _, old_out, old_lse = run(c)
    monkeypatch.setenv("KVPAGER_MLA_KERNEL", "seesaw")
    (q, k_cache, block_table, seqlens), out, lse = run(c)
    assert_matches_reference(old_out, old_lse, *reference(q, k_cache, block_table, seqlens, c["causal"]), seqlens)
    assert_matches_reference(out, lse, old_out.float(), old_lse, seqlens)


@pytest.mark.parametrize("pdl", ["0", "1"])
@pytest.mark.parametrize("h_q", [16, 128])
def test_combine_with_and_without_pdl(pdl: str, h_q: int, monkeypatch) -> None:
    """Split sequences (b = 2, long) so the combine kernel does real work, launched both ways."""
    monkeypatch.setenv("KVPAGER_PDL", pdl)
    c = dict(h_q=h_q, s_q=1, varlen=True, s_k=9000, b=2, h_kv=1, causal=False, zeros=False, dtype="bf16")
    (q, k_cache, block_table, seqlens), out, lse = run(c)
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False), seqlens)


def test_pdl_inside_a_cuda_graph(monkeypatch) -> None:
    """The programmatic dependency is captured into the graph; replays after new inputs stay right."""
    monkeypatch.setenv("KVPAGER_PDL", "1")
    torch.manual_seed(11)
    lens = torch.tensor([5000, 1, 0, 300], dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(4, 1, 128, 1, lens, torch.bfloat16, capacity=5000)

    def step():
        meta, splits = kernels.get_mla_metadata(seqlens, 128, 1)
        return kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for new_lens in ([64, 4999, 129, 0], [3000, 3000, 1, 65]):
        seqlens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        fill_cache(k_cache, block_table, seqlens)
        q.copy_(torch.randn(q.shape, device=q.device).to(q.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False), seqlens)


@pytest.mark.parametrize("name, value, error, message", [
    ("KVPAGER_MLA_KERNEL", "fast", Exception, "KVPAGER_MLA_KERNEL"),
    ("KVPAGER_SEESAW_ORDER", "16", InvalidArgument, "KVPAGER_SEESAW_ORDER must be 11 or 15, got 16"),
    ("KVPAGER_SEESAW_Q", "dma", InvalidArgument, "KVPAGER_SEESAW_Q must be tma or cp.async, got dma"),
])
def test_bad_switch_value_is_an_error(name, value, error, message, monkeypatch) -> None:
    monkeypatch.setenv(name, value)
    c = dict(h_q=64, s_q=1, varlen=False, s_k=PAGE, b=1, h_kv=1, causal=False, zeros=False, dtype="bf16")
    with pytest.raises(error, match=message):
        run(c)
    torch.cuda.synchronize()


@pytest.mark.parametrize("c", CASES[1::6], ids=case_id)
def test_order_11_matches_reference(c: dict, monkeypatch) -> None:
    """KVPAGER_SEESAW_ORDER=11 (s12-s14's hand-offs) stays selectable for comparison; the default (15)
    is what test_seesaw_matches_reference runs."""
    monkeypatch.setenv("KVPAGER_SEESAW_ORDER", "11")
    (q, k_cache, block_table, seqlens), out, lse = run(c)
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, c["causal"]), seqlens)


def q_in_layout(q: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as q [b, s_q, h_q, 576], held another way: heads 1280 bytes apart (a slice
    of wider rows), positions inside heads (a transposed [b, h_q, s_q, 576]), or one row of q
    broadcast over the batch (stride 0: no tensor map takes it)."""
    if layout == "contiguous":
        return q
    if layout == "wide-rows":
        wide = torch.full((*q.shape[:3], 640), float("nan"), dtype=q.dtype, device=q.device)
        wide[..., :q.shape[3]] = q
        return wide[..., :q.shape[3]]
    if layout == "transposed":
        return q.transpose(1, 2).contiguous().transpose(1, 2)
    assert layout == "broadcast"
    return q[:1].expand(q.shape)


# (s_q, h_q, h_kv): a row block of one position's 64 heads (groups 128, 64), of 2 positions x 32
# heads, 4 x 16 with the last position past s_q (rows 48: zero-filled by the copy), kv head 1's
# heads (h_kv 2), and groups 96 (a row block would mix positions: Q by cp.async).
Q_SHAPES = [(1, 128, 1), (2, 64, 1), (2, 32, 1), (3, 16, 1), (1, 128, 2), (1, 96, 1)]


@pytest.mark.parametrize("layout", ["contiguous", "wide-rows", "transposed", "broadcast"])
@pytest.mark.parametrize("shape", Q_SHAPES, ids=lambda s: f"sq{s[0]}-hq{s[1]}-hkv{s[2]}")
def test_q_by_tma_and_by_cp_async_agree_bit_for_bit(shape, layout: str, monkeypatch) -> None:
    """KVPAGER_SEESAW_Q=tma (the default: Q's tiles by TMA where q suits a tensor map) lands the
    same Q tiles as cp.async, so out and lse are equal bit for bit; both match the reference.
    Sequences of 0, 1, 65 and 700 tokens: an empty segment, a one-page one, splits."""
    s_q, h_q, h_kv = shape
    torch.manual_seed(31)
    lens = torch.tensor([700, 0, 65, 1], dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(4, s_q, h_q, h_kv, lens, torch.bfloat16)
    q = q_in_layout(q, layout)
    meta, splits = metadata(q, k_cache, seqlens)
    results = {}
    for mode in ("tma", "cp.async"):
        monkeypatch.setenv("KVPAGER_SEESAW_Q", mode)
        results[mode] = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    (out, lse), (old_out, old_lse) = results["tma"], results["cp.async"]
    assert torch.equal(out, old_out) and torch.equal(lse, old_lse)
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False), seqlens)


@pytest.mark.parametrize("h_kv", [1, 2])
def test_padded_page_stride(h_kv: int) -> None:
    """A cache view of 65-row pages (a convention in the field; the tensor map takes the page stride
    from the tensor) with a NaN 65th row: the TMA copies read only the 64 rows of each page."""
    torch.manual_seed(21)
    lens = torch.tensor([700, 64, 129, 1], dtype=torch.int32)
    q, dense, block_table, seqlens = make_batch(4, 2, 64 * h_kv, h_kv, lens, torch.bfloat16)
    padded = torch.full((dense.shape[0], PAGE + 1, h_kv, dense.shape[3]), float("nan"), dtype=dense.dtype,
                        device=dense.device)
    padded[:, :PAGE] = dense
    k_cache = padded[:, :PAGE]
    meta, splits = metadata(q, k_cache, seqlens)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    assert_matches_reference(out, lse, *reference(q, dense, block_table, seqlens, False), seqlens)


@pytest.mark.parametrize("trend", ["rising", "falling"])
def test_running_max_moving_every_page_or_never(trend: str) -> None:
    """Keys scaled by their page's position: rising, most pages raise some row's running max (the O
    rescales run); falling, the max settles on the first pages (later rescales are skipped)."""
    torch.manual_seed(5)
    lens = torch.tensor([40 * PAGE + 17, 23 * PAGE], dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(2, 2, 128, 1, lens, torch.bfloat16)
    for b, n in enumerate(lens.tolist()):
        pages = -(-n // PAGE)
        for j in range(pages):
            factor = 0.25 + 0.05 * j if trend == "rising" else 2.25 - 0.05 * j
            k_cache[int(block_table[b, j])] *= factor
    meta, splits = metadata(q, k_cache, seqlens)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False), seqlens)
