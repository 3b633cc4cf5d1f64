"""kvpager: paged latent KV cache, MLA decode and continuous batching for DeepSeek-style models."""
from kvpager import errors, fp8
from kvpager.allocator import BlockAllocator
from kvpager.config import CacheConfig
from kvpager.errors import KVPagerError
from kvpager.mla import flash_mla_with_kvcache, get_mla_metadata
from kvpager.pool import PagePool
from kvpager.prefix_cache import PrefixCache
from kvpager.prefix_keys import PrefixKeys
from kvpager.sequence import Sequence
from kvpager.table_events import EventTables
from kvpager.tables import PAD_PAGE, BatchTables

__all__ = [
    "BatchTables", "BlockAllocator", "CacheConfig", "EventTables", "KVPagerError", "PAD_PAGE",
    "PagePool", "PrefixCache", "PrefixKeys", "Sequence", "errors", "flash_mla_with_kvcache",
    "fp8", "get_mla_metadata",
]
__version__ = "0.1.0"
