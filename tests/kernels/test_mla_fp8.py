"""flash_mla_with_kvcache(..., is_fp8_kvcache=True) on a machine without the kernel: the reference
on a 656-byte FP8 cache equals the reference on its dequantized bf16 cache; bad input is typed."""
import logging
import os
import random

import pytest
import torch

import kvpager.mla as mla
from kvpager import CacheConfig, PagePool, flash_mla_with_kvcache, fp8, get_mla_metadata
from kvpager.errors import InvalidArgument

D, DV, PAGE, ROW = 576, 512, 64, 656
POISON = 0xFF  # e4m3 NaN in the values, a NaN scale, NaN bf16 RoPE: any read of it shows


def build(seqlens, h_kv, seed, page_rows=PAGE):
    """A poisoned FP8 cache (pages of `page_rows` rows, the first 64 used) holding random latents
    where `seqlens` says, pages shuffled, huge ids in the padded table columns."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_per = [-(-n // PAGE) for n in seqlens]
    num_pages = sum(pages_per) + 2
    buffer = torch.full((num_pages, page_rows, h_kv, ROW), POISON, dtype=torch.uint8)
    k_cache = buffer[:, :PAGE]
    ids = list(range(num_pages))
    rng.shuffle(ids)
    block_table = torch.full((len(seqlens), max(pages_per + [1]) + 1), 2**31 - 1, dtype=torch.int32)
    for i, n in enumerate(seqlens):
        mine = [ids.pop() for _ in range(pages_per[i])]
        block_table[i, :len(mine)] = torch.tensor(mine, dtype=torch.int32)
        latent = torch.randn(n, h_kv, D, generator=gen).bfloat16()
        for j, page in enumerate(mine):
            chunk = latent[j * PAGE:(j + 1) * PAGE]
            k_cache[page, :len(chunk)] = fp8.quantize(chunk)
    return k_cache, block_table, torch.tensor(seqlens, dtype=torch.int32)


def call(q, k_cache, block_table, seqlens, causal=False, **kw):
    h_kv = k_cache.shape[2]
    meta, splits = get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv,
                                    num_heads_q=q.shape[2], is_fp8_kvcache=k_cache.dtype == torch.uint8)
    return flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits,
                                  causal=causal, **kw)


CASES = [(s_q, causal, h_kv, q_dtype) for s_q in (1, 2) for causal in (False, True)
         for h_kv in (1, 2) for q_dtype in (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("s_q,causal,h_kv,q_dtype", CASES)
def test_fp8_equals_reference_on_dequantized_cache(s_q, causal, h_kv, q_dtype):
    seed = s_q * 8 + causal * 4 + h_kv * 2 + (q_dtype == torch.float32)
    seqlens = [0, 1, 64, 65, 130, random.Random(seed).randint(2, 200)]
    k_cache, block_table, lens = build(seqlens, h_kv, seed)
    q = torch.randn(len(seqlens), s_q, 8 * h_kv, D, generator=torch.Generator().manual_seed(seed))
    q = q.to(q_dtype)
    out, lse = call(q, k_cache, block_table, lens, causal, is_fp8_kvcache=True)
    bf16_cache = fp8.dequantize(k_cache)  # NaN where poisoned: unused slots stay unused
    want_out, want_lse = call(q, bf16_cache.to(q_dtype),
                              block_table, lens, causal)
    assert out.dtype == q_dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()  # the zero-length row


def test_padded_page_stride_and_float8_view_read_the_same():
    seqlens = [70, 3, 0, 128]
    padded, block_table, lens = build(seqlens, 1, 1, page_rows=65)  # 65-row pages, 64 used
    assert padded.stride(0) == 65 * ROW and not padded.is_contiguous()
    q = torch.randn(4, 1, 16, D).bfloat16()
    got = call(q, padded, block_table, lens, is_fp8_kvcache=True)
    dense = call(q, padded.contiguous(), block_table, lens, is_fp8_kvcache=True)
    as_fp8 = call(q, padded.view(torch.float8_e4m3fn), block_table, lens, is_fp8_kvcache=True)
    for other in (dense, as_fp8):
        assert torch.equal(got[0], other[0]) and torch.equal(got[1], other[1])


def test_pool_layer_is_a_valid_fp8_cache():
    pool = PagePool(CacheConfig(num_layers=2, num_pages=4, kv_cache_dtype="fp8"))
    latent = torch.randn(100, D).bfloat16()
    pool.write(1, torch.arange(64, 164), latent)  # pages 1 and 2
    block_table = torch.tensor([[1, 2]], dtype=torch.int32)
    lens = torch.tensor([100], dtype=torch.int32)
    q = torch.randn(1, 1, 16, D).bfloat16()
    out, lse = call(q, pool.layer(1), block_table, lens, is_fp8_kvcache=True)
    want = call(q, fp8.dequantize(pool.layer(1)), block_table, lens)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_fp8_output_is_close_to_the_bf16_cache():
    """The end-to-end cost of quantizing (figures: scripts/fp8_error.py)."""
    torch.manual_seed(0)
    n, h_q = 300, 16
    latent = torch.randn(n, 1, D).bfloat16()
    block_table = torch.arange(5, dtype=torch.int32).view(1, 5)
    bf16_cache = torch.zeros(5 * PAGE, 1, D, dtype=torch.bfloat16)
    bf16_cache[:n] = latent
    fp8_cache = fp8.quantize(bf16_cache)
    lens = torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, 1, h_q, D).bfloat16()
    out, lse = call(q.float(), fp8_cache.view(5, PAGE, 1, ROW), block_table, lens, is_fp8_kvcache=True)
    ref, ref_lse = call(q.float(), bf16_cache.float().view(5, PAGE, 1, D), block_table, lens)
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    assert 0 < 1 - cos.item() < 1e-3
    assert (lse - ref_lse).abs().max() < 5e-2


# ---- bad input ----------------------------------------------------------------------------------


def good():
    k_cache, block_table, lens = build([70, 5], 1, 3)
    q = torch.randn(2, 1, 16, D).bfloat16()
    meta, splits = get_mla_metadata(lens, 16, 1)
    return dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=lens, head_dim_v=DV,
                tile_scheduler_metadata=meta, num_splits=splits, is_fp8_kvcache=True)


def unaligned_page_stride(k):
    flat = torch.zeros(k.shape[0] * (PAGE * ROW + 8), dtype=torch.uint8)
    return flat.as_strided(k.shape, (PAGE * ROW + 8, ROW, ROW, 1))


BAD = [
    ("fp16 q", dict(q=lambda a: a["q"].half()), "bfloat16"),
    ("row of 576 bytes", dict(k_cache=lambda a: a["k_cache"][..., :576]), "656 bytes"),
    ("row of 600 bytes", dict(k_cache=lambda a: torch.zeros(5, 64, 1, 600, dtype=torch.uint8)),
     "last dim is 600"),
    ("flag with a bf16 cache", dict(k_cache=lambda a: fp8.dequantize(a["k_cache"])),
     "is_fp8_kvcache=True but k_cache has dtype torch.bfloat16"),
    ("uint8 cache without the flag", dict(is_fp8_kvcache=lambda a: False),
     "pass is_fp8_kvcache=True"),
    ("float8 cache without the flag",
     dict(k_cache=lambda a: a["k_cache"].view(torch.float8_e4m3fn), is_fp8_kvcache=lambda a: False),
     "pass is_fp8_kvcache=True"),
    ("unaligned page stride", dict(k_cache=lambda a: unaligned_page_stride(a["k_cache"])),
     "page stride is 41992 bytes"),
    ("unaligned base", dict(k_cache=lambda a: torch.zeros(5 * 64 * ROW + 8, dtype=torch.uint8)[8:]
                            .view(5, 64, 1, ROW)), "not 16-byte aligned"),
    ("q head dim 512", dict(q=lambda a: a["q"][..., :512].contiguous(),
                            k_cache=lambda a: a["k_cache"]), "head dim"),
    ("flag not a bool", dict(is_fp8_kvcache=lambda a: 1), "must be a bool"),
]


@pytest.mark.parametrize("name,changes,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_fp8_input_is_a_typed_error(name, changes, needle):
    a = good()
    for key, change in changes.items():
        a[key] = change(a)
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(InvalidArgument, match=needle):
        flash_mla_with_kvcache(**a)
    assert all(same_bytes(before[k], a[k]) for k in before)


def same_bytes(x, y):
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


# ---- get_mla_metadata's optional arguments ------------------------------------------------------


def test_metadata_optional_arguments_change_nothing():
    lens = torch.tensor([0, 100, 5000], dtype=torch.int32)
    plain = get_mla_metadata(lens, 32, 1)
    for kw in (dict(num_heads_q=16), dict(is_fp8_kvcache=True), dict(num_heads_q=32, topk=None)):
        got = get_mla_metadata(lens, 32, 1, **kw)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    got = get_mla_metadata(lens, 32, 1, 16, True, None)  # FlashMLA's positional order
    assert torch.equal(got[0], plain[0])


@pytest.mark.parametrize("kw,needle", [
    (dict(topk=2048), "sparse"),
    (dict(num_heads_q=3), "multiple of num_heads_k=2"),
    (dict(num_heads_q=0), "positive"),
    (dict(num_heads_q=24), "not s_q \\* num_heads_q // num_heads_k"),  # 32 rows, 12 heads per kv
    (dict(is_fp8_kvcache="yes"), "must be a bool"),
])
def test_metadata_bad_optional_arguments(kw, needle):
    with pytest.raises(InvalidArgument, match=needle):
        get_mla_metadata(torch.tensor([5], dtype=torch.int32), 32, 2, **kw)


# ---- dispatch on a GPU (faked) ------------------------------------------------------------------


def fake_kernels(monkeypatch, calls, fused_fp8):
    import kvpager.kernels as kernels
    monkeypatch.setattr(kernels, "available", lambda: True, raising=False)
    monkeypatch.setattr(kernels, "supports_device", lambda device: True, raising=False)
    monkeypatch.setattr(kernels, "num_sms", lambda device: mla.NUM_SMS_CPU, raising=False)
    monkeypatch.setattr(kernels, "flash_mla_with_kvcache",
                        lambda *a, **k: calls.append(k) or ("out", "lse"), raising=False)
    if fused_fp8:  # as kvpager.kernels: any rows, more than 32 unless KVPAGER_FP8_SEESAW=0
        monkeypatch.setattr(kernels, "supports_fp8_kvcache",
                            lambda rows=None: rows is None or rows <= 32 or kernels.fp8_seesaw_on(),
                            raising=False)


def test_fp8_runs_on_the_reference_until_the_fused_kernel_exists(monkeypatch, caplog):
    calls, a = [], good()
    fake_kernels(monkeypatch, calls, fused_fp8=False)
    monkeypatch.setattr(mla, "_fp8_fallback_logged", False)
    with caplog.at_level(logging.INFO, logger="kvpager"):
        out, lse = flash_mla_with_kvcache(**a)
        flash_mla_with_kvcache(**a)
    assert calls == [] and out.shape == (2, 1, 16, DV)
    lines = [r for r in caplog.records if "no fused FP8 decode" in r.getMessage()]
    assert len(lines) == 1
    a["k_cache"] = fp8.dequantize(a["k_cache"])
    a["is_fp8_kvcache"] = False
    assert flash_mla_with_kvcache(**a) == ("out", "lse")  # bf16 still goes to the kernel
    assert calls == [{"softmax_scale": None, "causal": False}]


def test_fp8_goes_to_the_fused_kernel_when_it_exists(monkeypatch):
    calls, a = [], good()
    fake_kernels(monkeypatch, calls, fused_fp8=True)
    assert flash_mla_with_kvcache(**a) == ("out", "lse")
    assert calls == [{"softmax_scale": None, "causal": False, "is_fp8_kvcache": True}]


def test_fp8_with_64_rows_goes_to_the_fused_kernel_unless_switched_off(monkeypatch, caplog):
    """64 query rows per kv head (h_q = 64): the fused FP8 decode's 64-row blocks serve it; with
    KVPAGER_FP8_SEESAW=0 the reference does, logged once for that row count, and 16 rows still go
    to the kernel."""
    calls, a, small = [], good(), good()
    a["q"] = torch.randn(2, 1, 64, D).bfloat16()
    a["tile_scheduler_metadata"], a["num_splits"] = get_mla_metadata(a["cache_seqlens"], 64, 1)
    fake_kernels(monkeypatch, calls, fused_fp8=True)
    monkeypatch.setenv("KVPAGER_FP8_SEESAW", "1")
    assert flash_mla_with_kvcache(**a) == ("out", "lse")
    assert calls == [{"softmax_scale": None, "causal": False, "is_fp8_kvcache": True}]
    calls.clear()
    monkeypatch.setenv("KVPAGER_FP8_SEESAW", "0")
    monkeypatch.setattr(mla, "_fp8_rows_logged", set())
    with caplog.at_level(logging.INFO, logger="kvpager"):
        out, lse = flash_mla_with_kvcache(**a)
        flash_mla_with_kvcache(**a)
    assert calls == [] and out.shape == (2, 1, 64, DV) and torch.isfinite(lse).all()
    lines = [r for r in caplog.records if "KVPAGER_FP8_SEESAW=1 turns it on" in r.getMessage()]
    assert len(lines) == 1 and "64 query rows" in lines[0].getMessage()
    assert flash_mla_with_kvcache(**small) == ("out", "lse")
    assert calls == [{"softmax_scale": None, "causal": False, "is_fp8_kvcache": True}]


@pytest.mark.parametrize("value", ["yes", "", "2"])
def test_fp8_seesaw_switch_with_a_bad_value_is_a_typed_error(value, monkeypatch):
    """KVPAGER_FP8_SEESAW takes 0 or 1; anything else is refused by name, also through kvpager.mla's
    dispatch of a 64-row FP8 call (nothing runs)."""
    import kvpager.kernels as kernels
    calls, a = [], good()
    a["q"] = torch.randn(2, 1, 64, D).bfloat16()
    a["tile_scheduler_metadata"], a["num_splits"] = get_mla_metadata(a["cache_seqlens"], 64, 1)
    fake_kernels(monkeypatch, calls, fused_fp8=True)
    monkeypatch.setenv("KVPAGER_FP8_SEESAW", value)
    with pytest.raises(InvalidArgument, match="KVPAGER_FP8_SEESAW must be 0 .* or 1 .*, got"):
        kernels.fp8_seesaw_on()
    with pytest.raises(InvalidArgument, match="KVPAGER_FP8_SEESAW must be 0"):
        flash_mla_with_kvcache(**a)
    assert calls == []


def test_fp8_kernel_switch(monkeypatch):
    """KVPAGER_FP8_KERNEL=0 turns the fused FP8 decode off (read per call), with the reason."""
    import kvpager.kernels as kernels
    monkeypatch.setenv("KVPAGER_FP8_KERNEL", "0")
    assert not kernels.supports_fp8_kvcache() and not kernels.supports_fp8_kvcache(16)
    assert "KVPAGER_FP8_KERNEL=0" in kernels.fp8_unavailable_reason()
    monkeypatch.setenv("KVPAGER_FP8_KERNEL", "1")
    if not kernels.available():
        assert not kernels.supports_fp8_kvcache(16) and kernels.fp8_unavailable_reason()
    elif hasattr(torch.ops.kvpager, "mla_decode_fp8"):
        monkeypatch.setenv("KVPAGER_FP8_SEESAW", "1")
        assert all(kernels.supports_fp8_kvcache(rows) for rows in (1, 16, 32, 33, 64, 128))
        monkeypatch.setenv("KVPAGER_FP8_SEESAW", "0")  # 64-row blocks off: more than 32 rows -> reference
        assert kernels.supports_fp8_kvcache(32) and not kernels.supports_fp8_kvcache(33)
