"""kvpager.kernels on a machine without the extension or a GPU: it imports, says why it is
unavailable, turns binding errors into typed ones, and its fake ops, the thin wrapper and
kvpager.mla's checks hold up under FakeTensor tracing and torch.compile."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from kvpager import kernels, mla
from kvpager.errors import InvalidArgument, KernelUnavailable, KVPagerError
from kvpager.kernels import fake, schedule


def args(b=2, s_q=1, h_q=16, h_kv=1, d=576, dtype=torch.bfloat16, device="meta", pages=4):
    """A valid argument tuple for flash_mla_with_kvcache (meta tensors: shapes only)."""
    q = torch.empty(b, s_q, h_q, d, dtype=dtype, device=device)
    k_cache = torch.empty(pages * b, 64, h_kv, d, dtype=dtype, device=device)
    block_table = torch.empty(b, pages, dtype=torch.int32, device=device)
    seqlens = torch.empty(b, dtype=torch.int32, device=device)
    meta = torch.empty(132, 8, dtype=torch.int32, device=device)
    splits = torch.empty(b + 1, dtype=torch.int32, device=device)
    return [q, k_cache, block_table, seqlens, 512, meta, splits]


def test_unavailable_here_with_a_reason() -> None:
    if kernels.available():
        pytest.skip("the extension is built here")
    assert kernels.unavailable_reason()
    assert "KVPAGER_BUILD_CUDA=1" in kernels.unavailable_reason()


def test_supports_device_is_false_off_hopper() -> None:
    assert not kernels.supports_device("cpu")
    assert not kernels.supports_device(torch.device("meta"))
    assert not kernels.supports_device(None)
    if not torch.cuda.is_available():
        assert not kernels.supports_device("cuda")
        assert not kernels.supports_device(0)


@pytest.mark.skipif(kernels.available(), reason="the extension is built here")
def test_calls_without_the_extension_say_why() -> None:
    with pytest.raises(KernelUnavailable, match="KVPAGER_BUILD_CUDA=1"):
        kernels.flash_mla_with_kvcache(*args(device="cpu"))
    with pytest.raises(KernelUnavailable):
        kernels.get_mla_metadata(torch.zeros(3, dtype=torch.int32), 16, 1)


def test_binding_errors_become_invalid_argument() -> None:
    def op(msg):
        raise RuntimeError(msg)

    with pytest.raises(InvalidArgument, match="^kvpager: q must be bf16") as info:
        kernels._typed(op, "kvpager: q must be bf16 (got float)\nException raised from ...")
    assert isinstance(info.value, KVPagerError) and isinstance(info.value, ValueError)
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        kernels._typed(op, "CUDA error: an illegal memory access was encountered")
    assert not isinstance(info.value, KVPagerError)


def test_fake_shapes() -> None:
    seqlens = torch.empty(7, dtype=torch.int32, device="meta")
    meta, splits = fake.get_mla_metadata_fake(seqlens, 2 * 128, 1)
    assert meta.shape == (schedule.num_sm_parts(fake.DEFAULT_NUM_SMS, 256, 1), 8)
    assert meta.dtype == splits.dtype == torch.int32 and splits.shape == (8,)
    q = torch.empty(7, 2, 128, 576, dtype=torch.float16, device="meta")
    a = args(b=7, s_q=2, h_q=128, dtype=torch.float16)
    out, lse = fake.mla_decode_fake(*a, 0.04, True)
    assert out.shape == (7, 2, 128, 512) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (7, 128, 2) and lse.dtype == torch.float32 and lse.is_contiguous()


def test_mla_checks_trace_under_torch_compile() -> None:
    """kvpager.mla's checks (the only ones) are attribute reads: they trace without breaks."""
    check = torch.compile(mla._check_shapes, fullgraph=True, backend="eager")
    check(*args(device="cpu"))
    a = args(device="cpu")
    a[0] = a[0].double()
    # fullgraph: dynamo reports the raise as unsupported, quoting our message.
    with pytest.raises(Exception, match="bfloat16 or float16"):
        check(*a)


# The extension's op schemas (bindings.cpp), defined here with CPU stand-ins so the fake impls
# and the wrapper's compiled path run without CUDA. In a subprocess: the ops stay out of this one.
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    from kvpager.kernels import schedule
    lib = torch.library.Library("kvpager", "DEF")
    lib.define("get_mla_metadata(Tensor cache_seqlens, int num_heads_per_head_k, int num_heads_k)"
               " -> (Tensor, Tensor)")
    lib.define("mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
               "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, "
               "float softmax_scale, bool causal) -> (Tensor, Tensor)")
    lib.impl("get_mla_metadata", lambda s, rows, h_kv: schedule.plan(
        s, schedule.num_sm_parts(132, rows, h_kv)), "CPU")
    def decode(q, k, bt, s, dv, meta, splits, scale, causal):
        b, s_q, h_q, _ = q.shape
        return q[..., :dv] * scale, torch.zeros(b, h_q, s_q)
    lib.impl("mla_decode", decode, "CPU")
    lib.define("mla_decode_fp8(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
               "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, "
               "float softmax_scale, bool causal) -> (Tensor, Tensor)")
    lib.impl("mla_decode_fp8", decode, "CPU")
    import kvpager.kernels.fake  # registers the fake impls, as kvpager.kernels does after _C
    from kvpager import fp8, kernels

    def step(q, k_cache, block_table, seqlens):
        meta, splits = kernels.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
        out, lse = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits,
                                                  causal=True)
        return out * 2, lse

    q = torch.randn(3, 2, 16, 576, dtype=torch.bfloat16)
    k = torch.randn(6, 64, 1, 576, dtype=torch.bfloat16)
    bt = torch.arange(6, dtype=torch.int32).view(3, 2)
    s = torch.tensor([0, 70, 128], dtype=torch.int32)
    out, lse = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, bt, s)
    assert out.shape == (3, 2, 16, 512) and lse.shape == (3, 16, 2), (out.shape, lse.shape)
    torch.testing.assert_close(out, q[..., :512] * 576 ** -0.5 * 2)

    def step_fp8(q, k_cache, block_table, seqlens):
        meta, splits = kernels.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
        return kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits,
                                              is_fp8_kvcache=True)

    packed = fp8.quantize(k)
    out, lse = torch.compile(step_fp8, fullgraph=True, backend="aot_eager")(q, packed, bt, s)
    assert out.shape == (3, 2, 16, 512) and out.dtype == torch.bfloat16 and lse.shape == (3, 16, 2)
    print("ok")
    """
)


def test_fake_impls_and_wrapper_under_torch_compile(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
