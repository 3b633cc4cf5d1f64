"""BlockAllocator: a free list and a refcount per page. O(1) per page allocated or freed."""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping

from kvpager.errors import (DoubleFree, InvalidArgument, InvariantViolation, OutOfPages,
                            PageNotAllocated, RefcountUnderflow, UnknownPage)


class BlockAllocator:
    """Hands out page ids in [0, num_pages) and counts who holds them.

    State: `_free` (a list used as a stack of free page ids) and `_refs` (a list: page -> count).

    Invariants (checked by check_invariants()):
      1. every page is free xor has refcount >= 1 (free pages have refcount 0);
      2. the free list has no duplicates;
      3. num_free + num_used == num_pages;
      4. the sum of refcounts equals the number of (holder, page) references: each Sequence
         holding a page in its table (or a pending copy-on-write source) counts once.

    Every method checks its whole argument before changing anything, so a raised error leaves
    the allocator exactly as it was (all or nothing).

    page_size: tokens per page of the pool these ids index (None: not known). The allocator does
    not use it; it carries it so that a Sequence, which turns page ids into slots, is checked
    against the pool's page size (a Sequence with another page size would write into other
    sequences' slots). Build it as `BlockAllocator(pool.num_pages, pool.page_size)`.
    """

    def __init__(self, num_pages: int, page_size: int | None = None) -> None:
        num_pages = _int_arg("num_pages", num_pages)
        if num_pages < 1:
            raise InvalidArgument(f"num_pages={num_pages} must be >= 1")
        if page_size is not None and _int_arg("page_size", page_size) < 1:
            raise InvalidArgument(f"page_size={page_size} must be >= 1 or None")
        self.page_size = page_size
        self._num_pages = num_pages
        # Reversed so that pop() hands out 0, 1, 2, ... first: easier to read in debugging.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs: list[int] = [0] * num_pages

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= _int_arg("n", n) <= len(self._free)

    def refcount(self, page: int) -> int:
        self._check_known(page)
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with refcount 1. Raises OutOfPages (nothing allocated) when fewer
        than n are free. O(n)."""
        n = _int_arg("n", n)
        if n < 0:
            raise InvalidArgument(f"cannot allocate n={n} pages; n must be >= 0")
        if n > len(self._free):
            raise OutOfPages(n, len(self._free))
        if n == 0:
            return []
        pages = self._free[-n:][::-1]
        del self._free[-n:]
        refs = self._refs
        for page in pages:
            refs[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (a page listed twice gains two). Pages must be in use."""
        pages = self._checked(pages)
        refs = self._refs
        for page in pages:
            if refs[page] == 0:
                raise PageNotAllocated(f"incref of page {page}, which is free; only pages "
                                       f"returned by allocate() can be shared")
        for page in pages:
            refs[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference per listed page; a page whose count reaches 0 goes back on the free
        list. Raises DoubleFree (page already free), RefcountUnderflow (listed more times than it
        is referenced) or UnknownPage, with nothing changed."""
        pages = self._checked(pages)
        refs = self._refs
        if len(pages) > 1:
            for page, count in Counter(pages).items():
                self._check_decref(page, count)
        elif pages:
            self._check_decref(pages[0], 1)
        for page in pages:
            refs[page] -= 1
            if refs[page] == 0:
                self._free.append(page)

    def check_invariants(self, expected_refs: Mapping[int, int] | None = None) -> None:
        """Raise InvariantViolation if any invariant of the class docstring is broken. With
        `expected_refs` (page -> number of holders, e.g. counted over live sequences' tables),
        also check every refcount against it. O(num_pages)."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dup = [p for p, c in Counter(self._free).items() if c > 1]
            raise InvariantViolation(f"free list holds pages {dup} more than once")
        for page, count in enumerate(self._refs):
            if (page in free_set) == (count >= 1):
                raise InvariantViolation(
                    f"page {page}: free={page in free_set} with refcount {count}; a page must be "
                    f"free xor referenced")
        if not all(0 <= p < self._num_pages for p in free_set):
            raise InvariantViolation("free list holds an unknown page id")
        if self.num_free + self.num_used != self._num_pages:
            raise InvariantViolation("num_free + num_used != num_pages")
        if expected_refs is not None:
            for page, count in enumerate(self._refs):
                want = expected_refs.get(page, 0)
                if count != want:
                    raise InvariantViolation(f"page {page} has refcount {count} but {want} holders")
            extra = [p for p in expected_refs if not 0 <= p < self._num_pages]
            if extra:
                raise InvariantViolation(f"holders reference unknown pages {extra}")

    # -- argument checks ------------------------------------------------------------------------
    def _check_known(self, page: int) -> None:
        if type(page) is not int or not 0 <= page < self._num_pages:
            raise UnknownPage(f"page {page!r} is not a page id in [0, {self._num_pages})")

    def _checked(self, pages: Iterable[int]) -> list[int]:
        if not isinstance(pages, Iterable) or isinstance(pages, (str, bytes, Mapping)):
            one = f"; for one page pass [{pages}]" if type(pages) is int else ""
            raise InvalidArgument(f"pages={pages!r} must be a list of page ids (ints){one}")
        pages = [p if type(p) is int else _as_page(p) for p in pages]
        for page in pages:
            self._check_known(page)
        return pages

    def _check_decref(self, page: int, count: int) -> None:
        have = self._refs[page]
        if have == 0:
            raise DoubleFree(f"page {page} is already free; free each page once per reference")
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


def _as_page(page: object) -> object:
    """numpy / torch integer scalars -> int; anything else is left for _check_known to reject."""
    if isinstance(page, bool):
        return page
    try:
        return operator.index(page)
    except TypeError:
        return page
