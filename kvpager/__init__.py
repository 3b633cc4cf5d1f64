"""kvpager: paged latent KV cache, MLA decode and continuous batching for DeepSeek-style models.

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
    "BatchTables": "kvpager.tables", "PAD_PAGE": "kvpager.tables",
    "BlockAllocator": "kvpager.allocator", "CacheConfig": "kvpager.config",
    "EventTables": "kvpager.table_events", "PagePool": "kvpager.pool",
    "Sequence": "kvpager.sequence", "flash_mla_with_kvcache": "kvpager.mla",
    "get_mla_metadata": "kvpager.mla",
}

__all__ = sorted([*_LAZY, "KVPagerError", "errors"])


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpager' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from kvpager.allocator import BlockAllocator
    from kvpager.config import CacheConfig
    from kvpager.mla import flash_mla_with_kvcache, get_mla_metadata
    from kvpager.pool import PagePool
    from kvpager.sequence import Sequence
    from kvpager.table_events import EventTables
    from kvpager.tables import PAD_PAGE, BatchTables
