"""The scheduler's side of prefix caching (issue 11; the pager side is docs/prefix-cache.md).

With `SchedulerConfig(enable_prefix_caching=True)` the Scheduler owns one `PrefixCaching`:

  submit     `add(req)`: the request's PrefixKeys, built once from its prompt (O(prompt)).
  admission  `match(req, num_prefill)`: the cached prefix of prompt + output so far (a
             readmitted request re-matches its own generated tokens too); the scheduler admits
             iff the free pages cover `hit.pages_needed(num_prefill)` (the tail, the mid-page
             copy, and hit pages revived from the eviction queue). `start(req, hit)`: acquire
             the hit and build the sequence on it (`Sequence.from_prefix`); its num_tokens are
             the hit, so the prefill starts after it. At least one prompt token is always left
             to compute (PrefixCache.match), so the first output token has logits.
  each step  `commit_filled(running)`: pages that filled with written KV since the last step
             enter the cache (a check per running request; O(new full pages) of work).
  release    `commit(req)` before a finishing, aborted or preempted request drops its pages,
             so they stay cached at refcount 0 (LRU-evictable) and a readmission may hit them.

Keys hold token ids: the engine's requests' own (prompt + output), the simulator's from
`Request.content` (synthetic ids, workload.Content). Keys are extended lazily, when a page is
committed or a request is matched, never per decoded token.
"""
from __future__ import annotations

from collections.abc import Iterable

from kvpager import (BlockAllocator, PrefixCache, PrefixHit, PrefixKeys, Sequence,
                     check_pool_for_caching, kv_usage_tokens)
from kvpager.runtime.request import Request


def request_tokens(req: Request, start: int, end: int) -> list[int]:
    """Token ids [start, end) of req's prompt + output (synthetic ones in the simulator)."""
    if req.content is not None:
        return req.content.tokens(start, end)
    p = req.prompt_len
    if end <= p:
        return req.prompt_token_ids[start:end]
    out = req.output_token_ids
    if start >= p:
        return out[start - p:end - p]
    return req.prompt_token_ids[start:] + out[:end - p]


class PrefixCaching:
    """A PrefixCache over the scheduler's allocator plus the per-request steps above.

    Raises ConfigError (check_pool_for_caching) unless the pool holds one request of
    max_model_len + s_q - 1 tokens: with caching on, cached pages are evicted to admit any
    request that fits the pool, so that must be possible."""

    def __init__(self, allocator: BlockAllocator, page_size: int, max_request_tokens: int,
                 max_pages: int) -> None:
        check_pool_for_caching(allocator.num_pages, page_size, max_request_tokens)
        self.cache = PrefixCache(allocator, page_size)
        self.allocator, self.page_size, self.max_pages = allocator, page_size, max_pages

    def add(self, req: Request) -> None:
        req.keys = PrefixKeys(request_tokens(req, 0, req.prompt_len), page_size=self.page_size)

    def match(self, req: Request, num_prefill: int) -> PrefixHit:
        """The cached prefix of req's first num_prefill tokens; changes nothing in the cache.
        O(matched pages) (+ O(new tokens) to extend the keys after a preemption)."""
        self._extend(req, num_prefill)
        return self.cache.match(req.keys)

    def start(self, req: Request, hit: PrefixHit | None) -> Sequence:
        """req's new sequence: on the acquired hit (holding hit.num_tokens tokens, a mid-page
        hit's copy pending), or empty when hit is None (a query that took nothing)."""
        ps = self.page_size
        if hit is None:
            self.cache.miss(req.keys)
            seq = Sequence(req.request_id, self.allocator, ps, self.max_pages)
        else:
            self.cache.acquire(req.keys, hit)
            seq = Sequence.from_prefix(req.request_id, self.allocator, hit, ps, self.max_pages)
        req.next_commit = (seq.num_tokens // ps + 1) * ps
        return seq

    def commit(self, req: Request) -> None:
        """Cache req's pages that are full of written KV (its num_computed tokens)."""
        n = req.num_computed
        self._extend(req, n)
        self.cache.commit(req.seq, req.keys, n)
        req.next_commit = (n // self.page_size + 1) * self.page_size

    def commit_filled(self, running: Iterable[Request]) -> None:
        """commit() every request whose written KV filled a page since its last commit."""
        for req in running:
            if req.num_computed >= req.next_commit:
                self.commit(req)

    def counters(self) -> tuple[int, int, int]:
        """(query tokens, hit tokens, evictions) since construction."""
        cache = self.cache
        return cache.query_tokens, cache.hit_tokens, cache.evictions

    def kv_usage_tokens(self, running: Iterable[Request]) -> int:
        """Tokens of KV the running requests hold, each shared page once. O(running)."""
        return kv_usage_tokens(self.allocator, [r.seq for r in running], self.page_size)

    def _extend(self, req: Request, n: int) -> None:
        keys = req.keys
        have = keys.num_tokens
        if have < n:
            keys.append(request_tokens(req, have, n))
