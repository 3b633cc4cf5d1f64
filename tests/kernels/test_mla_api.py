"""Argument checks of kvpager.mla and its dispatch on a machine without the kernel."""
import logging

import pytest
import torch

import kvpager.mla as mla
from kvpager import flash_mla_with_kvcache, get_mla_metadata
from kvpager.errors import InvalidArgument, SequenceTooLong
from kvpager.kernels import schedule


def args(b=2, s_q=1, h_q=4, h_kv=1, d=16, dv=8, pages=4, max_pages=2, dtype=torch.float32):
    q = torch.randn(b, s_q, h_q, d, dtype=dtype)
    k_cache = torch.randn(pages, 64, h_kv, d, dtype=dtype)
    block_table = torch.arange(b * max_pages, dtype=torch.int32).view(b, max_pages) % pages
    cache_seqlens = torch.full((b,), 70, dtype=torch.int32)
    meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    return dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                head_dim_v=dv, tile_scheduler_metadata=meta, num_splits=splits)


def test_metadata_on_cpu_is_the_schedule_plan():
    lens = torch.tensor([0, 100, 5000], dtype=torch.int32)
    meta, splits = get_mla_metadata(lens, 16, 1)
    want = schedule.plan(lens, schedule.num_sm_parts(132, 16, 1))
    assert torch.equal(meta, want[0]) and torch.equal(splits, want[1])
    assert meta.dtype == torch.int32 and splits.shape == (4,)


@pytest.mark.parametrize("lens,h,hk", [
    (torch.tensor([1], dtype=torch.int64), 16, 1),
    (torch.tensor([[1]], dtype=torch.int32), 16, 1),
    (torch.tensor([1], dtype=torch.int32), 0, 1),
    (torch.tensor([1], dtype=torch.int32), 16, 1.0),
])
def test_metadata_bad_args(lens, h, hk):
    with pytest.raises(InvalidArgument):
        get_mla_metadata(lens, h, hk)


def test_valid_call_and_default_scale():
    a = args()
    out, lse = flash_mla_with_kvcache(**a)
    out2, lse2 = flash_mla_with_kvcache(**a, softmax_scale=1 / 4.0)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)  # 1/sqrt(16)


def mutate(**changes):
    def f(a):
        for key, value in changes.items():
            a[key] = value(a[key]) if callable(value) else value
        return a
    return f


BAD = [
    ("q dtype", mutate(q=lambda t: t.double()), InvalidArgument, "dtype"),
    ("q 3d", mutate(q=lambda t: t[0]), InvalidArgument, "4-d"),
    ("k dtype differs", mutate(k_cache=lambda t: t.half()), InvalidArgument, "dtype"),
    ("q not contiguous", mutate(q=lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)),
     InvalidArgument, "contiguous"),
    ("head dims differ", mutate(k_cache=lambda t: t[..., :8].contiguous()), InvalidArgument,
     "head dim"),
    ("h_q % h_kv", mutate(k_cache=lambda t: t.expand(4, 64, 3, 16).contiguous()),
     InvalidArgument, "not a multiple"),
    ("dv > d", mutate(head_dim_v=17), InvalidArgument, "head_dim_v"),
    ("dv 0", mutate(head_dim_v=0), InvalidArgument, "head_dim_v"),
    ("table int64", mutate(block_table=lambda t: t.long()), InvalidArgument, "int32"),
    ("lens int64", mutate(cache_seqlens=lambda t: t.long()), InvalidArgument, "int32"),
    ("batch differs", mutate(block_table=lambda t: t[:1]), InvalidArgument, "batch"),
    ("table not contiguous", mutate(block_table=lambda t: t.t().contiguous().t()),
     InvalidArgument, "contiguous"),
    ("metadata shape", mutate(num_splits=lambda t: t[:-1]), InvalidArgument, "get_mla_metadata"),
    ("seqlen beyond table", mutate(cache_seqlens=lambda t: t + 60), SequenceTooLong, "exceeds what its block_table"),
    ("negative seqlen", mutate(cache_seqlens=lambda t: t - 100), InvalidArgument, "negative"),
    ("bad page id", mutate(block_table=lambda t: t + 10), InvalidArgument, "page"),
]


@pytest.mark.parametrize("name,change,error,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(name, change, error, needle):
    a = change(args())
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=needle):
        flash_mla_with_kvcache(**a)
    assert all(torch.equal(before[k], a[k]) for k in before)


def test_device_mismatch():
    a = args()
    a["block_table"] = a["block_table"].to("meta")
    with pytest.raises(InvalidArgument, match="device"):
        flash_mla_with_kvcache(**a)


def test_padding_beyond_length_is_never_read():
    a = args()
    a["cache_seqlens"] = torch.tensor([64, 0], dtype=torch.int32)
    a["block_table"][0, 1] = 2**31 - 1  # past the sequence: ignored
    a["block_table"][1, :] = -5
    out, lse = flash_mla_with_kvcache(**a)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all()


def test_falls_back_to_reference_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(mla, "_fallback_logged", False)
    with caplog.at_level(logging.INFO, logger="kvpager"):
        flash_mla_with_kvcache(**args())
        flash_mla_with_kvcache(**args())
    lines = [r for r in caplog.records if "reference" in r.getMessage()]
    assert len(lines) == 1


def _fake_kernels(monkeypatch, calls):
    import kvpager.kernels as kernels
    monkeypatch.setattr(kernels, "available", lambda: True, raising=False)
    monkeypatch.setattr(kernels, "supports_device", lambda device: True, raising=False)
    monkeypatch.setattr(kernels, "flash_mla_with_kvcache",
                        lambda *a, **k: calls.append("decode") or ("out", "lse"), raising=False)


def test_fp32_or_other_head_dims_stay_on_the_reference_with_a_kernel(monkeypatch):
    """An fp32 model (or d != 576) on a Hopper GPU must not reach the bf16/fp16-only kernel."""
    a, calls = args(), []
    _fake_kernels(monkeypatch, calls)
    out, lse = flash_mla_with_kvcache(**a)
    assert calls == [] and out.shape == (2, 1, 4, 8)


def test_dispatches_to_kernel_when_available(monkeypatch):
    import kvpager.kernels as kernels
    a = args(d=576, dv=512, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(kernels, "num_sms", lambda device: 132, raising=False)
    monkeypatch.setattr(kernels, "available", lambda: True, raising=False)
    monkeypatch.setattr(kernels, "supports_device", lambda device: True, raising=False)
    monkeypatch.setattr(kernels, "flash_mla_with_kvcache",
                        lambda *a, **k: calls.append("decode") or ("out", "lse"), raising=False)
    monkeypatch.setattr(kernels, "get_mla_metadata",
                        lambda *a: calls.append("meta") or ("m", "s"), raising=False)
    assert flash_mla_with_kvcache(**a) == ("out", "lse")
    assert get_mla_metadata(a["cache_seqlens"], 4, 1) == ("m", "s")
    assert calls == ["decode", "meta"]


def test_kernel_calls_need_this_gpus_metadata(monkeypatch):
    """The kernel walks num_sm_parts(num_sms, ...) parts: metadata planned for another GPU (or
    another head count) is refused before the kernel runs."""
    import kvpager.kernels as kernels
    a, calls = args(d=576, dv=512, dtype=torch.bfloat16), []  # metadata for 132 SMs
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setattr(kernels, "num_sms", lambda device: 78, raising=False)  # not an H100
    with pytest.raises(InvalidArgument, match="get_mla_metadata"):
        flash_mla_with_kvcache(**a)
    assert calls == []


def test_one_dimensional_int_tensors_must_be_contiguous():
    a = args()
    a["cache_seqlens"] = torch.stack([a["cache_seqlens"]] * 2, 1)[:, 0]
    with pytest.raises(InvalidArgument, match="contiguous"):
        flash_mla_with_kvcache(**a)
