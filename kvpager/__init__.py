"""kvpager: paged latent KV cache, MLA decode and continuous batching for DeepSeek-style models.

The public surface is what this module exports, plus kvpager.errors (the typed errors) and
kvpager.block_table (NATIVE_AVAILABLE, slot_mapping). kvpager.runtime imports nothing else.
"""
from kvpager import errors, fp8
from kvpager.allocator import BlockAllocator
from kvpager.block_table import PAD_PAGE, BlockTables, slot_mapping
from kvpager.config import CacheConfig
from kvpager.errors import KVPagerError
from kvpager.mla import flash_mla_with_kvcache, get_mla_metadata
from kvpager.pool import PagePool
from kvpager.prefix_cache import PrefixCache
from kvpager.prefix_keys import PrefixKeys
from kvpager.sequence import Sequence

__all__ = [
    "BlockAllocator", "BlockTables", "CacheConfig", "KVPagerError", "PAD_PAGE", "PagePool",
    "PrefixCache", "PrefixKeys", "Sequence", "errors", "flash_mla_with_kvcache", "fp8",
    "get_mla_metadata", "slot_mapping",
]
__version__ = "0.1.0"
