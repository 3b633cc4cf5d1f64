"""FlashMLA's API: get_mla_metadata + flash_mla_with_kvcache. Checks the arguments, then runs the
Hopper kernel (kvpager.kernels) when it is built and the tensors are on an sm_90 GPU, else the
PyTorch reference (kvpager.reference)."""
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


def _kernel_shapes(q: torch.Tensor, k_cache: torch.Tensor, head_dim_v: int) -> bool:
    """True when the CUDA kernel computes this call: bf16/fp16, d = 576, dv = 512, 64-token
    pages. Anything else (an fp32 model on the GPU, other head dims) runs on the reference."""
    ok = (q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == 576
          and head_dim_v == 512 and k_cache.shape[1] == 64)
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
    if kernels is not None and _kernel_shapes(q, k_cache, head_dim_v):
        return kernels.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
            num_splits, softmax_scale=softmax_scale, causal=causal)
    _check_metadata_parts(q, k_cache, tile_scheduler_metadata)
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


def _check_metadata_parts(q, k_cache, metadata):
    """Metadata planned for other heads (e.g. get_mla_metadata for h_q = 16 reused with
    h_q = 128) has another number of parts, one per SM group of the plan: compare the row count
    with what get_mla_metadata would plan for this q. Arithmetic only. Head counts that plan
    the same parts get the same schedule, so they pass and are harmless."""
    from kvpager.kernels import schedule

    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    rows = s_q * h_q // h_kv
    sms = [NUM_SMS_CPU]
    if q.device.type == "cuda":
        sms.append(torch.cuda.get_device_properties(q.device).multi_processor_count)
    expected = {schedule.num_sm_parts(n, rows, h_kv) for n in sms}
    if metadata.shape[0] not in expected:
        raise InvalidArgument(
            f"tile_scheduler_metadata has {metadata.shape[0]} parts but this call (s_q={s_q}, "
            f"h_q={h_q}, h_kv={h_kv}) plans {min(expected)}: it was computed for other heads; call "
            f"get_mla_metadata(cache_seqlens, s_q * h_q // h_kv = {rows}, h_kv = {h_kv})")


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
