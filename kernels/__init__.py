"""kvpager.kernels: the thin Python wrapper of the Hopper (sm_90a) MLA decode extension.

The extension `kvpager.kernels._C` registers three custom ops (torch.library, namespace `kvpager`):
`get_mla_metadata` (the split-KV tile scheduler, a small GPU kernel), `mla_decode` (decode +
combine) and `mla_decode_fp8` (the same on kvpager.fp8's 656-byte cache rows, dequantized in the
kernel, any s_q * h_q // h_kv). Their fake implementations live in `kvpager.kernels.fake`, so
torch.compile and CUDA graphs can hold them. This module is a thin wrapper: defaults and one op
call. The arguments are validated once, by `kvpager.mla` (which dispatches between this and the
PyTorch reference); the binding keeps only the checks memory safety needs, and its "kvpager: ..."
errors arrive here as InvalidArgument.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from kvpager import fp8  # noqa: F401  (FP8 layout constants, documented with the op)
from kvpager.errors import InvalidArgument, KernelUnavailable
from kvpager.kernels import schedule

HEAD_DIM = 576  # latent 512 + rope 64: the width of q and of a cache row
HEAD_DIM_V = 512  # V = the first 512 columns of the cache row
PAGE_SIZE = schedule.PAGE_SIZE
DTYPES = (torch.bfloat16, torch.float16)
_HOPPER = (9, 0)
FP8_KERNEL_ENV = "KVPAGER_FP8_KERNEL"  # "0": never use the fused FP8 decode (kvpager.mla: reference)
# "1": calls with more than 32 query rows per kv head run the 64-row blocks (the seesaw kernel with
# its FP8 converter warpgroup, new in s16); "0": they run on the reference (16/32-row blocks keep the
# fused decode). Read on every call; unset means FP8_SEESAW_DEFAULT.
FP8_SEESAW_ENV = "KVPAGER_FP8_SEESAW"
FP8_SEESAW_DEFAULT = "1"  # the switch's value when unset (on since the s16 H100 run: docs/fp8-cache.md)
FP8_MMA_SYNC_MAX_ROWS = 32  # rows a kv head of the 16/32-row FP8 kernels; more: 64-row blocks

try:
    _C = importlib.import_module("kvpager.kernels._C")  # loading it registers torch.ops.kvpager.*
except ImportError as exc:  # CPU builds, a checkout installed without the extension, a bad build
    _C = None
    if isinstance(exc, ModuleNotFoundError) and exc.name == "kvpager.kernels._C":
        _REASON = (
            "the CUDA extension kvpager.kernels._C is not built; on a Hopper machine with nvcc and "
            "the nvidia-cutlass package, reinstall with `KVPAGER_BUILD_CUDA=1 pip install "
            "--no-build-isolation -e .`"
        )
    else:
        _REASON = f"the CUDA extension kvpager.kernels._C is built but failed to load: {exc}"
else:
    _REASON = ""
    from kvpager.kernels import fake  # noqa: F401  (fake impls for the ops just loaded)

__all__ = [
    "available",
    "unavailable_reason",
    "supports_device",
    "supports_fp8_kvcache",
    "fp8_unavailable_reason",
    "fp8_seesaw_on",
    "num_sms",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
]


def available() -> bool:
    """True when the CUDA extension is built and loaded (says nothing about the GPU present)."""
    return _C is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _REASON


def supports_device(device: torch.device | str | int | None) -> bool:
    """True when `device` is a CUDA device of compute capability 9.0 (H100 / H200)."""
    if device is None:
        return False
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(_index(device)) == _HOPPER


def fp8_unavailable_reason() -> str:
    """Why the fused FP8 decode cannot be used ('' when it can): the extension is missing, was built
    without it, or KVPAGER_FP8_KERNEL=0 switches it off (read on every call)."""
    if os.environ.get(FP8_KERNEL_ENV, "1") == "0":
        return f"the fused FP8 decode is switched off ({FP8_KERNEL_ENV}=0)"
    if _C is None:
        return _REASON
    if not hasattr(torch.ops.kvpager, "mla_decode_fp8"):
        return ("the CUDA extension was built without the fused FP8 decode (torch.ops.kvpager."
                "mla_decode_fp8); rebuild it with `KVPAGER_BUILD_CUDA=1 pip install --no-build-isolation -e .`")
    return ""


def supports_fp8_kvcache(num_heads_per_head_k: int | None = None) -> bool:
    """True when the fused FP8 decode is available (fp8_unavailable_reason() == '') and covers a
    call with `num_heads_per_head_k` = s_q * h_q // h_kv query rows per kv head: any count >= 1
    (1-32 on the 16/32-row kernels; more on the 64-row blocks when KVPAGER_FP8_SEESAW, read on every
    call, is "1" - unset: FP8_SEESAW_DEFAULT). None: whether it covers any. kvpager.mla runs what it
    does not cover on the reference. Says nothing about the device (see supports_device)."""
    if fp8_unavailable_reason():
        return False
    if num_heads_per_head_k is None:
        return True
    if num_heads_per_head_k > FP8_MMA_SYNC_MAX_ROWS:
        return fp8_seesaw_on()
    return num_heads_per_head_k >= 1


def fp8_seesaw_on() -> bool:
    """KVPAGER_FP8_SEESAW, read on every call (unset: FP8_SEESAW_DEFAULT): "1" runs FP8 calls of
    more than 32 query rows per kv head in the 64-row blocks, "0" on the reference. Any other value
    raises InvalidArgument naming the variable and its choices."""
    value = os.environ.get(FP8_SEESAW_ENV, FP8_SEESAW_DEFAULT)
    if value not in ("0", "1"):
        raise InvalidArgument(f"{FP8_SEESAW_ENV} must be 0 (FP8 calls of more than 32 query rows per kv head "
                              f"on the reference) or 1 (in the kernel), got {value!r}")
    return value == "1"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on the H100 SXM); the metadata kernel reads
    the same number, so num_parts = schedule.num_sm_parts(num_sms(device), rows, h_kv)."""
    return _sm_count(_index(device))


def get_mla_metadata(
    cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for one decode step, computed on the GPU (one small kernel, no host sync).

    cache_seqlens: int32 [batch] on an sm_90 GPU. num_heads_per_head_k: query rows per kv head,
    s_q * h_q // h_kv (not h_q // h_kv when s_q > 1). num_heads_k: h_kv.
    Returns (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [batch + 1]) with
    num_parts = schedule.num_sm_parts(num_sms, num_heads_per_head_k, num_heads_k); the format is
    kernels/schedule.py's. Compute once per step and pass to every layer's call.
    """
    if torch.compiler.is_compiling():
        return torch.ops.kvpager.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    _require_extension()
    return _typed(torch.ops.kvpager.get_mla_metadata, cache_seqlens, num_heads_per_head_k, num_heads_k)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent cache (FlashMLA's API and semantics), on sm_90.

    q: [b, s_q, h_q, 576] bf16 | fp16, last dim contiguous.
    k_cache: [num_pages, 64, h_kv, 576], q's dtype, last dim contiguous; V is its first 512 columns.
    block_table: int32 [b, max_pages], last dim contiguous; entries past a sequence's last page
      are never read (any value, huge ids included).
    cache_seqlens: int32 [b], contiguous; 0 is allowed (out = 0, lse = +inf).
    head_dim_v: 512.
    tile_scheduler_metadata, num_splits: from `get_mla_metadata(cache_seqlens, s_q * h_q // h_kv,
      h_kv)` on this device (computed once per step).
    softmax_scale: defaults to 576 ** -0.5. causal: query i of s_q sees keys < s_k - s_q + i + 1.
    Returns (out [b, s_q, h_q, 512] in q's dtype, lse float32 [b, h_q, s_q]), natural-log
    log-sum-exp of the scaled scores. All tensors on one CUDA device; runs on the current stream,
    allocates only out, lse and the split workspace (CUDA-graph capturable). Call it through
    kvpager.mla, which checks the arguments; this wrapper does not.
    is_fp8_kvcache: k_cache holds kvpager.fp8's 656-byte rows, uint8 (or float8_e4m3fn)
      [num_pages, 64, h_kv, 656] with 16-byte-aligned strides (65-row pages work); q and out are
      bf16. Up to 32 rows a kv head (s_q * h_q // h_kv) the kernel dequantizes in registers; with
      more (64-row blocks) a converter warpgroup dequantizes each 64 x 64 tile in shared memory
      beside the seesaw kernel's MMAs. Both multiply in bf16: no dequantized copy of the cache.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    args = (q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            float(softmax_scale), bool(causal))
    if not torch.compiler.is_compiling():
        _require_extension()
    op = torch.ops.kvpager.mla_decode_fp8 if is_fp8_kvcache else torch.ops.kvpager.mla_decode
    if torch.compiler.is_compiling():
        return op(*args)
    return _typed(op, *args)


def _require_extension() -> None:
    if _C is None:
        raise KernelUnavailable(_REASON)


def _typed(op: Callable, *args):
    """Run `op`; the binding's checks raise RuntimeError("kvpager: ...") -> InvalidArgument."""
    try:
        return op(*args)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).lstrip().split("\n", 1)[0]
        if "kvpager:" in first_line:
            raise InvalidArgument(first_line) from exc
        raise


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
