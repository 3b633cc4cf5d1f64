"""PrefixHit, what a prefix-cache lookup found, and the page and token accounting that
admission needs: how many free pages a hit saves, whether a pool can serve prefix caching at
all, and KV usage in tokens."""
from __future__ import annotations

from collections.abc import Iterable

from kvpager.allocator import BlockAllocator
from kvpager.errors import ConfigError, InvalidArgument


class PrefixHit:
    """What match() found. `pages`: full pages to share; `partial_page`: a cached page whose
    first `partial_tokens` tokens come next (None, 0 when there is none); `num_tokens` =
    len(pages) * page_size + partial_tokens, the prompt tokens that need no compute;
    `num_revived`: hit pages (the partial one included) nobody referenced when matched, which
    acquiring takes out of the evictable pool.

    Lifecycle: match() -> (acquire(): the hit now holds one reference per page) -> consumed by
    Sequence.from_prefix (the references move to the sequence) or given back with release()."""

    __slots__ = ("pages", "partial_page", "partial_tokens", "num_tokens", "page_size",
                 "num_revived", "_keys", "_node", "_epoch", "_state")

    def __init__(self, pages: list[int], partial_page: int | None, partial_tokens: int,
                 page_size: int, num_revived: int, keys: object, node: object,
                 epoch: int) -> None:
        self.pages, self.partial_page, self.partial_tokens = pages, partial_page, partial_tokens
        self.page_size = page_size
        self.num_tokens = len(pages) * page_size + partial_tokens
        self.num_revived = num_revived
        self._keys, self._node, self._epoch, self._state = keys, node, epoch, "matched"

    def __repr__(self) -> str:
        return (f"PrefixHit(num_tokens={self.num_tokens}, pages={self.pages}, partial_page="
                f"{self.partial_page}, partial_tokens={self.partial_tokens}, {self._state})")

    def pages_needed(self, num_tokens: int) -> int:
        """By how much allocator.num_free drops when this (matched, not yet acquired) hit is
        acquired and a sequence of num_tokens tokens is built on it: new pages (the partial
        copy and the tail) plus hit pages that were evictable. O(1)."""
        ps = self.page_size
        return -(-num_tokens // ps) - len(self.pages) + self.num_revived

    def take(self) -> None:
        """Mark an acquired hit consumed (its references now belong to a sequence)."""
        if self._state != "acquired":
            raise InvalidArgument(f"{self!r} is not acquired; call PrefixCache.acquire first, "
                                  f"and use each hit once")
        self._state = "taken"


def kv_usage_tokens(allocator: BlockAllocator, seqs: Iterable, page_size: int) -> int:
    """Tokens of KV the live sequences hold, each page once: page_size per referenced page, less
    the unused slots of partly filled last pages (each such page counted once even if forks
    share it). Cached pages nobody references are not usage. O(len(seqs))."""
    unused = {}
    for seq in seqs:
        tail = seq.num_tokens % page_size
        if tail:
            unused[seq.pages[-1]] = page_size - tail
    return allocator.num_used * page_size - sum(unused.values())


def check_pool_for_caching(num_pages: int, page_size: int, request_tokens: int) -> None:
    """ConfigError unless a pool of num_pages usable pages (plus the null page) can hold one
    request of request_tokens tokens: with caching on, a request that fits alone must always be
    admittable, since cached pages are evicted for it. Call it where caching is switched on."""
    need = -(-request_tokens // page_size)
    if need > num_pages:
        raise ConfigError(
            f"prefix caching with {num_pages} usable pages (+ the null page) cannot hold one "
            f"request of {request_tokens} tokens ({need} pages of {page_size}); raise num_pages "
            f"(or the memory budget) to at least {need}, or lower max_model_len")
