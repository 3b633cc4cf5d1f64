"""The Hopper MLA decode kernel against the float32 PyTorch reference, on an sm_90 GPU.

The shape matrix of issue 5 is covered pairwise (every pair of values of any two parameters
appears in some case) rather than as a full product, plus a few explicit corner cases. Every
case uses randomly permuted pages, NaN in every slot no sequence owns (page tails, unused pages),
and a huge page id in the padded table columns, so a kernel that reads past a sequence shows it.
"""
from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from kvpager import kernels
import kvpager.mla as mla
from kvpager.errors import InvalidArgument
from kvpager.kernels import fake, schedule
from kvpager.reference import mla_decode_reference

D, DV, PAGE = 576, 512, 64
PAD_PAGE_ID = 2**30
DEVICE = "cuda"  # a name, so the helpers can be exercised off-GPU
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return f"{torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; the kernel needs sm_90"
    if not kernels.available():
        return kernels.unavailable_reason()
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ready")]


# ---- the case matrix ------------------------------------------------------------------------

MATRIX = {
    "b": [1, 2, 6, 64, 128],
    "s_q": [1, 2, 4],
    "s_k": [1, 20, 63, 64, 65, 140, 4096],
    "h_q": [1, 3, 9, 16, 63, 64, 126, 128],
    "h_kv": [1, 2],
    "varlen": [False, True],
    "causal": [False, True],
    "zeros": [False, True],
    "dtype": ["bf16", "fp16"],
}


def _valid(case: dict) -> bool:
    return "h_q" not in case or "h_kv" not in case or case["h_q"] % case["h_kv"] == 0


def pairwise(params: dict[str, list], seed: int = 0) -> list[dict]:
    """Greedy all-pairs covering: each new case starts from an uncovered pair and fills the other
    parameters with the values that cover the most still-uncovered pairs."""
    names = list(params)
    rng = random.Random(seed)
    uncovered = {
        (a, va, b, vb)
        for i, a in enumerate(names)
        for b in names[i + 1:]
        for va in params[a]
        for vb in params[b]
        if _valid({a: va, b: vb})
    }
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)
        case = {a: va, b: vb}
        rest = [n for n in names if n not in case]
        rng.shuffle(rest)
        for n in rest:
            def gain(v, n=n):
                trial = {**case, n: v}
                return sum((m, trial[m], n, v) in uncovered or (n, v, m, trial[m]) in uncovered for m in case)

            options = [v for v in params[n] if _valid({**case, n: v})]
            best = max(gain(v) for v in options)
            case[n] = rng.choice([v for v in options if gain(v) == best])
        uncovered -= {(x, case[x], y, case[y]) for i, x in enumerate(names) for y in names[i + 1:]}
        cases.append({n: case[n] for n in names})
    return cases


EXTRA = [  # corners the pairwise set may leave out
    dict(b=1024, s_q=1, s_k=140, h_q=16, h_kv=1, varlen=True, causal=False, zeros=True, dtype="bf16"),
    dict(b=2, s_q=2, s_k=16384, h_q=128, h_kv=1, varlen=False, causal=True, zeros=False, dtype="bf16"),
    dict(b=128, s_q=2, s_k=4096, h_q=128, h_kv=1, varlen=True, causal=True, zeros=True, dtype="bf16"),
    dict(b=64, s_q=1, s_k=4096, h_q=16, h_kv=1, varlen=True, causal=False, zeros=True, dtype="fp16"),
    dict(b=1, s_q=1, s_k=1, h_q=1, h_kv=1, varlen=False, causal=False, zeros=False, dtype="bf16"),
    dict(b=6, s_q=4, s_k=65, h_q=126, h_kv=2, varlen=True, causal=True, zeros=True, dtype="fp16"),
]
CASES = pairwise(MATRIX) + EXTRA


def case_id(c: dict) -> str:
    return (f"b{c['b']}-sq{c['s_q']}-sk{c['s_k']}-hq{c['h_q']}-hkv{c['h_kv']}-"
            f"{'var' if c['varlen'] else 'fix'}-{'causal' if c['causal'] else 'full'}-"
            f"{'zeros' if c['zeros'] else 'nz'}-{c['dtype']}")


# ---- inputs ---------------------------------------------------------------------------------


def seqlens_for(c: dict) -> torch.Tensor:
    """int32 [b]: s_k for all, or uniform in [1, s_k] with one at s_k; some 0 when c['zeros'];
    with causal, non-empty sequences hold at least s_q tokens (each query sees a key)."""
    b, s_k = c["b"], c["s_k"]
    lens = torch.full((b,), s_k, dtype=torch.int64)
    if c["varlen"]:
        lens = torch.randint(1, s_k + 1, (b,))
        lens[torch.randint(0, b, (1,))] = s_k
    if c["causal"]:
        lens = lens.clamp(min=c["s_q"])
    if c["zeros"]:
        lens[torch.rand(b) < 0.25] = 0
        lens[0] = 0
    return lens.to(torch.int32)


def make_batch(b, s_q, h_q, h_kv, lens, dtype, capacity=None):
    """q, a NaN-poisoned paged cache holding random K only where `lens` says, a table of randomly
    permuted pages (capacity tokens per row if given) padded with a huge page id."""
    pages = [math.ceil((capacity if capacity is not None else n) / PAGE) for n in lens.tolist()]
    total = sum(pages)
    num_pages = total + max(3, total // 8)  # unused pages stay NaN
    max_pages = max(pages + [1]) + 1  # at least one padded column
    perm = torch.randperm(num_pages).to(torch.int32)
    block_table = torch.full((b, max_pages), PAD_PAGE_ID, dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        block_table[i, :p] = perm[used:used + p]
        used += p
    block_table = block_table.to(DEVICE)
    k_cache = torch.empty(num_pages, PAGE, h_kv, D, dtype=dtype, device=DEVICE)
    cache_seqlens = lens.to(DEVICE)
    fill_cache(k_cache, block_table, cache_seqlens)
    q = torch.randn(b, s_q, h_q, D, device=DEVICE).to(dtype)
    return q, k_cache, block_table, cache_seqlens


def fill_cache(k_cache, block_table, cache_seqlens) -> None:
    """NaN everywhere, then random values in the slots of tokens [0, len) of every sequence."""
    k_cache.fill_(float("nan"))
    lens = cache_seqlens.cpu().long()
    tokens = torch.arange(int(lens.max()) if lens.numel() else 0)
    mask = tokens[None, :] < lens[:, None]
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return
    pages = block_table.cpu().long()[b_idx, t_idx // PAGE]
    slots = (pages * PAGE + t_idx % PAGE).to(DEVICE)
    h_kv = k_cache.shape[2]
    values = torch.randn(slots.numel(), h_kv, D, device=DEVICE).to(k_cache.dtype)
    k_cache.view(-1, h_kv, D)[slots] = values


def metadata(q, k_cache, cache_seqlens):
    h_kv = k_cache.shape[2]
    return kernels.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv)


def reference(q, k_cache, block_table, cache_seqlens, causal, softmax_scale=None):
    """kvpager.reference in float32 on a NaN-free copy of the cache (NaN robustness is the
    kernel's to prove, not the reference's)."""
    k = torch.nan_to_num(k_cache.float(), nan=0.0)
    return mla_decode_reference(q.float(), k, block_table, cache_seqlens, DV, softmax_scale=softmax_scale,
                                causal=causal)


def assert_matches_reference(out, lse, ref_out, ref_lse, cache_seqlens) -> None:
    b, s_q, h_q, _ = out.shape
    assert out.shape == ref_out.shape and lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert not out.isnan().any(), "NaN in out"
    assert not lse.isnan().any(), "NaN in lse"
    empty = (cache_seqlens == 0).cpu()
    if empty.any():
        assert (out[empty.to(DEVICE)] == 0).all(), "out of an empty sequence is not 0"
        assert (lse[empty.to(DEVICE)] == math.inf).all(), "lse of an empty sequence is not +inf"
    full = (~empty).to(DEVICE)
    if not full.any():
        return
    o, r = out[full].double(), ref_out[full].double()  # float32 sums lose 1e-4 over millions
    cos = (o * r).sum() / (o.norm() * r.norm()).clamp(min=1e-300)
    assert 1 - cos.item() <= 1e-5, f"1 - cos = {1 - cos.item():.2e}"
    scale = r.abs().max().item()
    err = (o - r).abs().max().item()
    assert err <= 2e-2 * scale, f"max abs error {err:.3e} vs output scale {scale:.3e}"
    got, want = lse[full], ref_lse[full].float()
    assert torch.isfinite(got).all(), "non-finite lse for a non-empty sequence"
    lse_err = (got - want).abs().max().item()
    assert lse_err <= 1e-3, f"lse error {lse_err:.2e}"


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_matches_reference(c: dict) -> None:
    torch.manual_seed(zlib.crc32(case_id(c).encode()))
    lens = seqlens_for(c)
    q, k_cache, block_table, seqlens = make_batch(c["b"], c["s_q"], c["h_q"], c["h_kv"], lens,
                                                  DTYPES[c["dtype"]])
    meta, splits = metadata(q, k_cache, seqlens)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits,
                                              causal=c["causal"])
    assert out.dtype == q.dtype
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, c["causal"])
    assert_matches_reference(out, lse, ref_out, ref_lse, seqlens)


def test_softmax_scale_is_used() -> None:
    torch.manual_seed(1)
    q, k_cache, block_table, seqlens = make_batch(2, 1, 16, 1, torch.tensor([100, 300], dtype=torch.int32),
                                                  torch.bfloat16)
    meta, splits = metadata(q, k_cache, seqlens)
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits,
                                              softmax_scale=0.1)
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False, 0.1), seqlens)


SEQLENS = {
    "one-empty": [0],
    "one-token": [1],
    "all-empty": [0, 0, 0],
    "long": [100_000],
    "mixed": [0, 1, 63, 64, 65, 4096, 0, 20000, 7],
    "b1024": "random",
}


@pytest.mark.parametrize("rows, h_kv", [(1, 1), (16, 1), (32, 1), (128, 1), (256, 1), (64, 2), (126, 2)])
@pytest.mark.parametrize("name", list(SEQLENS))
def test_metadata_equals_schedule_plan(name: str, rows: int, h_kv: int) -> None:
    lens = SEQLENS[name]
    if lens == "random":
        lens = torch.randint(0, 9000, (1024,), generator=torch.Generator().manual_seed(2)).tolist()
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    meta, splits = kernels.get_mla_metadata(seqlens, rows, h_kv)
    parts = schedule.num_sm_parts(kernels.num_sms(seqlens.device), rows, h_kv)
    want_meta, want_splits = schedule.plan(seqlens.cpu(), parts)
    assert meta.shape == (parts, schedule.METADATA_FIELDS) and meta.dtype == torch.int32
    assert splits.dtype == torch.int32 and meta.is_contiguous() and splits.is_contiguous()
    assert torch.equal(meta.cpu(), want_meta)
    assert torch.equal(splits.cpu(), want_splits)


def test_outputs_match_fake_impls() -> None:
    torch.manual_seed(3)
    q, k_cache, block_table, seqlens = make_batch(3, 2, 64, 2, torch.tensor([5, 0, 200], dtype=torch.int32),
                                                  torch.float16)
    meta, splits = metadata(q, k_cache, seqlens)
    fmeta, fsplits = fake.get_mla_metadata_fake(seqlens, 64, 2)
    for real, f in ((meta, fmeta), (splits, fsplits)):
        assert (real.shape, real.dtype, real.stride()) == (f.shape, f.dtype, f.stride())
    out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    fout, flse = fake.mla_decode_fake(q, k_cache, block_table, seqlens, DV, meta, splits, 0.1, False)
    for real, f in ((out, fout), (lse, flse)):
        assert (real.shape, real.dtype, real.stride()) == (f.shape, f.dtype, f.stride())


def test_split_equals_unsplit() -> None:
    """One long sequence cut over every SM, vs the same sequence as each row of a batch sized so
    that no row is split (num_parts rows of equal cost: the cost line cuts exactly between them)."""
    torch.manual_seed(4)
    n = 256 * PAGE
    q1, k_cache, bt1, sl1 = make_batch(1, 1, 16, 1, torch.tensor([n], dtype=torch.int32), torch.bfloat16)
    meta1, splits1 = metadata(q1, k_cache, sl1)
    parts = meta1.shape[0]
    assert int(splits1[1]) > 1, "the long sequence was not split"
    out1, lse1 = kernels.flash_mla_with_kvcache(q1, k_cache, bt1, sl1, DV, meta1, splits1)
    qn, btn = q1.expand(parts, -1, -1, -1).contiguous(), bt1.expand(parts, -1).contiguous()
    sln = sl1.expand(parts).contiguous()
    metan, splitsn = metadata(qn, k_cache, sln)
    assert (splitsn.diff() == 1).all(), "a row of the batch was split"
    outn, lsen = kernels.flash_mla_with_kvcache(qn, k_cache, btn, sln, DV, metan, splitsn)
    assert torch.equal(outn, outn[:1].expand_as(outn)), "identical rows gave different outputs"
    assert torch.equal(lsen, lsen[:1].expand_as(lsen))
    assert_matches_reference(out1, lse1, outn[:1], lsen[:1], sl1)
    assert_matches_reference(out1, lse1, *reference(q1, k_cache, bt1, sl1, False), sl1)


def test_cuda_graph_capture_and_replay() -> None:
    torch.manual_seed(5)
    b, s_q, h_q, h_kv, capacity = 6, 2, 64, 1, 700
    lens = torch.tensor([0, 2, 64, 65, 300, 700], dtype=torch.int32)  # causal: >= s_q or 0
    q, k_cache, block_table, seqlens = make_batch(b, s_q, h_q, h_kv, lens, torch.bfloat16, capacity=capacity)

    def step():
        meta, splits = kernels.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        return kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits, causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    # New step: other lengths (one becomes empty, one grows), new cache contents, new queries.
    seqlens.copy_(torch.tensor([5, 0, 700, 129, 2, 640], dtype=torch.int32))
    fill_cache(k_cache, block_table, seqlens)
    q.copy_(torch.randn(q.shape, device=DEVICE).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, True), seqlens)


def test_torch_compile_fullgraph() -> None:
    torch.manual_seed(6)
    b, s_q, h_q, h_kv = 4, 2, 32, 1
    lens = torch.tensor([0, 77, 640, 2000], dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(b, s_q, h_q, h_kv, lens, torch.bfloat16)

    def step(q, k_cache, block_table, seqlens):
        meta, splits = kernels.get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2], k_cache.shape[2])
        out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits, causal=True)
        return out.float() * 2, lse + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(q, k_cache, block_table, seqlens)
    want = step(q, k_cache, block_table, seqlens)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch._dynamo.reset()


# ---- bad input ------------------------------------------------------------------------------


@pytest.fixture
def good():
    torch.manual_seed(7)
    q, k_cache, block_table, seqlens = make_batch(2, 1, 16, 1, torch.tensor([70, 5], dtype=torch.int32),
                                                  torch.bfloat16)
    meta, splits = metadata(q, k_cache, seqlens)
    return [q, k_cache, block_table, seqlens, DV, meta, splits]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(1, a[1].half()), "!= q dtype"),
        (lambda a: a.__setitem__(0, torch.cat([a[0], a[0]], -1)[..., ::2]), "contiguous"),
        (lambda a: a.__setitem__(0, a[0].cpu()), "one device"),
        (lambda a: a.__setitem__(2, a[2].cpu()), "block_table is on cpu"),
        (lambda a: a.__setitem__(3, a[3].long()), "int32"),
        (lambda a: a.__setitem__(0, a[0][..., :512].contiguous()), "head dim"),
        (lambda a: a.__setitem__(5, kernels.get_mla_metadata(a[3], 128, 1)[0]), "get_mla_metadata"),
    ],
)
def test_bad_input_raises_invalid_argument(good, change, match) -> None:
    """kvpager.mla is the one validation layer (kvpager.kernels is a thin wrapper)."""
    change(good)
    with pytest.raises(InvalidArgument, match=match):
        mla.flash_mla_with_kvcache(*good)
    torch.cuda.synchronize()  # no sticky CUDA error


def test_heads_not_dividing(good) -> None:
    q, k_cache = good[0], good[1]
    good[0] = q[:, :, :3].contiguous()
    good[1] = torch.cat([k_cache, k_cache], dim=2)
    with pytest.raises(InvalidArgument, match="h_q=3 is not a multiple of h_kv=2"):
        mla.flash_mla_with_kvcache(*good)


def test_binding_errors_reach_the_caller_as_invalid_argument(good) -> None:
    """A check only the binding makes (16-byte aligned rows) surfaces as InvalidArgument."""
    q = good[0]
    padded = torch.zeros(*q.shape[:3], D + 1, dtype=q.dtype, device=q.device)
    padded[..., 1:] = q
    good[0] = padded[..., 1:]  # last dim contiguous, rows 1154 bytes apart: misaligned
    with pytest.raises(InvalidArgument, match="kvpager:"):
        kernels.flash_mla_with_kvcache(*good)


def test_binding_checks_raise_kvpager_errors(good) -> None:
    """The op itself (no wrapper) rejects input that would make the kernels index out of bounds with a
    'kvpager:' RuntimeError, not a crash. (What arguments mean is kvpager.mla's to check.)"""
    q, k_cache, block_table, seqlens, dv, meta, splits = good
    bad_calls = [
        (q.float(), k_cache, block_table, seqlens, dv, meta, splits),
        (q, k_cache, block_table.long(), seqlens, dv, meta, splits),
        (q, k_cache[:, :32].contiguous(), block_table, seqlens, dv, meta, splits),
        (q, k_cache, block_table, seqlens, dv, meta, splits[:-1]),
        (q, k_cache[:, :, :0], block_table, seqlens, dv, meta, splits),
    ]
    for args in bad_calls:
        with pytest.raises(RuntimeError, match="kvpager:"):
            torch.ops.kvpager.mla_decode(*args, D**-0.5, False)
    with pytest.raises(RuntimeError, match="kvpager:"):
        torch.ops.kvpager.get_mla_metadata(seqlens.long(), 16, 1)
    torch.cuda.synchronize()
    out, _ = kernels.flash_mla_with_kvcache(*good)  # still usable
    assert not out.isnan().any()
