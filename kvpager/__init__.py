"""kvpager: paged latent KV cache, MLA decode and continuous batching for DeepSeek-style models."""
from kvpager import errors
from kvpager.errors import KVPagerError

__all__ = ["errors", "KVPagerError"]
__version__ = "0.1.0"
