"""Fake (meta) implementations of the extension's ops, so torch.compile, FakeTensor tracing and
meta tensors see the right output shapes without running the kernels.

Registered on import when the ops exist: kvpager.kernels imports this module once `_C` has loaded
(the C++ side registers no Meta kernel of its own). The shapes must match what the
binding allocates: both outputs of each op are contiguous.
"""
from __future__ import annotations

import torch

from kvpager.kernels import schedule

# Device whose SM count cannot be asked (the meta device): assume an H100 SXM.
DEFAULT_NUM_SMS = 132


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        from kvpager.kernels import num_sms

        return num_sms(device)
    return DEFAULT_NUM_SMS


def get_mla_metadata_fake(
    cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [num_parts, 8] and int32 [batch + 1]. num_parts is a fixed function of the device
    (its SM count) and the head counts, exactly as the GPU op computes it, so it is static."""
    parts = schedule.num_sm_parts(_num_sms(cache_seqlens.device), num_heads_per_head_k, num_heads_k)
    meta = cache_seqlens.new_empty((parts, schedule.METADATA_FIELDS), dtype=torch.int32)
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return meta, splits


def mla_decode_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [b, s_q, h_q, head_dim_v] in q's dtype, lse float32 [b, h_q, s_q]; both contiguous."""
    b, s_q, h_q, _ = q.shape
    out = q.new_empty((b, s_q, h_q, head_dim_v))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return out, lse


# The fused FP8 decode's outputs have the bf16 decode's shapes (q is bf16, out bf16, lse float32).
mla_decode_fp8_fake = mla_decode_fake

_FAKES = (
    ("get_mla_metadata", get_mla_metadata_fake),
    ("mla_decode", mla_decode_fake),
    ("mla_decode_fp8", mla_decode_fp8_fake),
)


def register() -> None:
    """Register the fakes of the ops that exist (loaded from `_C`, or defined by a test; an
    extension built before mla_decode_fp8 lacks that op). An op that already has a Meta kernel
    (registered in C++) keeps it."""
    for op, impl in _FAKES:
        name = f"kvpager::{op}"
        if hasattr(torch.ops.kvpager, op) and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
            torch.library.register_fake(name)(impl)


# On import when the ops exist, so the module also works as the ops' pystub.
if hasattr(torch.ops.kvpager, "mla_decode") and hasattr(torch.ops.kvpager, "get_mla_metadata"):
    register()
