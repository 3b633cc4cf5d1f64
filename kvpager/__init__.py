"""kvpager: paged latent KV cache, MLA decode and continuous batching for DeepSeek-style models.

The public surface is what this module exports, plus kvpager.errors (the typed errors) and
kvpager.block_table (NATIVE_AVAILABLE, slot_mapping). kvpager.runtime imports nothing else.
The public names load on first use (a module `__getattr__`), so `import kvpager` — and with it
`kvpager --help` — does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvpager import errors
from kvpager.errors import KVPagerError

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "BlockAllocator": "kvpager.allocator", "BlockTables": "kvpager.block_table",
    "PAD_PAGE": "kvpager.block_table", "slot_mapping": "kvpager.block_table",
    "CacheConfig": "kvpager.config", "PagePool": "kvpager.pool",
    "PrefixCache": "kvpager.prefix_cache", "PrefixKeys": "kvpager.prefix_keys",
    "PrefixHit": "kvpager.prefix_hit", "check_pool_for_caching": "kvpager.prefix_hit",
    "kv_usage_tokens": "kvpager.prefix_hit",
    "Sequence": "kvpager.sequence", "flash_mla_with_kvcache": "kvpager.mla",
    "get_mla_metadata": "kvpager.mla",
}
_LAZY_MODULES = ("fp8",)  # submodules exported by name (they import torch)

__all__ = sorted([*_LAZY, *_LAZY_MODULES, "KVPagerError", "errors"])


def __getattr__(name: str) -> object:
    if name in _LAZY_MODULES:
        value = importlib.import_module(f"kvpager.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'kvpager' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


if TYPE_CHECKING:
    from kvpager import fp8
    from kvpager.allocator import BlockAllocator
    from kvpager.block_table import PAD_PAGE, BlockTables, slot_mapping
    from kvpager.config import CacheConfig
    from kvpager.mla import flash_mla_with_kvcache, get_mla_metadata
    from kvpager.pool import PagePool
    from kvpager.prefix_cache import PrefixCache
    from kvpager.prefix_hit import PrefixHit, check_pool_for_caching, kv_usage_tokens
    from kvpager.prefix_keys import PrefixKeys
    from kvpager.sequence import Sequence
