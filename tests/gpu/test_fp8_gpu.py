"""The FP8 latent cache on a CUDA device: quantize matches the CPU byte for byte, and
kvpager.mla's decode on an FP8 cache matches the CPU reference on the dequantized cache.

kvpager.mla picks the decode: the fused FP8 kernel (kvpager.kernels, sm_90; 16/32-row blocks up to
32 query rows per kv head, the seesaw kernel with its converter warpgroup beyond), the PyTorch
reference where it is missing or switched off; the fused-kernel tests check which one ran, so a
kernel switched off (KVPAGER_FP8_KERNEL=0, KVPAGER_FP8_SEESAW=0) or missing cannot pass unseen.
Every case has zero-length rows, NaN in every byte no sequence owns (e4m3 NaN values, NaN scales,
NaN RoPE), shuffled pages and a huge page id in the padded table columns; half use 65-row pages.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import kvpager.kernels as kernels
from kvpager import CacheConfig, PagePool, flash_mla_with_kvcache, fp8, get_mla_metadata
from kvpager.errors import InvalidArgument
from kvpager.reference import mla_decode_reference

D, DV, PAGE, ROW = 576, 512, 64, 656
PAD_PAGE_ID = 2**30
POISON = 0xFF
DEVICE = "cuda"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(autouse=True)
def fp8_seesaw_on(monkeypatch):
    """The 64-row FP8 blocks on, whatever kvpager.kernels.FP8_SEESAW_DEFAULT says (a test may turn
    them off again)."""
    monkeypatch.setenv("KVPAGER_FP8_SEESAW", "1")


# ---- quantize / dequantize / pool ---------------------------------------------------------------


def awkward_rows(n: int, seed: int) -> torch.Tensor:
    """float32 [n, 576]: groups at magnitudes from float32 subnormals to near its maximum, zero
    and signed-zero groups, e4m3 ties at exact power-of-two scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 128, generator=gen)
    x = x * torch.exp2(torch.randint(-140, 120, (n, 4, 1), generator=gen).float())
    x[::7, 1] = 0.0
    x[::11, 2] = -0.0
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2
    ties = mids[torch.randint(0, mids.numel(), (n, 128), generator=gen)]
    ties[:, 0] = 448.0
    x[::3, 3] = ties[::3] * torch.exp2(torch.randint(-13, 100, (x[::3].shape[0], 1), generator=gen).float())
    rope = torch.randn(n, 64, generator=gen) * 100
    return torch.cat([x.flatten(1), rope], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_cuda_equals_cpu_byte_for_byte(dtype):
    x = awkward_rows(4096, 1).clamp(-3e38, 3e38).to(dtype)
    cpu = fp8.quantize(x)
    gpu = fp8.quantize(x.to(DEVICE))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8
    assert torch.equal(gpu.cpu(), cpu)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8.dequantize(gpu, out_dtype).cpu(), fp8.dequantize(cpu, out_dtype))


def test_quantize_on_cuda_rejects_non_finite():
    x = torch.randn(3, D, device=DEVICE)
    x[2, 130] = math.inf
    with pytest.raises(InvalidArgument, match="latent group 1"):
        fp8.quantize(x)


def test_pool_on_cuda_writes_the_cpu_bytes():
    config = dict(num_layers=2, num_pages=3, num_kv_heads=1, kv_cache_dtype="fp8")
    pool = PagePool(CacheConfig(device=DEVICE, **config))
    assert pool.kv.device.type == "cuda" and pool.kv.shape[-1] == ROW
    latent = awkward_rows(100, 2).clamp(-3e38, 3e38).bfloat16()
    slots = torch.randperm(3 * PAGE)[:100]
    pool.write(1, slots, latent.to(DEVICE))  # a CPU slot_mapping
    pool.write(0, slots.to(DEVICE), latent.to(DEVICE))  # a GPU one
    want = torch.zeros(pool.kv.shape[1] * PAGE, 1, ROW, dtype=torch.uint8)  # + the null page
    want[slots] = fp8.quantize(latent).unsqueeze(1)
    for layer in (0, 1):
        assert torch.equal(pool.layer(layer).cpu().view(-1, 1, ROW), want)
    pool.copy_pages([1], [2])
    assert torch.equal(pool.kv[:, 2], pool.kv[:, 1])


def test_pool_on_cuda_stores_nan_unchecked():
    """Documented: a GPU write is not checked for NaN (no host sync); the group reads as NaN."""
    pool = PagePool(CacheConfig(num_layers=1, num_pages=1, device=DEVICE, kv_cache_dtype="fp8"))
    latent = torch.randn(1, D, device=DEVICE)
    latent[0, 5] = math.nan
    pool.write(0, torch.tensor([0]), latent)
    back = fp8.dequantize(pool.layer(0)[0, 0, 0], torch.float32)
    assert back[:128].isnan().all() and torch.isfinite(back[128:]).all()


# ---- decode on an FP8 cache ---------------------------------------------------------------------

CASES = [dict(h_q=h_q, s_q=s_q, varlen=varlen, causal=causal, padded=(h_q + s_q + varlen) % 2 == 1)
         for h_q in (16, 64, 128) for s_q in (1, 2) for varlen in (False, True)
         for causal in (False, True)]


def case_id(c: dict) -> str:
    return (f"hq{c['h_q']}-sq{c['s_q']}-{'var' if c['varlen'] else 'fix'}-"
            f"{'causal' if c['causal'] else 'full'}-{'page65' if c['padded'] else 'page64'}")


def make_batch(c: dict, b: int = 12, s_k: int = 1500, zeros: bool = True):
    """q bf16, a poisoned FP8 cache on the GPU (65-row pages if c['padded'], c.get('h_kv', 1) kv
    heads), table, lengths (zero-length rows unless zeros=False; with causal, non-empty rows hold
    >= s_q tokens)."""
    h_kv = c.get("h_kv", 1)
    lens = torch.full((b,), s_k)
    if c["varlen"]:
        lens = torch.randint(1, s_k + 1, (b,))
        lens[1 % b] = s_k
    if c["causal"]:
        lens = lens.clamp(min=c["s_q"])
    if zeros:
        lens[0] = 0
        lens[torch.rand(b) < 0.2] = 0
    pages = [-(-int(n) // PAGE) for n in lens]
    num_pages = sum(pages) + 3
    perm = torch.randperm(num_pages)
    block_table = torch.full((b, max(pages + [1]) + 1), PAD_PAGE_ID, dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        block_table[i, :p] = perm[used:used + p].to(torch.int32)
        used += p
    rows = PAGE + 1 if c["padded"] else PAGE
    k_cache = torch.full((num_pages, rows, h_kv, ROW), POISON, dtype=torch.uint8, device=DEVICE)[:, :PAGE]
    for i, n in enumerate(lens.tolist()):
        tokens = torch.arange(n)
        page_ids = block_table[i, tokens // PAGE].long()
        k_cache[page_ids.to(DEVICE), (tokens % PAGE).to(DEVICE)] = \
            fp8.quantize(torch.randn(n, h_kv, D, device=DEVICE).bfloat16())
    q = torch.randn(b, c["s_q"], c["h_q"], D, device=DEVICE).bfloat16()
    return q, k_cache, block_table.to(DEVICE), lens.to(torch.int32).to(DEVICE)


def assert_agrees(out, lse, ref_out, ref_lse, lens) -> None:
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out, lse, lens = out.cpu(), lse.cpu(), lens.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    empty = lens == 0
    assert (out[empty] == 0).all() and (lse[empty] == math.inf).all()
    o, r = out[~empty].double(), ref_out[~empty].double()
    cos = (o * r).sum() / (o.norm() * r.norm()).clamp(min=1e-300)
    assert 1 - cos.item() <= 1e-5, f"1 - cos = {1 - cos.item():.2e}"
    got, want = lse[~empty], ref_lse[~empty]
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-3


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_fp8_decode_matches_cpu_reference(c: dict) -> None:
    torch.manual_seed(zlib.crc32(case_id(c).encode()))
    q, k_cache, block_table, lens = make_batch(c)
    rows = c["s_q"] * c["h_q"]
    meta, splits = get_mla_metadata(lens, rows, 1, num_heads_q=c["h_q"], is_fp8_kvcache=True)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits,
                                      causal=c["causal"], is_fp8_kvcache=True)
    dequantized = torch.nan_to_num(fp8.dequantize(k_cache.cpu(), torch.float32), nan=0.0)
    ref_out, ref_lse = mla_decode_reference(q.cpu().float(), dequantized, block_table.cpu(),
                                            lens.cpu(), DV, causal=c["causal"])
    assert_agrees(out, lse, ref_out, ref_lse, lens)


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.__setitem__("q", a["q"].half()), "bfloat16"),
    (lambda a: a.__setitem__("k_cache", a["k_cache"][..., :576]), "656 bytes"),
    (lambda a: a.__setitem__("k_cache", fp8.dequantize(a["k_cache"])), "is_fp8_kvcache=True but"),
    (lambda a: a.__setitem__("is_fp8_kvcache", False), "pass is_fp8_kvcache=True"),
    (lambda a: a.__setitem__("k_cache", torch.zeros(a["k_cache"].numel() + 8, dtype=torch.uint8,
                                                    device=DEVICE)[8:].view(a["k_cache"].shape)),
     "16-byte aligned"),
])
def test_bad_fp8_input_on_cuda(change, needle) -> None:
    q, k_cache, block_table, lens = make_batch(dict(h_q=16, s_q=1, varlen=True, causal=False,
                                                    padded=False), b=3, s_k=200)
    meta, splits = get_mla_metadata(lens, 16, 1)
    a = dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=lens, head_dim_v=DV,
             tile_scheduler_metadata=meta, num_splits=splits, is_fp8_kvcache=True)
    change(a)
    with pytest.raises(InvalidArgument, match=needle):
        flash_mla_with_kvcache(**a)
    torch.cuda.synchronize()  # no sticky CUDA error


# ---- the fused FP8 decode (kvpager.kernels, any query rows per kv head) --------------------------


def _fused_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not kernels.supports_device(DEVICE):
        return f"{torch.cuda.get_device_name()} is not sm_90"
    return kernels.fp8_unavailable_reason()


fused = pytest.mark.skipif(bool(_fused_skip_reason()), reason=_fused_skip_reason() or "ready")


FUSED_CASES = [dict(h_q=h_q, s_q=s_q, varlen=varlen, causal=(h_q + s_q) % 2 == 1,
                    padded=(h_q // 16 + s_q + varlen) % 2 == 1)
               for h_q in (16, 32) for s_q in (1, 2) for varlen in (False, True)]
FUSED_CASES += [
    dict(h_q=32, s_q=1, varlen=True, causal=False, padded=True, h_kv=2),   # 16 rows a kv head
    dict(h_q=64, s_q=1, varlen=False, causal=True, padded=False, h_kv=2),  # 32 rows a kv head
    dict(h_q=8, s_q=2, varlen=True, causal=True, padded=True),             # 16 rows, 8 heads
]
# 64-row blocks (the seesaw kernel and its converter warpgroup): the pairwise grid at h_q 64 / 128,
# two kv heads, and 40 rows (a block with 24 padding rows).
FUSED_CASES += [dict(h_q=h_q, s_q=s_q, varlen=varlen, causal=(h_q // 64 + s_q + varlen) % 2 == 1,
                     padded=(h_q // 64 + s_q) % 2 == 0)
                for h_q in (64, 128) for s_q in (1, 2) for varlen in (False, True)]
FUSED_CASES += [
    dict(h_q=128, s_q=1, varlen=True, causal=False, padded=True, h_kv=2),  # 64 rows a kv head, 2 heads
    dict(h_q=20, s_q=2, varlen=True, causal=True, padded=False),           # 40 rows: one padded block
]


def fused_id(c: dict) -> str:
    return case_id(c) + f"-hkv{c.get('h_kv', 1)}"


def decode(c: dict, q, k_cache, block_table, lens):
    h_kv = k_cache.shape[2]
    meta, splits = get_mla_metadata(lens, c["s_q"] * c["h_q"] // h_kv, h_kv, num_heads_q=c["h_q"],
                                    is_fp8_kvcache=True)
    return flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, causal=c["causal"],
                                  is_fp8_kvcache=True)


def reference_on_gpu(c: dict, q, k_cache, block_table, lens):
    """The reference in float32 on the GPU (it dequantizes each sequence's gathered pages)."""
    out, lse = mla_decode_reference(q.float(), k_cache, block_table, lens, DV, causal=c["causal"],
                                    is_fp8_kvcache=True)
    return out.cpu(), lse.cpu()


@fused
@pytest.mark.parametrize("c", FUSED_CASES, ids=fused_id)
def test_fused_fp8_decode_matches_the_reference(c: dict, fused_calls, fp8_decode) -> None:
    torch.manual_seed(zlib.crc32(fused_id(c).encode()))
    q, k_cache, block_table, lens = make_batch(c)
    out, lse = decode(c, q, k_cache, block_table, lens)
    assert fused_calls == [tuple(q.shape)]
    assert_agrees(out, lse, *reference_on_gpu(c, q, k_cache, block_table, lens), lens)


@fused
@pytest.mark.parametrize("b,s_k,h_q,varlen", [(1, 20000, 16, False), (128, 4096, 16, True), (64, 2048, 32, False),
                                               (1, 20000, 128, False), (64, 2048, 128, True), (33, 3000, 64, False)])
def test_fused_fp8_decode_long_and_wide(b, s_k, h_q, varlen, fused_calls, fp8_decode) -> None:
    """Long sequences split over many SMs (the combine kernel), and the bench's batch shapes."""
    c = dict(h_q=h_q, s_q=1, varlen=varlen, causal=False, padded=b == 64)
    torch.manual_seed(b + s_k)
    q, k_cache, block_table, lens = make_batch(c, b=b, s_k=s_k, zeros=b > 1)
    out, lse = decode(c, q, k_cache, block_table, lens)
    assert len(fused_calls) == 1
    assert_agrees(out, lse, *reference_on_gpu(c, q, k_cache, block_table, lens), lens)


@fused
@pytest.mark.parametrize("pdl,h_q", [("1", 16), ("0", 16), ("1", 128), ("0", 128)])
def test_fused_fp8_decode_in_a_cuda_graph(pdl, h_q, monkeypatch, fused_calls, fp8_decode) -> None:
    """Metadata + decode captured once, replayed on new q and lengths written in place (with and
    without programmatic dependent launch of the combine kernel), on 32- and 64-row blocks."""
    monkeypatch.setenv("KVPAGER_PDL", pdl)
    c = dict(h_q=h_q, s_q=2, varlen=True, causal=True, padded=True)
    torch.manual_seed(7)
    q, k_cache, block_table, lens = make_batch(c, b=16, s_k=900)
    eager = decode(c, q, k_cache, block_table, lens)  # also the kernel's one-time setup
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = decode(c, q, k_cache, block_table, lens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    shorter = (lens - 300).clamp(min=0)
    shorter[shorter.nonzero()[:1]] = 0  # one more empty row
    lens.copy_(torch.where(shorter > 0, shorter.clamp(min=c["s_q"]), shorter))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert len(fused_calls) == 2
    assert_agrees(out, lse, *reference_on_gpu(c, q, k_cache, block_table, lens), lens)


@fused
def test_fused_fp8_switched_off_runs_the_reference(monkeypatch, fused_calls) -> None:
    monkeypatch.setenv("KVPAGER_FP8_KERNEL", "0")
    c = dict(h_q=16, s_q=1, varlen=True, causal=False, padded=False)
    torch.manual_seed(8)
    q, k_cache, block_table, lens = make_batch(c, b=4, s_k=300)
    out, lse = decode(c, q, k_cache, block_table, lens)
    assert fused_calls == []
    assert_agrees(out, lse, *reference_on_gpu(c, q, k_cache, block_table, lens), lens)


@fused
def test_fused_fp8_kernel_refuses_what_it_does_not_cover() -> None:
    """Called directly (kvpager.kernels is a thin wrapper; kvpager.mla checks first), the binding's
    memory-safety checks refuse with a typed error: fp16 q on an FP8 cache, on both row-block kinds."""
    for h_q in (16, 128):
        c = dict(h_q=h_q, s_q=1, varlen=False, causal=False, padded=False)
        q, k_cache, block_table, lens = make_batch(c, b=2, s_k=100)
        meta, splits = get_mla_metadata(lens, h_q, 1)
        with pytest.raises(InvalidArgument, match="(?i)bfloat16"):
            kernels.flash_mla_with_kvcache(q.half(), k_cache, block_table, lens, DV, meta, splits,
                                           is_fp8_kvcache=True)
    torch.cuda.synchronize()


@fused
def test_fp8_seesaw_switched_off_runs_the_reference(monkeypatch, fused_calls) -> None:
    """KVPAGER_FP8_SEESAW=0: more than 32 rows a kv head go to the reference; 16 rows stay fused."""
    monkeypatch.setenv("KVPAGER_FP8_SEESAW", "0")
    for h_q, expected in ((128, 0), (16, 1)):
        c = dict(h_q=h_q, s_q=1, varlen=True, causal=False, padded=False)
        torch.manual_seed(h_q)
        q, k_cache, block_table, lens = make_batch(c, b=4, s_k=300)
        fused_calls.clear()
        out, lse = decode(c, q, k_cache, block_table, lens)
        assert len(fused_calls) == expected
        assert_agrees(out, lse, *reference_on_gpu(c, q, k_cache, block_table, lens), lens)


@fused
@pytest.mark.parametrize("name, value, message", [
    ("KVPAGER_FP8_DECODE", "fast", "KVPAGER_FP8_DECODE must be ws or split"),
    ("KVPAGER_FP8_PREFETCH", "far", "KVPAGER_FP8_PREFETCH must be 0-8"),  # the ws kernel's L2 prefetch, pages
])
def test_fp8_switch_with_a_bad_value_is_a_typed_error(monkeypatch, name, value, message) -> None:
    """The FP8 run-time switches are read on every call; a value they do not know is refused, naming
    the variable and its choices."""
    c = dict(h_q=16, s_q=1, varlen=False, causal=False, padded=False)
    q, k_cache, block_table, lens = make_batch(c, b=2, s_k=100)
    meta, splits = get_mla_metadata(lens, 16, 1)
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgument, match=message):
        kernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, is_fp8_kvcache=True)
    torch.cuda.synchronize()


@fused
@pytest.mark.parametrize("h_q", [16, 128])
def test_fused_fp8_decode_under_torch_compile(h_q) -> None:
    """The op's fake impl (kvpager.kernels.fake) lets torch.compile hold the call whole."""
    c = dict(h_q=h_q, s_q=2, varlen=True, causal=True, padded=True)
    torch.manual_seed(9)
    q, k_cache, block_table, lens = make_batch(c, b=5, s_k=400)

    def step(q, k_cache, block_table, lens):
        meta, splits = kernels.get_mla_metadata(lens, 2 * h_q, 1)
        return kernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, causal=True,
                                              is_fp8_kvcache=True)

    eager = step(q, k_cache, block_table, lens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_cache, block_table, lens)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
