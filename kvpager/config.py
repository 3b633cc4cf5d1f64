"""CacheConfig: the one description of a paged latent KV cache, validated once at the boundary.

Every validation failure raises `ConfigError` (a `KVPagerError` and a `ValueError`) whose message
names the field, the bad value and what to change.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from kvpager import fp8
from kvpager.errors import ConfigError
from kvpager.validation import describe

KERNEL_PAGE_SIZE = 64  # tokens per page of the Hopper kernel's k_cache (FlashMLA's block size)

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_FP8_NAMES = ("fp8", "fp8_e4m3", "float8_e4m3fn")  # kv_cache_dtype spellings of the 656-byte row


class CacheConfig(BaseModel):
    """Shape, dtype, device and size of one paged latent KV cache (frozen).

    page_size: tokens per page; must be 64 (the kernel's page) unless allow_any_page_size=True,
        which is for the PyTorch reference path only.
    num_layers: layers, each with its own [num_pages, page_size, num_kv_heads, head_dim] view.
    num_kv_heads: h_kv, latent heads per token (1 for DeepSeek MLA).
    head_dim / head_dim_v: d = 576 (512 latent + 64 RoPE) and dv = 512 (the first dv columns of
        K are V).
    dtype: "bfloat16" | "float16" (kernel) | "float32" (reference only); torch dtypes accepted.
    device: where the pool lives ("cpu", "cuda", "cuda:1", torch.device accepted).
    kv_cache_dtype: "auto" stores rows in `dtype`; "fp8" stores DeepSeek's 656-byte FP8 row
        (kvpager.fp8: 512 e4m3 latent values, 4 float32 scales, 64 bf16 RoPE values) in uint8
        pages [.., h_kv, 656]; `dtype` stays the model's (q's) dtype: bfloat16 (kernel) or
        float32 (CPU reference), with head_dim 576 and head_dim_v 512.
    num_pages | memory_budget_bytes: exactly one. num_pages counts the pages requests can hold;
        the pool has one more, the reserved null page 0 (see allocator.NULL_PAGE), so it takes
        (num_pages + 1) * bytes_per_page. With a budget, the null page is paid from it:
        num_pages = budget // bytes_per_page - 1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    page_size: int = KERNEL_PAGE_SIZE
    num_layers: int
    num_kv_heads: int = 1
    head_dim: int = 576
    head_dim_v: int = 512
    dtype: str = "bfloat16"
    device: str = "cpu"
    num_pages: int | None = None
    memory_budget_bytes: int | None = None
    allow_any_page_size: bool = False
    kv_cache_dtype: str = "auto"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str:
        if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
            return _DTYPE_NAMES[value]
        if isinstance(value, str) and value.lower() in _DTYPES:
            return _DTYPE_NAMES[_DTYPES[value.lower()]]
        raise ValueError(f"dtype={value!r} is not supported; use 'bfloat16' or 'float16' "
                         f"(kernel) or 'float32' (CPU reference)")

    @field_validator("kv_cache_dtype", mode="before")
    @classmethod
    def _kv_cache_dtype(cls, value: Any) -> str:
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            return "auto"
        if value == torch.float8_e4m3fn or (isinstance(value, str) and value.lower() in _FP8_NAMES):
            return "fp8"
        raise ValueError(f"kv_cache_dtype={value!r} is not supported; use 'auto' (rows in dtype) "
                         f"or 'fp8' ({fp8.TOKEN_BYTES}-byte FP8 rows)")

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={value!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'") from None
        _check_device_present(device)
        return str(device)

    @field_validator("num_layers", "num_kv_heads", "head_dim", "head_dim_v")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name}={value} must be >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CacheConfig":
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1 (use {KERNEL_PAGE_SIZE})")
        if self.page_size != KERNEL_PAGE_SIZE and not self.allow_any_page_size:
            raise ValueError(
                f"page_size={self.page_size}: the MLA kernel reads pages of exactly "
                f"{KERNEL_PAGE_SIZE} tokens; use page_size={KERNEL_PAGE_SIZE}, or set "
                f"allow_any_page_size=True to run on the PyTorch reference path only")
        if self.head_dim_v > self.head_dim:
            raise ValueError(f"head_dim_v={self.head_dim_v} > head_dim={self.head_dim}: V is the "
                             f"first head_dim_v columns of K; use head_dim_v <= head_dim")
        if (self.num_pages is None) == (self.memory_budget_bytes is None):
            raise ValueError("give exactly one of num_pages or memory_budget_bytes (got "
                             f"num_pages={self.num_pages}, memory_budget_bytes={self.memory_budget_bytes})")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1")
        if self.kv_cache_dtype == "fp8":
            self._check_fp8()
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 2 * self.bytes_per_page:
            raise ValueError(
                f"memory_budget_bytes={self.memory_budget_bytes} holds no usable page of "
                f"{self.bytes_per_page} bytes besides the reserved null page; raise it to at "
                f"least {2 * self.bytes_per_page}")
        return self

    def _check_fp8(self) -> None:
        if (self.head_dim, self.head_dim_v) != (fp8.HEAD_DIM, fp8.LATENT_DIM):
            raise ValueError(
                f"kv_cache_dtype='fp8' packs rows of {fp8.LATENT_DIM} latent + {fp8.ROPE_DIM} RoPE "
                f"values; use head_dim={fp8.HEAD_DIM}, head_dim_v={fp8.LATENT_DIM} (got "
                f"{self.head_dim}, {self.head_dim_v}) or kv_cache_dtype='auto'")
        if self.dtype == "float16":
            raise ValueError("kv_cache_dtype='fp8' serves bfloat16 queries (its RoPE part is "
                             "bf16); use dtype='bfloat16' (or 'float32' on the CPU reference)")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model's dtype (q and out of the MLA call); the pool's too unless fp8."""
        return _DTYPES[self.dtype]

    @property
    def cache_dtype(self) -> torch.dtype:
        """The pool tensor's dtype: uint8 for FP8 rows, else torch_dtype."""
        return torch.uint8 if self.kv_cache_dtype == "fp8" else self.torch_dtype

    @property
    def row_width(self) -> int:
        """Last dim of the pool tensor: 656 bytes for FP8 rows, else head_dim elements."""
        return fp8.TOKEN_BYTES if self.kv_cache_dtype == "fp8" else self.head_dim

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (num_layers * h_kv * row bytes): a row is
        head_dim * itemsize, or 656 with kv_cache_dtype='fp8'."""
        itemsize = torch.empty((), dtype=self.cache_dtype).element_size()
        return self.num_layers * self.num_kv_heads * self.row_width * itemsize

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size

    @property
    def resolved_num_pages(self) -> int:
        """Pages requests can hold: num_pages, or the whole pages memory_budget_bytes holds minus
        the null page. The pool tensor has pool_pages = resolved_num_pages + 1."""
        if self.num_pages is not None:
            return self.num_pages
        return self.memory_budget_bytes // self.bytes_per_page - 1

    @property
    def pool_pages(self) -> int:
        """Pages in the pool tensor: resolved_num_pages plus the null page 0."""
        return self.resolved_num_pages + 1


def _describe(exc: ValidationError) -> str:
    return describe(exc, "CacheConfig", CacheConfig.model_fields)


def _check_device_present(device: torch.device) -> None:
    """A CUDA device this process can use, or ValueError saying why not (at config time, not
    as a raw assertion deep inside the first allocation)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise ValueError(f"device={str(device)!r}: {why}; use device='cpu'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) "
                         f"are visible; use an index below that")
