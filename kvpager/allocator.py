"""BlockAllocator: page states (free / referenced / cached-unreferenced) and refcounts.
O(1) per page allocated, shared, freed or evicted."""
from __future__ import annotations

import operator
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping

from kvpager.errors import (DoubleFree, InvalidArgument, InvariantViolation, OutOfPages,
                            PageNotAllocated, RefcountUnderflow, UnknownPage)

NULL_PAGE = 0
"""Page 0 of every pool: reserved, never handed out. Padded block_table entries
(block_table.PAD_PAGE) and CUDA-graph padding rows point at it; nothing reads what it holds."""


class BlockAllocator:
    """Hands out page ids 1..num_pages and counts who holds them.

    `num_pages` never counts the null page: the pool tensor has num_pages + 1 pages, ids
    0..num_pages, and page 0 (NULL_PAGE) is never allocated, freed, shared or cached.

    Every page 1..num_pages is in exactly one state:
      free        on `_free` (a stack), refcount 0, holds nothing worth keeping;
      referenced  refcount >= 1 (held by sequences, pending copies or prefix hits); it may also
                  be cached (a PrefixCache key maps to it);
      evictable   cached with refcount 0: in `_evictable`, least recently released first.
    allocate() takes free pages first and evicts evictable ones (oldest first) only when the
    free stack is empty, telling the attached PrefixCache which page lost its content.

    Invariants (check_invariants()):
      1. the three states partition pages 1..num_pages; NULL_PAGE is in none (refcount 0,
         never cached);
      2. free pages are not cached, evictable pages are; neither has duplicates;
      3. num_free (free + evictable: what allocate() can hand out) + num_used (referenced)
         == num_pages;
      4. the sum of refcounts equals the number of (holder, page) references.
    A PrefixCache adds its own (every cached page is a live key of it, and back).

    Every method checks its whole argument before changing anything, so a raised error leaves
    the allocator exactly as it was (all or nothing): a double free changes neither the free
    stack nor the eviction order.

    page_size: tokens per page of the pool these ids index (None: not known). The allocator does
    not use it; it carries it so that a Sequence, which turns page ids into slots, is checked
    against the pool's page size (a Sequence with another page size would write into other
    sequences' slots). Build it as `BlockAllocator(pool.num_pages, pool.page_size)`.
    """

    def __init__(self, num_pages: int, page_size: int | None = None) -> None:
        num_pages = _int_arg("num_pages", num_pages)
        if num_pages < 1:
            raise InvalidArgument(f"num_pages={num_pages} must be >= 1 (the null page is extra)")
        if page_size is not None and _int_arg("page_size", page_size) < 1:
            raise InvalidArgument(f"page_size={page_size} must be >= 1 or None")
        self.page_size = page_size
        self._num_pages = num_pages
        # Reversed so that pop() hands out 1, 2, 3, ... first: easier to read in debugging.
        self._free: list[int] = list(range(num_pages, NULL_PAGE, -1))
        self._refs: list[int] = [0] * (num_pages + 1)
        self._cached = bytearray(num_pages + 1)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._on_evict: Callable[[int], None] | None = None

    @property
    def num_pages(self) -> int:
        """Pages that can be handed out (the null page not counted)."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """Pages allocate() can hand out now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Referenced pages (refcount >= 1)."""
        return self._num_pages - len(self._free) - len(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Cached pages nobody references (counted in num_free)."""
        return len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return 0 <= _int_arg("n", n) <= self.num_free

    def refcount(self, page: int) -> int:
        self._check_known(page)
        return self._refs[page]

    def is_cached(self, page: int) -> bool:
        self._check_known(page)
        return bool(self._cached[page])

    def evictable_pages(self) -> list[int]:
        """Evictable pages in eviction order (next victim first). O(num_evictable)."""
        return list(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with refcount 1. Evicts cached pages (oldest released first) only
        when the free stack is short. Raises OutOfPages (nothing allocated, nothing evicted) when
        fewer than n are free or evictable. O(n + evicted)."""
        n = _int_arg("n", n)
        if n < 0:
            raise InvalidArgument(f"cannot allocate n={n} pages; n must be >= 0")
        if n > self.num_free:
            raise OutOfPages(n, self.num_free)
        if n == 0:
            return []
        free = self._free
        if len(free) < n:
            self._evict(n - len(free))
        pages = free[-n:][::-1]
        del free[-n:]
        refs = self._refs
        for page in pages:
            refs[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (a page listed twice gains two). Pages must be
        referenced or evictable (a cached page nobody holds; it leaves the eviction queue)."""
        pages = self._checked(pages)
        refs, cached = self._refs, self._cached
        for page in pages:
            if refs[page] == 0 and not cached[page]:
                raise PageNotAllocated(f"incref of page {page}, which is free; only pages "
                                       f"returned by allocate() or cached pages can be shared")
        self._incref_trusted(pages)

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference per listed page. A page whose count reaches 0 goes back on the free
        stack, or, if cached, to the young end of the eviction queue; within one call later pages
        are queued first (a sequence lists its pages root first, so its deepest cached pages are
        evicted before the prefixes they extend). Raises DoubleFree (page not referenced),
        RefcountUnderflow (listed more times than it is referenced) or UnknownPage, with nothing
        changed."""
        pages = self._checked(pages)
        refs = self._refs
        if len(pages) == 1:
            self._check_decref(pages[0], 1)
        elif pages and (0 in [refs[p] for p in pages] or len(set(pages)) != len(pages)):
            for page, count in Counter(pages).items():  # find the culprit, or allow repeats
                self._check_decref(page, count)
        cached, free, released = self._cached, self._free, []
        for page in pages:
            refs[page] -= 1
            if refs[page] == 0:
                if cached[page]:
                    released.append(page)
                else:
                    free.append(page)
        for page in reversed(released):
            self._evictable[page] = None

    # -- the prefix cache's side (kvpager.prefix_cache) -------------------------------------------
    def set_evict_callback(self, on_evict: Callable[[int], None]) -> None:
        """Called with each page allocate() evicts, after the page has left the cached state. One
        cache per allocator."""
        if self._on_evict is not None:
            raise InvalidArgument("this allocator already serves a PrefixCache; build one cache "
                                  "per allocator")
        self._on_evict = on_evict

    def mark_cached(self, page: int) -> None:
        """A referenced page's content is now a cache key: at refcount 0 it becomes evictable
        instead of free."""
        self._check_known(page)
        if self._refs[page] == 0 or self._cached[page]:
            raise InvalidArgument(f"page {page} (refcount {self._refs[page]}, cached="
                                  f"{bool(self._cached[page])}) cannot be cached: only a "
                                  f"referenced, uncached page can")
        self._cached[page] = 1

    def uncache(self, page: int) -> None:
        """The cache dropped page's key: an evictable page goes to the free stack, a referenced
        one is freed normally later. Trusted caller (the cache): no argument checks."""
        self._cached[page] = 0
        if self._refs[page] == 0:
            del self._evictable[page]
            self._free.append(page)

    def _incref_trusted(self, pages: list[int]) -> None:
        """incref without argument checks: for page ids the prefix cache itself holds."""
        refs, evictable = self._refs, self._evictable
        for page in pages:
            if refs[page] == 0:
                del evictable[page]
            refs[page] += 1

    def _evict(self, n: int) -> None:
        """Move at least n evictable pages, oldest first, to the free stack (an evicted page can
        take its cached extensions along: the cache uncaches them)."""
        popitem, cached, free, on_evict = (self._evictable.popitem, self._cached, self._free,
                                           self._on_evict)
        goal = len(free) + n
        while len(free) < goal:
            page, _ = popitem(last=False)
            cached[page] = 0
            free.append(page)
            on_evict(page)

    # -- checks -----------------------------------------------------------------------------------
    def check_invariants(self, expected_refs: Mapping[int, int] | None = None) -> None:
        """Raise InvariantViolation if any invariant of the class docstring is broken. With
        `expected_refs` (page -> number of holders, e.g. counted over live sequences' tables),
        also check every refcount against it. O(num_pages)."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dup = [p for p, c in Counter(self._free).items() if c > 1]
            raise InvariantViolation(f"free list holds pages {dup} more than once")
        if not all(1 <= p <= self._num_pages for p in free_set | self._evictable.keys()):
            raise InvariantViolation("free list or eviction queue holds an unknown page id "
                                     "(or the null page)")
        if self._refs[NULL_PAGE] or self._cached[NULL_PAGE]:
            raise InvariantViolation("the null page is referenced or cached")
        for page in range(1, self._num_pages + 1):
            count, cached = self._refs[page], bool(self._cached[page])
            states = (page in free_set) + (page in self._evictable) + (count >= 1)
            if states != 1 or count < 0:
                raise InvariantViolation(
                    f"page {page}: free={page in free_set}, evictable={page in self._evictable}, "
                    f"refcount {count}; a page must be in exactly one state")
            if (page in free_set and cached) or (page in self._evictable and not cached):
                raise InvariantViolation(f"page {page}: cached={cached} contradicts its state")
        if self.num_free + self.num_used != self._num_pages:
            raise InvariantViolation("num_free + num_used != num_pages")
        if expected_refs is not None:
            for page, count in enumerate(self._refs):
                want = expected_refs.get(page, 0)
                if count != want:
                    raise InvariantViolation(f"page {page} has refcount {count} but {want} holders")
            extra = [p for p in expected_refs if not 1 <= p <= self._num_pages]
            if extra:
                raise InvariantViolation(f"holders reference unknown pages {extra}")

    def _check_known(self, page: int) -> None:
        if type(page) is not int or not 1 <= page <= self._num_pages:
            hint = " (the reserved null page)" if page == NULL_PAGE and type(page) is int else ""
            raise UnknownPage(f"page {page!r}{hint} is not an allocatable page id in "
                              f"[1, {self._num_pages}]")

    def _checked(self, pages: Iterable[int]) -> list[int]:
        """pages as a list of known page ids (the caller's list itself if it is one: read only).
        All-int lists are checked with C-level passes (type set, min, max): an 8k-token
        sequence frees ~128 pages on every finish."""
        if type(pages) is not list and (not isinstance(pages, Iterable)
                                        or isinstance(pages, (str, bytes, Mapping))):
            one = f"; for one page pass [{pages}]" if type(pages) is int else ""
            raise InvalidArgument(f"pages={pages!r} must be a list of page ids (ints){one}")
        pages = pages if type(pages) is list else list(pages)
        if not pages:
            return pages
        if set(map(type, pages)) != _INT_ONLY:
            pages = [p if type(p) is int else _as_page(p) for p in pages]
        elif 1 <= min(pages) and max(pages) <= self._num_pages:
            return pages
        for page in pages:
            self._check_known(page)  # raises, naming the first bad page
        return pages

    def _check_decref(self, page: int, count: int) -> None:
        have = self._refs[page]
        if have == 0:
            state = "cached, unreferenced" if self._cached[page] else "already free"
            raise DoubleFree(f"page {page} is {state}; free each page once per reference")
        if count > have:
            raise RefcountUnderflow(f"page {page} is freed {count} times but has only {have} "
                                    f"reference(s)")


def _int_arg(name: str, value: object) -> int:
    """value as an int (numpy / torch integers accepted), else InvalidArgument naming it."""
    if type(value) is int:
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise InvalidArgument(f"{name}={value!r} ({type(value).__name__}) must be an int")


_INT_ONLY = {int}


def _as_page(page: object) -> object:
    """numpy / torch integer scalars -> int; anything else is left for _check_known to reject."""
    if isinstance(page, bool):
        return page
    try:
        return operator.index(page)
    except TypeError:
        return page
