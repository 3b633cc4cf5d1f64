"""PagePool: the latent KV cache of every layer in one tensor, viewed per layer in the kernel's
k_cache layout."""
from __future__ import annotations

import torch

from kvpager import fp8
from kvpager.config import CacheConfig
from kvpager.errors import InvalidArgument


class PagePool:
    """`kv`: one allocation [num_layers, num_pages + 1, page_size, h_kv, row_width] on
    config.device, zero-initialised. Slot `page * page_size + offset` is token `offset` of
    `page`. Page 0 is the reserved null page (allocator.NULL_PAGE): pages 1..num_pages hold
    requests' tokens, so `num_pages` and `capacity_tokens` count those only. A row is head_dim
    values of config.dtype, or with kv_cache_dtype='fp8' the 656 uint8 bytes of kvpager.fp8's
    layout (row_width = 656; an all-zero row dequantizes to zeros).
    """

    def __init__(self, config: CacheConfig) -> None:
        if not isinstance(config, CacheConfig):
            raise InvalidArgument(f"PagePool takes a CacheConfig, got {type(config).__name__}")
        self.config = config
        self.num_layers = config.num_layers
        self.num_pages = config.resolved_num_pages
        self.page_size = config.page_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.row_width = config.row_width
        self.is_fp8 = config.kv_cache_dtype == "fp8"
        self.kv = torch.zeros(
            self.num_layers, config.pool_pages, self.page_size, self.num_kv_heads, self.row_width,
            dtype=config.cache_dtype, device=config.torch_device)
        # One flat [slots, h_kv, row] view per layer for the scatter in write(); views, no copy.
        self._slots = [self.kv[i].view(-1, self.num_kv_heads, self.row_width)
                       for i in range(self.num_layers)]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def bytes_per_token(self) -> int:
        return self.config.bytes_per_token

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def bytes_used(self, num_used_pages: int) -> int:
        """Bytes held by `num_used_pages` pages across all layers."""
        return num_used_pages * self.config.bytes_per_page

    def layer(self, i: int) -> torch.Tensor:
        """k_cache of layer i: [num_pages + 1, page_size, h_kv, row_width], a contiguous view of
        `kv` (uint8 656-byte rows with kv_cache_dtype='fp8': pass is_fp8_kvcache=True to the MLA)."""
        self._check_layer(i)
        return self.kv[i]

    def write(self, layer: int, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
        """Scatter `latent` [n, h_kv, head_dim] (or [n, head_dim] when h_kv == 1) into the slots
        `slot_mapping` int64 [n] of `layer`. One index_copy_; a CPU slot_mapping for a GPU pool
        costs one small H2D copy. Slots are range-checked when slot_mapping is on the CPU.
        With kv_cache_dtype='fp8' the rows are quantized first (kvpager.fp8.quantize, vectorised,
        on the pool's device; one [n, h_kv, 656] temporary). A CPU latent is checked for ±inf/NaN
        (rejected, nothing written); a GPU one is not, to keep the step free of host syncs."""
        self._check_layer(layer)
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64 \
                or slot_mapping.dim() != 1:
            raise InvalidArgument(f"slot_mapping must be an int64 [n] tensor, got "
                                  f"{_describe(slot_mapping)}; use Sequence.append's result")
        n = slot_mapping.numel()
        if not isinstance(latent, torch.Tensor):
            raise InvalidArgument(f"latent must be a tensor [n, h_kv, head_dim], got "
                                  f"{type(latent).__name__}")
        if latent.dim() == 2 and self.num_kv_heads == 1:
            latent = latent.unsqueeze(1)
        if tuple(latent.shape) != (n, self.num_kv_heads, self.head_dim):
            raise InvalidArgument(
                f"latent has shape {tuple(latent.shape)}, expected ({n}, {self.num_kv_heads}, "
                f"{self.head_dim}) (or ({n}, {self.head_dim}) when num_kv_heads == 1)")
        if latent.device != self.device:
            raise InvalidArgument(f"latent is on {latent.device} but the pool is on {self.device}")
        if n == 0:
            return
        if slot_mapping.device.type == "cpu":
            lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
            num_slots = self.kv.shape[1] * self.page_size
            if lo < 0 or hi >= num_slots:
                bad = lo if lo < 0 else hi
                raise InvalidArgument(f"slot {bad} is outside [0, {num_slots}) "
                                      f"({self.num_pages} pages + the null page, x {self.page_size})")
            slot_mapping = slot_mapping.to(self.device, non_blocking=True)
        elif slot_mapping.device != self.device:
            raise InvalidArgument(f"slot_mapping is on {slot_mapping.device}; put it on the CPU "
                                  f"or on the pool's device {self.device}")
        if self.is_fp8:
            rows = fp8.quantize(latent, check_finite=latent.device.type == "cpu")
        else:
            rows = latent.to(self.kv.dtype)
        self._slots[layer].index_copy_(0, slot_mapping, rows)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages src[i] -> dst[i] in every layer (copy-on-write). One gather + one scatter;
        src and dst may overlap (the gather reads everything before the scatter writes)."""
        if len(src) != len(dst):
            raise InvalidArgument(f"copy_pages got {len(src)} sources and {len(dst)} destinations")
        if not src:
            return
        for page in (*src, *dst):
            if not 0 <= page <= self.num_pages:
                raise InvalidArgument(f"page {page} is outside [0, {self.num_pages}]")
        if len(set(dst)) != len(dst):
            raise InvalidArgument(f"copy_pages destinations {dst} repeat a page")
        src_t = torch.tensor(src, dtype=torch.int64, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.int64, device=self.device)
        self.kv.index_copy_(1, dst_t, self.kv.index_select(1, src_t))

    def _check_layer(self, i: int) -> None:
        if type(i) is not int and (isinstance(i, bool) or not hasattr(i, "__index__")) \
                or not 0 <= i < self.num_layers:
            raise InvalidArgument(f"layer {i!r} is not an int in [0, {self.num_layers})")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__
