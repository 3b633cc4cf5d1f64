"""kvpager.kernels on a machine without the extension or a GPU: it imports, says why it is
unavailable, rejects bad arguments with typed errors before touching CUDA, and its fake ops and
checks hold up under FakeTensor tracing and torch.compile."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from kvpager import kernels
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


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0].float()), "bfloat16 or float16"),
        (lambda a: a.__setitem__(1, a[1].half()), "must match"),
        (lambda a: a.__setitem__(0, a[0][..., :512]), "d = 576"),
        (lambda a: a.__setitem__(0, a[0][0]), r"q must be \[b"),
        (lambda a: a.__setitem__(1, a[1][:, :32]), "expected"),
        (lambda a: a.__setitem__(4, 256), "head_dim_v=256"),
        (lambda a: a.__setitem__(2, a[2].long()), "block_table has dtype"),
        (lambda a: a.__setitem__(2, a[2][:1]), "block_table must be"),
        (lambda a: a.__setitem__(3, a[3].long()), "cache_seqlens has dtype"),
        (lambda a: a.__setitem__(3, a[3][:1]), "batch 2"),
        (lambda a: a.__setitem__(5, a[5][:, :4]), "tile_scheduler_metadata must be"),
        (lambda a: a.__setitem__(6, a[6][:2]), "num_splits must be"),
        (lambda a: a.__setitem__(6, a[6].long()), "int32 outputs"),
        (lambda a: a.__setitem__(0, torch.empty(2, 1, 1152, 16, dtype=torch.bfloat16,
                                                device="meta").transpose(2, 3)[:, :, :, ::2]),
         "contiguous last dim"),
    ],
)
def test_bad_arguments_raise_invalid_argument(change, match) -> None:
    a = args()
    change(a)
    with pytest.raises(InvalidArgument, match=match):
        kernels.flash_mla_with_kvcache(*a)


def fp8_args(**kw):
    """args() with an FP8 cache: uint8 [pages, 64, h_kv, 656] (meta tensors)."""
    a = args(**kw)
    a[1] = torch.empty(*a[1].shape[:3], 656, dtype=torch.uint8, device=a[1].device)
    return a


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0].half()), "bfloat16 q"),
        (lambda a: a.__setitem__(1, a[1].bfloat16()), "an FP8 cache is uint8"),
        (lambda a: a.__setitem__(1, a[1][..., :576]), r"expected \[num_pages, 64, h_kv, 656\]"),
        (lambda a: a.__setitem__(1, torch.empty(8, 64, 1, 664, dtype=torch.uint8, device="meta")[..., :656]),
         "row stride is 664 bytes"),
    ],
)
def test_bad_fp8_arguments_raise_invalid_argument(change, match) -> None:
    a = fp8_args()
    kernels._check_decode_shapes(*a, True)  # the unchanged arguments pass
    change(a)
    with pytest.raises(InvalidArgument, match=match):
        kernels.flash_mla_with_kvcache(*a, is_fp8_kvcache=True)


def test_heads_must_divide() -> None:
    with pytest.raises(InvalidArgument, match="h_q=3 is not a multiple of h_kv=2"):
        kernels.flash_mla_with_kvcache(*args(h_q=3, h_kv=2))


def test_non_cuda_tensors_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="CUDA tensors only"):
        kernels.flash_mla_with_kvcache(*args(device="cpu"))
    with pytest.raises(InvalidArgument, match="CUDA tensors only"):
        kernels.get_mla_metadata(torch.zeros(3, dtype=torch.int32), 16, 1)
    with pytest.raises(InvalidArgument, match="int32"):
        kernels.get_mla_metadata(torch.zeros(3, dtype=torch.int64), 16, 1)
    with pytest.raises(InvalidArgument, match="num_heads_k=0"):
        kernels.get_mla_metadata(torch.zeros(3, dtype=torch.int32), 16, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_device_without_cuda_is_unavailable() -> None:
    with pytest.raises(KernelUnavailable):
        kernels._check_kernel_device(torch.device("cuda", 0))


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


def test_shape_checks_trace_under_torch_compile() -> None:
    check = torch.compile(kernels._check_decode_shapes, fullgraph=True, backend="eager")
    check(*args(device="cpu"))
    a = args(device="cpu")
    a[0] = a[0].float()
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
