"""FlashMLA's API: get_mla_metadata + flash_mla_with_kvcache. The one place an MLA call's
arguments are checked; then it runs the Hopper kernel (kvpager.kernels, a thin wrapper that checks
nothing) when it is built and the tensors are on an sm_90 GPU, else the PyTorch reference
(kvpager.reference)."""
from __future__ import annotations

import logging

import torch

from kvpager.errors import InvalidArgument, SequenceTooLong
from kvpager.reference import mla_decode_reference

log = logging.getLogger("kvpager")

NUM_SMS_CPU = 132  # plan the CPU metadata for an H100 SXM, so CPU and GPU schedules agree
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32: reference only
_fallback_logged = False


def _kernels_for(device: torch.device):
    """The kvpager.kernels module if it can run on `device`, else None (logged once)."""
    global _fallback_logged
    try:
        import kvpager.kernels as kernels
    except ImportError as exc:
        kernels, reason = None, f"kvpager.kernels cannot be imported ({exc})"
    else:
        available = getattr(kernels, "available", lambda: False)
        supports = getattr(kernels, "supports_device", lambda _device: False)
        if available() and supports(device):
            return kernels
        reason = getattr(kernels, "unavailable_reason", lambda: "")() or \
            f"the kernel does not run on {device} (needs an sm_90 GPU)"
    if not _fallback_logged:
        log.info("kvpager: using the PyTorch reference MLA decode: %s", reason)
        _fallback_logged = True
    return None


def _kernel_shapes(kernels, q: torch.Tensor, k_cache: torch.Tensor, head_dim_v: int) -> bool:
    """True when the CUDA kernel computes this call: bf16/fp16, d = 576, dv = 512, 64-token
    pages. Anything else (an fp32 model on the GPU, other head dims) runs on the reference."""
    ok = (q.dtype in kernels.DTYPES and q.shape[-1] == kernels.HEAD_DIM
          and head_dim_v == kernels.HEAD_DIM_V and k_cache.shape[1] == kernels.PAGE_SIZE)
    if not ok:
        log.debug("kvpager: this call (dtype %s, d %d, dv %d, page %d) runs on the reference MLA",
                  q.dtype, q.shape[-1], head_dim_v, k_cache.shape[1])
    return ok


def get_mla_metadata(cache_seqlens: torch.Tensor, num_heads_per_head_k: int,
                     num_heads_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for one decode step, shared by every layer.

    cache_seqlens: int32 [b]; num_heads_per_head_k = s_q * h_q // h_kv; num_heads_k = h_kv.
    Returns (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [b + 1]) on
    cache_seqlens' device (kvpager.kernels.schedule documents the fields)."""
    _check_int32(cache_seqlens, "cache_seqlens", 1)
    for name, value in (("num_heads_per_head_k", num_heads_per_head_k),
                        ("num_heads_k", num_heads_k)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{name}={value!r} must be a positive int")
    kernels = _kernels_for(cache_seqlens.device)
    if kernels is not None:
        return kernels.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    from kvpager.kernels import schedule

    parts = schedule.num_sm_parts(NUM_SMS_CPU, num_heads_per_head_k, num_heads_k)
    return schedule.plan(cache_seqlens, parts)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int,
                           tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                           softmax_scale: float | None = None,
                           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent cache (FlashMLA semantics).

    q: [b, s_q, h_q, d] bf16/fp16 (fp32 on the reference); k_cache: [num_pages, 64, h_kv, d],
    q's dtype (V is its first head_dim_v columns); block_table: int32 [b, max_pages];
    cache_seqlens: int32 [b]; tile_scheduler_metadata / num_splits from get_mla_metadata.
    softmax_scale defaults to 1/sqrt(d). causal: query row i of s_q sees keys
    [0, seqlen - s_q + i]. Returns out [b, s_q, h_q, head_dim_v] in q's dtype and lse float32
    [b, h_q, s_q]; a row that sees no key gets out = 0, lse = +inf.
    """
    _check_shapes(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                  num_splits)
    kernels = _kernels_for(q.device)
    if kernels is not None and _kernel_shapes(kernels, q, k_cache, head_dim_v):
        _check_parts(kernels, q, k_cache, tile_scheduler_metadata)
        return kernels.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
            num_splits, softmax_scale=softmax_scale, causal=causal)
    _check_values(k_cache, block_table, cache_seqlens)
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                softmax_scale=softmax_scale, causal=causal)


def _check_int32(t: torch.Tensor, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise InvalidArgument(f"{name} has dtype {t.dtype}; it must be torch.int32")
    if t.dim() != dim:
        raise InvalidArgument(f"{name} has shape {tuple(t.shape)}; it must have {dim} dims")
    if dim == 1 and not t.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous (strides {t.stride()}); call "
                              f".contiguous()")


def _check_parts(kernels, q: torch.Tensor, k_cache: torch.Tensor, metadata: torch.Tensor) -> None:
    """The kernel walks exactly num_sm_parts(num_sms, rows, h_kv) parts of the metadata."""
    h_kv = k_cache.shape[2]
    rows = q.shape[1] * q.shape[2] // h_kv
    parts = kernels.schedule.num_sm_parts(kernels.num_sms(q.device), rows, h_kv)
    if metadata.shape[0] != parts or not metadata.is_contiguous():
        raise InvalidArgument(
            f"tile_scheduler_metadata has shape {tuple(metadata.shape)} but this call (s_q * h_q "
            f"// h_kv = {rows} rows, h_kv = {h_kv}) needs a contiguous [{parts}, 8] on this GPU: "
            f"compute it with get_mla_metadata(cache_seqlens, {rows}, {h_kv})")


def _check_shapes(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits):
    """Dtypes, shapes, devices and strides: attribute reads only, no device sync."""
    for name, t in (("q", q), ("k_cache", k_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgument(f"{name} must be a 4-d tensor, got {got}")
        if t.dtype not in DTYPES:
            raise InvalidArgument(f"{name} has dtype {t.dtype}; use bfloat16 or float16 "
                                  f"(float32 on the reference path)")
        if t.stride(-1) != 1:
            raise InvalidArgument(f"{name}'s last dim must be contiguous (stride 1, got "
                                  f"{t.stride(-1)}); call .contiguous()")
    if k_cache.dtype != q.dtype:
        raise InvalidArgument(f"k_cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    _check_int32(block_table, "block_table", 2)
    _check_int32(cache_seqlens, "cache_seqlens", 1)
    _check_int32(metadata, "tile_scheduler_metadata", 2)
    _check_int32(num_splits, "num_splits", 1)
    for name, t in (("k_cache", k_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens), ("tile_scheduler_metadata", metadata),
                    ("num_splits", num_splits)):
        if t.device != q.device:
            raise InvalidArgument(f"{name} is on {t.device} but q is on {q.device}; put every "
                                  f"tensor on one device")
    b, s_q, h_q, d = q.shape
    h_kv, d_k = k_cache.shape[2], k_cache.shape[3]
    if d_k != d:
        raise InvalidArgument(f"k_cache head dim {d_k} != q head dim {d}")
    if s_q < 1 or h_q < 1 or h_kv < 1:
        raise InvalidArgument(f"q {tuple(q.shape)} / k_cache {tuple(k_cache.shape)} have an "
                              f"empty s_q or head dim")
    if h_q % h_kv:
        raise InvalidArgument(f"h_q={h_q} is not a multiple of h_kv={h_kv}")
    if not isinstance(head_dim_v, int) or not 0 < head_dim_v <= d:
        raise InvalidArgument(f"head_dim_v={head_dim_v!r} must be an int in [1, d={d}]")
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise InvalidArgument(f"batch sizes differ: q has {b}, block_table "
                              f"{block_table.shape[0]}, cache_seqlens {cache_seqlens.shape[0]}")
    if block_table.stride(-1) != 1:
        raise InvalidArgument("block_table's last dim must be contiguous; call .contiguous()")
    if metadata.shape[1] != 8 or num_splits.shape[0] != b + 1:
        raise InvalidArgument(
            f"tile_scheduler_metadata {tuple(metadata.shape)} / num_splits "
            f"{tuple(num_splits.shape)} do not fit a batch of {b}; pass get_mla_metadata's result")


def _check_values(k_cache, block_table, cache_seqlens):
    """Reference path only (it reads the values anyway): lengths and the used table entries."""
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    if cache_seqlens.numel() == 0:
        return
    lens = cache_seqlens.to(torch.int64)
    if int(lens.min()) < 0:
        raise InvalidArgument(f"cache_seqlens has a negative length {int(lens.min())}")
    capacity = block_table.shape[1] * page_size
    if int(lens.max()) > capacity:
        b = int(lens.argmax())
        raise SequenceTooLong(f"cache_seqlens[{b}]={int(lens[b])} exceeds what its block_table "
                              f"row holds ({block_table.shape[1]} pages x {page_size} = "
                              f"{capacity} tokens)")
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] < \
        ((lens + page_size - 1) // page_size)[:, None]
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InvalidArgument(f"block_table holds page {bad} within a sequence's length; page ids "
                              f"must be in [0, {num_pages})")
