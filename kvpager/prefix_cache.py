"""PrefixCache: reuse the KV pages of earlier requests' prompt prefixes, down to the token.

A tree of full pages: a node is one cached page, keyed under its parent node by its own token
ids (PrefixKeys.page_keys), so the path from a root to a node spells every token before and in
that page; one root per extra_keys tuple (e.g. per adapter). A page enters the cache when its
page_size tokens are all written (commit) and stays after its requests end, at refcount 0,
until the allocator needs it (BlockAllocator evicts the least recently released first, only
when no free page is left). Evicting a node drops its whole subtree from the tree (those
pages could no longer be reached); subtrees are rare because a sequence's deepest pages are
queued for eviction before the pages they extend.

Matching a prompt (match / lookup) walks the tree one dict probe per page: O(matched pages).
Where the walk stops, one cached child page whose first k < page_size tokens equal the next
prompt tokens is the partial match: the caller's new sequence copies it into a fresh page and
keeps k tokens. The best such child is found by bisection in the node's sorted child keys
(byte order keeps the longest common prefix next to the query): O(log children). At least one
prompt token is always left to compute (its logits start the output), so a prompt that is
cached whole matches num_tokens - 1 tokens, its last page partially. Nothing ever writes into
a cached page: full matched pages are shared read-only (the sequence's next token starts a new
page) and the partial page is copied.

Invariants (1 and 2: check_invariants(), with BlockAllocator's; 3: entries() against a model
of what was written, as tests/cache/test_stateful_prefix_cache.py does):
  1. a page is cached in the allocator iff it is the page of a live node, at most one node
     per page, never NULL_PAGE;
  2. every live node is reachable from its root: parent.children[node.key] is node, and each
     node's sorted child keys are exactly its children's keys, in order; keys are page_size
     token ids;
  3. every slot of a cached page holds the KV of the token ids (and extra keys) on its root path
     up to that slot: a key never maps to a page with other content.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from kvpager.allocator import NULL_PAGE, BlockAllocator
from kvpager.errors import InvalidArgument, InvariantViolation, StaleHit
from kvpager.prefix_hit import PrefixHit, kv_usage_tokens
from kvpager.prefix_keys import TOKEN_BYTES, PrefixKeys
from kvpager.sequence import Sequence


class _Node:
    __slots__ = ("page", "key", "parent", "children", "sorted_keys", "alive")

    def __init__(self, page: int, key: bytes | tuple, parent: "_Node | None") -> None:
        self.page, self.key, self.parent = page, key, parent
        self.children: dict[bytes, _Node] = {}
        self.sorted_keys: list[bytes] = []
        self.alive = True


class PrefixCache:
    """The prefix cache over one BlockAllocator (see the module docstring).

    min_partial_tokens: a mid-page match shorter than this is not used (copying a page costs a
    page of bandwidth per layer; 1 takes every match)."""

    def __init__(self, allocator: BlockAllocator, page_size: int = 64,
                 min_partial_tokens: int = 1) -> None:
        if not isinstance(allocator, BlockAllocator):
            raise InvalidArgument(f"allocator must be a BlockAllocator, got {type(allocator).__name__}")
        if type(page_size) is not int or page_size < 1:
            raise InvalidArgument(f"page_size={page_size!r} must be an int >= 1")
        if type(min_partial_tokens) is not int or min_partial_tokens < 1:
            raise InvalidArgument(f"min_partial_tokens={min_partial_tokens!r} must be an int >= 1")
        self.allocator, self.page_size = allocator, page_size
        self.min_partial_tokens = min_partial_tokens
        self._roots: dict[tuple, _Node] = {}
        self._nodes: list[_Node | None] = [None] * (allocator.num_pages + 1)
        self._epoch = 0  # bumped whenever a node dies: a hit matched before is stale
        self.query_tokens = 0  # prompt tokens looked up (acquire)
        self.hit_tokens = 0  # of those, tokens found in the cache
        self.evictions = 0  # pages that left the cache (evicted, or dropped with a subtree)
        self.num_cached_pages = 0
        allocator.set_evict_callback(self._on_evict)

    # -- lookup -------------------------------------------------------------------------------
    def match(self, keys: PrefixKeys) -> PrefixHit:
        """The longest cached prefix of keys' tokens (at most num_tokens - 1), without taking it:
        changes nothing, counts nothing. O(matched pages + log children of the last node)."""
        self._check_keys(keys)
        ps, limit = self.page_size, keys.num_tokens - 1
        node = self._roots.get(keys.extra_keys)
        if node is None or limit <= 0:
            return PrefixHit([], None, 0, ps, 0, keys, node, self._epoch)
        pages = []
        add = pages.append
        for key in keys.page_keys[:limit // ps]:  # the hot loop: one dict probe a page
            try:
                node = node.children[key]
            except KeyError:
                break
            add(node.page)
        refs = self.allocator._refs
        revived = [refs[page] for page in pages].count(0)
        partial, k = None, 0
        start = len(pages) * ps
        want = min(ps, limit - start)
        if want >= self.min_partial_tokens and node.sorted_keys:
            partial, k = self._best_child(node, keys.token_bytes(start, start + want))
            if k < self.min_partial_tokens:
                partial, k = None, 0
            elif refs[partial] == 0:
                revived += 1
        return PrefixHit(pages, partial, k, ps, revived, keys, node, self._epoch)

    def acquire(self, keys: PrefixKeys, hit: PrefixHit) -> PrefixHit:
        """Take hit's pages by reference (one each; evictable ones leave the eviction queue),
        count the query, and point keys' commit cursor at the hit. O(hit pages). Raises
        StaleHit if a page left the cache since match() (re-match), nothing changed."""
        if hit._state != "matched":
            raise InvalidArgument(f"{hit!r} was already acquired; match again for a new hit")
        if hit._keys is not keys:
            raise InvalidArgument("acquire() got other PrefixKeys than match(); pass the same "
                                  "keys object to both")
        if hit._epoch != self._epoch:
            raise StaleHit("cached pages were evicted since this hit was matched; call "
                           "match() again right before acquire()")
        taken = hit.pages if hit.partial_page is None else hit.pages + [hit.partial_page]
        self.allocator._incref_trusted(taken)
        hit._state = "acquired"
        self.query_tokens += keys.num_tokens
        self.hit_tokens += hit.num_tokens
        if hit.pages:
            keys._node, keys._num_committed = hit._node, len(hit.pages)
        else:
            keys._node, keys._num_committed = None, 0
        return hit

    def lookup(self, keys: PrefixKeys) -> PrefixHit:
        """match + acquire: the hit, its pages referenced. Build the request's sequence with
        Sequence.from_prefix(seq_id, allocator, hit, ...), or give it back with release()."""
        return self.acquire(keys, self.match(keys))

    def miss(self, keys: PrefixKeys) -> None:
        """Count a query that takes nothing from the cache (e.g. its hit did not fit the free
        pages and the request starts from scratch) and reset keys' commit cursor. O(1)."""
        self._check_keys(keys)
        keys._node, keys._num_committed = None, 0
        self.query_tokens += keys.num_tokens

    def release(self, hit: PrefixHit) -> None:
        """Give back an acquired hit's references (e.g. the request was not admitted)."""
        hit.take()
        taken = hit.pages if hit.partial_page is None else hit.pages + [hit.partial_page]
        self.allocator.free(taken)

    # -- insertion ----------------------------------------------------------------------------
    def commit(self, seq: Sequence, keys: PrefixKeys, num_written: int) -> int:
        """Cache seq's pages that are full of written tokens: pages [0, num_written // page_size)
        not yet committed, keyed by keys. seq must hold keys' tokens (seq.pages[i] holds the KV
        of tokens [i * page_size, (i + 1) * page_size) of keys); num_written counts the tokens
        whose KV is written (not merely reserved). A page whose key is already cached (another
        request wrote the same tokens) stays private: the cache keeps the first. Returns the
        number of pages newly cached. O(newly full pages)."""
        self._check_keys(keys)
        ps = self.page_size
        if getattr(seq, "page_size", None) != ps:
            raise InvalidArgument(f"sequence page_size {getattr(seq, 'page_size', None)!r} != the "
                                  f"cache's {ps}")
        if type(num_written) is not int or not 0 <= num_written <= min(seq.num_tokens,
                                                                       keys.num_tokens):
            raise InvalidArgument(
                f"num_written={num_written!r} must be an int in [0, {min(seq.num_tokens, keys.num_tokens)}]"
                f" (the sequence has {seq.num_tokens} tokens, keys {keys.num_tokens})")
        full = num_written // ps
        done, node = keys._num_committed, keys._node
        if node is not None and not node.alive:  # the chain was evicted under us: redo it
            done, node = 0, None
        if done >= full:
            return 0
        if node is None:
            node = self._roots.get(keys.extra_keys)
            if node is None:
                node = self._roots[keys.extra_keys] = _Node(NULL_PAGE, keys.extra_keys, None)
        added, cached, pages = 0, self.allocator._cached, seq.pages
        for i in range(done, full):
            key = keys.page_keys[i]
            child = node.children.get(key)
            if child is None:
                page = pages[i]
                if cached[page]:  # cached under another key: not this content; stop here
                    break
                child = self._insert(node, key, page)
                added += 1
            node = child
            done = i + 1
        keys._node, keys._num_committed = node, done
        return added

    # -- metrics ------------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        """hit_tokens / query_tokens (0.0 before any query)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def stats(self, seqs: Iterable | None = None) -> dict[str, float]:
        """Counters since construction; with the live sequences, KV usage in tokens as well.
        O(len(seqs))."""
        out = {"prefix_query_tokens": self.query_tokens, "prefix_hit_tokens": self.hit_tokens,
               "prefix_hit_rate": self.hit_rate, "evictions": self.evictions,
               "cached_tokens": self.num_cached_pages * self.page_size,
               "evictable_tokens": self.allocator.num_evictable * self.page_size}
        if seqs is not None:
            out["kv_usage_tokens"] = kv_usage_tokens(self.allocator, seqs, self.page_size)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _insert(self, parent: _Node, key: bytes, page: int) -> _Node:
        self.allocator.mark_cached(page)
        child = _Node(page, key, parent)
        parent.children[key] = child
        bisect.insort(parent.sorted_keys, key)
        self._nodes[page] = child
        self.num_cached_pages += 1
        return child

    def _best_child(self, node: _Node, query: bytes) -> tuple[int, int]:
        """(page, k): the child whose key shares the longest token prefix k with query. The
        best key is next to query's place in the sorted keys. O(log children + log page_size)."""
        keys = node.sorted_keys
        i = bisect.bisect_left(keys, query)
        best, best_k = None, -1
        for j in (i - 1, i):
            if 0 <= j < len(keys):
                k = _common_tokens(keys[j], query)
                if k > best_k:
                    best, best_k = keys[j], k
        return node.children[best].page, best_k

    def _on_evict(self, page: int) -> None:
        """allocate() evicted page (already out of the allocator's cached state): drop its node
        and the subtree under it, whose pages the cache can no longer reach."""
        node = self._nodes[page]
        parent = node.parent
        del parent.children[node.key]
        keys = parent.sorted_keys
        del keys[bisect.bisect_left(keys, node.key)]
        if parent.parent is None and not parent.children:
            del self._roots[parent.key]
            parent.alive = False
        self._epoch += 1
        if not node.children:  # the usual victim: the deepest page of a finished request
            node.alive = False
            self._nodes[page] = None
            self.evictions += 1
            self.num_cached_pages -= 1
            return
        stack = [node]
        while stack:
            dead = stack.pop()
            dead.alive = False
            self._nodes[dead.page] = None
            self.evictions += 1
            self.num_cached_pages -= 1
            if dead is not node:
                self.allocator.uncache(dead.page)
            stack.extend(dead.children.values())

    def _check_keys(self, keys: PrefixKeys) -> None:
        if not isinstance(keys, PrefixKeys):
            raise InvalidArgument(f"expected PrefixKeys, got {type(keys).__name__}; build them "
                                  f"once per request with PrefixKeys(token_ids, extra_keys)")
        if keys.page_size != self.page_size:
            raise InvalidArgument(f"PrefixKeys page_size {keys.page_size} != the cache's "
                                  f"{self.page_size}")

    def entries(self) -> Iterator[tuple[tuple, tuple[int, ...], int]]:
        """Every cached page as (extra_keys, token ids from the sequence start to the end of the
        page, page), parents before children. For checks and debugging: O(cached tokens * depth)."""
        stack = [(root, root.key, ()) for root in self._roots.values()]
        while stack:
            node, extra, path = stack.pop()
            for child in node.children.values():
                tokens = path + _ids(child.key)
                yield extra, tokens, child.page
                stack.append((child, extra, tokens))

    def check_invariants(self) -> None:
        """Raise InvariantViolation unless invariants 1 and 2 of the module docstring hold (3 needs
        the pages' content: compare entries() with a model of what was written). O(cached pages)."""
        ps, alloc, seen = self.page_size, self.allocator, set()
        stack = list(self._roots.values())
        for root in stack:
            if root.parent is not None or root.page != NULL_PAGE or not root.alive:
                raise InvariantViolation(f"bad root {root.key!r}")
        while stack:
            node = stack.pop()
            if node.sorted_keys != sorted(node.children):
                raise InvariantViolation(f"page {node.page}: sorted child keys out of step")
            for key, child in node.children.items():
                if child.key != key or child.parent is not node or not child.alive:
                    raise InvariantViolation(f"page {child.page} is linked under the wrong key")
                if len(key) != ps * TOKEN_BYTES:
                    raise InvariantViolation(f"page {child.page}: key of {len(key)} bytes")
                if child.page in seen or self._nodes[child.page] is not child:
                    raise InvariantViolation(f"page {child.page} is cached twice or unindexed")
                seen.add(child.page)
                stack.append(child)
        indexed = {page for page, node in enumerate(self._nodes) if node is not None}
        marked = {page for page in range(1, alloc.num_pages + 1) if alloc._cached[page]}
        if indexed != seen or marked != seen or self.num_cached_pages != len(seen):
            raise InvariantViolation(f"cached pages disagree: tree {sorted(seen)}, index "
                                     f"{sorted(indexed)}, allocator {sorted(marked)}")


def _common_tokens(a: bytes, b: bytes) -> int:
    """Tokens at the start of a and b that are equal. O(log tokens) memcmps."""
    n = min(len(a), len(b)) // TOKEN_BYTES
    if a[:n * TOKEN_BYTES] == b[:n * TOKEN_BYTES]:
        return n
    lo, hi = 0, n  # a and b agree on lo tokens and differ within hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid * TOKEN_BYTES] == b[:mid * TOKEN_BYTES]:
            lo = mid
        else:
            hi = mid
    return lo


def _ids(key: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(key[i:i + TOKEN_BYTES], "little", signed=True)
                 for i in range(0, len(key), TOKEN_BYTES))
