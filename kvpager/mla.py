"""FlashMLA's API: get_mla_metadata + flash_mla_with_kvcache. The one place an MLA call's
arguments are checked; then it runs the Hopper kernel (kvpager.kernels, a thin wrapper that checks
nothing) when it is built and the tensors are on an sm_90 GPU, else the PyTorch reference
(kvpager.reference)."""
from __future__ import annotations

import logging

import torch

from kvpager import fp8
from kvpager.errors import InvalidArgument, SequenceTooLong
from kvpager.reference import mla_decode_reference

log = logging.getLogger("kvpager")

NUM_SMS_CPU = 132  # plan the CPU metadata for an H100 SXM, so CPU and GPU schedules agree
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32: reference only
_fallback_logged = False
_fp8_fallback_logged = False
_fp8_rows_logged: set[int] = set()  # row counts already logged as sent to the reference (FP8)


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
                     num_heads_k: int, num_heads_q: int | None = None,
                     is_fp8_kvcache: bool = False,
                     topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV schedule for one decode step, shared by every layer.

    cache_seqlens: int32 [b]; num_heads_per_head_k = s_q * h_q // h_kv; num_heads_k = h_kv.
    The optional arguments are FlashMLA's: num_heads_q (h_q, checked against the other two when
    given), is_fp8_kvcache (the cache's format; the FP8 decode uses the same schedule) and topk
    (sparse attention: not supported, must be None).
    Returns (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [b + 1]) on
    cache_seqlens' device (kvpager.kernels.schedule documents the fields)."""
    _check_int32(cache_seqlens, "cache_seqlens", 1)
    for name, value in (("num_heads_per_head_k", num_heads_per_head_k),
                        ("num_heads_k", num_heads_k)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{name}={value!r} must be a positive int")
    _check_metadata_options(num_heads_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk)
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
                           causal: bool = False,
                           is_fp8_kvcache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent cache (FlashMLA semantics).

    q: [b, s_q, h_q, d] bf16/fp16 (fp32 on the reference); k_cache: [num_pages, 64, h_kv, d],
    q's dtype (V is its first head_dim_v columns); block_table: int32 [b, max_pages];
    cache_seqlens: int32 [b]; tile_scheduler_metadata / num_splits from get_mla_metadata.
    softmax_scale defaults to 1/sqrt(d). causal: query row i of s_q sees keys
    [0, seqlen - s_q + i]. Returns out [b, s_q, h_q, head_dim_v] in q's dtype and lse float32
    [b, h_q, s_q]; a row that sees no key gets out = 0, lse = +inf.
    is_fp8_kvcache: k_cache holds kvpager.fp8's 656-byte rows, uint8 (or float8_e4m3fn)
    [num_pages, page_size, h_kv, 656], any 16-byte-aligned page stride (e.g. 65-row pages);
    q is then bfloat16 (float32 on the reference) with d = 576.
    """
    _check_shapes(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                  num_splits)
    _check_fp8(q, k_cache, is_fp8_kvcache)
    kernels = _kernels_for(q.device)
    rows = q.shape[1] * q.shape[2] // k_cache.shape[2]  # query rows per kv head
    if kernels is not None and _kernel_shapes(kernels, q, k_cache, head_dim_v) \
            and (not is_fp8_kvcache or _fused_fp8(kernels, q.device, rows)):
        _check_parts(q, k_cache, tile_scheduler_metadata, (kernels.num_sms(q.device),))
        return kernels.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
            num_splits, softmax_scale=softmax_scale, causal=causal,
            **({"is_fp8_kvcache": True} if is_fp8_kvcache else {}))
    _check_parts(q, k_cache, tile_scheduler_metadata, _planner_sms(q.device))
    _check_values(k_cache, block_table, cache_seqlens)
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                softmax_scale=softmax_scale, causal=causal,
                                is_fp8_kvcache=is_fp8_kvcache)


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


def _check_parts(q: torch.Tensor, k_cache: torch.Tensor, metadata: torch.Tensor,
                 num_sms: tuple[int, ...]) -> None:
    """The schedule walks num_sm_parts(sms, rows, h_kv) parts of the metadata, so metadata planned
    for other heads (get_mla_metadata for h_q = 16 reused with h_q = 128) has another count.
    num_sms: the SM counts a valid plan may come from (the kernel: this GPU's; the reference:
    the CPU planner's too). Arithmetic only; head counts that plan the same parts get the same
    schedule, so they pass and are harmless."""
    from kvpager.kernels import schedule

    h_kv = k_cache.shape[2]
    rows = q.shape[1] * q.shape[2] // h_kv
    expected = sorted({schedule.num_sm_parts(n, rows, h_kv) for n in num_sms})
    if metadata.shape[0] not in expected or not metadata.is_contiguous():
        raise InvalidArgument(
            f"tile_scheduler_metadata has shape {tuple(metadata.shape)} but this call (s_q * h_q "
            f"// h_kv = {rows} rows, h_kv = {h_kv}) needs a contiguous [{expected[-1]}, 8]: it "
            f"was computed for other heads; compute it with get_mla_metadata(cache_seqlens, "
            f"{rows}, {h_kv})")


def _planner_sms(device: torch.device) -> tuple[int, ...]:
    """SM counts whose plans the reference accepts: the CPU planner's, and the GPU's own."""
    if device.type != "cuda":
        return (NUM_SMS_CPU,)
    return (NUM_SMS_CPU, torch.cuda.get_device_properties(device).multi_processor_count)


def _check_shapes(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits):
    """Dtypes, shapes, devices and strides: attribute reads only, no device sync."""
    for name, t in (("q", q), ("k_cache", k_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgument(f"{name} must be a 4-d tensor, got {got}")
        if t.dtype not in DTYPES and not (t is k_cache and _is_packed(t)):
            raise InvalidArgument(f"{name} has dtype {t.dtype}; use bfloat16 or float16 "
                                  f"(float32 on the reference path)")
        if t.stride(-1) != 1:
            raise InvalidArgument(f"{name}'s last dim must be contiguous (stride 1, got "
                                  f"{t.stride(-1)}); call .contiguous()")
    if k_cache.dtype != q.dtype and not _is_packed(k_cache):
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
    if d_k != d and not _is_packed(k_cache):
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


# ---- FP8 cache (kvpager.fp8's 656-byte rows) ----------------------------------------------------


def _is_packed(k_cache: torch.Tensor) -> bool:
    """An FP8 cache comes as uint8 bytes or as float8_e4m3fn viewing the same bytes."""
    return k_cache.dtype in fp8.PACKED_DTYPES


def _check_fp8(q: torch.Tensor, k_cache: torch.Tensor, is_fp8_kvcache: bool) -> None:
    """The is_fp8_kvcache flag against k_cache, then the FP8 cache's own rules: q bf16 (fp32 on
    the reference), 656-byte rows, 16-byte-aligned strides and base. Attribute reads only."""
    if not isinstance(is_fp8_kvcache, bool):
        raise InvalidArgument(f"is_fp8_kvcache={is_fp8_kvcache!r} must be a bool")
    if _is_packed(k_cache) != is_fp8_kvcache:
        if is_fp8_kvcache:
            raise InvalidArgument(
                f"is_fp8_kvcache=True but k_cache has dtype {k_cache.dtype}; an FP8 cache is uint8 "
                f"[num_pages, page_size, h_kv, {fp8.TOKEN_BYTES}] (CacheConfig(kv_cache_dtype="
                f"'fp8')): pass is_fp8_kvcache=False for this cache")
        raise InvalidArgument(
            f"k_cache has dtype {k_cache.dtype}, an FP8 cache of {fp8.TOKEN_BYTES}-byte rows; pass "
            f"is_fp8_kvcache=True")
    if not is_fp8_kvcache:
        return
    if q.dtype not in (torch.bfloat16, torch.float32):
        raise InvalidArgument(
            f"q has dtype {q.dtype}; with an FP8 cache q must be bfloat16 (float32 on the "
            f"reference path): the cache's RoPE part and the decode's MMAs are bf16")
    if k_cache.shape[-1] != fp8.TOKEN_BYTES:
        raise InvalidArgument(
            f"k_cache's last dim is {k_cache.shape[-1]}; an FP8 cache row is {fp8.TOKEN_BYTES} "
            f"bytes ({fp8.LATENT_DIM} e4m3 values, {fp8.NUM_GROUPS} float32 scales, "
            f"{fp8.ROPE_DIM} bf16 RoPE values): build it with kvpager.fp8.quantize or "
            f"CacheConfig(kv_cache_dtype='fp8')")
    if q.shape[-1] != fp8.HEAD_DIM:
        raise InvalidArgument(f"q's head dim is {q.shape[-1]}; an FP8 cache holds {fp8.HEAD_DIM}"
                              f"-wide rows, so q must be [b, s_q, h_q, {fp8.HEAD_DIM}]")
    for dim, name in enumerate(("page", "row", "head")):
        stride = k_cache.stride(dim)  # bytes: both packed dtypes are 1 byte wide
        if k_cache.shape[dim] > 1 and stride % fp8.ALIGN_BYTES:
            raise InvalidArgument(
                f"k_cache's {name} stride is {stride} bytes, not a multiple of {fp8.ALIGN_BYTES}; "
                f"the FP8 decode loads rows in 16-byte vectors: pad the {name}s to a multiple of "
                f"{fp8.ALIGN_BYTES} bytes or copy the cache with .contiguous()")
    if k_cache.data_ptr() % fp8.ALIGN_BYTES:
        raise InvalidArgument(f"k_cache starts at address {k_cache.data_ptr():#x}, not 16-byte "
                              f"aligned; slice whole pages only or copy it with .contiguous()")


def _fused_fp8(kernels, device: torch.device, rows: int) -> bool:
    """True when kvpager.kernels' fused FP8 decode covers this call: supports_fp8_kvcache(rows),
    rows = s_q * h_q // h_kv (any count; KVPAGER_FP8_KERNEL=0 switches it off, KVPAGER_FP8_SEESAW
    the 64-row blocks of more than 32 rows: kvpager.kernels.FP8_SEESAW_DEFAULT when unset).
    Otherwise the call runs on the reference, logged once per reason."""
    global _fp8_fallback_logged
    supports = getattr(kernels, "supports_fp8_kvcache", None)
    if supports is not None and supports(rows):
        return True
    if supports is not None and supports():  # the kernel exists, but not for this many rows
        if rows not in _fp8_rows_logged:
            log.warning("kvpager: FP8 cache with %d query rows per kv head (s_q * h_q / h_kv) on %s: "
                        "the fused FP8 decode of more than 32 rows is off (%s=1 turns it on), so these "
                        "calls run on the PyTorch reference (dequantizes the used pages per call; slow)",
                        rows, device, getattr(kernels, "FP8_SEESAW_ENV", "KVPAGER_FP8_SEESAW"))
            _fp8_rows_logged.add(rows)
        return False
    if not _fp8_fallback_logged:
        why = getattr(kernels, "fp8_unavailable_reason", lambda: "")() or \
            "kvpager.kernels has no fused FP8 decode yet"
        log.warning("kvpager: FP8 cache on %s: no fused FP8 decode (%s), so FP8 calls run on the "
                    "PyTorch reference (dequantizes the used pages per call; slow)", device, why)
        _fp8_fallback_logged = True
    return False


def _check_metadata_options(rows: int, h_kv: int, num_heads_q, is_fp8_kvcache, topk) -> None:
    """FlashMLA's optional get_mla_metadata arguments."""
    if topk is not None:
        raise InvalidArgument(f"topk={topk!r}: sparse (top-k) attention is not supported; "
                              f"kvpager's decode is dense: pass topk=None")
    if not isinstance(is_fp8_kvcache, bool):
        raise InvalidArgument(f"is_fp8_kvcache={is_fp8_kvcache!r} must be a bool")
    if num_heads_q is None:
        return
    if not isinstance(num_heads_q, int) or num_heads_q < 1 or num_heads_q % h_kv:
        raise InvalidArgument(f"num_heads_q={num_heads_q!r} must be a positive multiple of "
                              f"num_heads_k={h_kv}")
    if rows % (num_heads_q // h_kv):
        raise InvalidArgument(
            f"num_heads_per_head_k={rows} is not s_q * num_heads_q // num_heads_k for "
            f"num_heads_q={num_heads_q}, num_heads_k={h_kv}: it must be a multiple of "
            f"{num_heads_q // h_kv}")
