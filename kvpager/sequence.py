"""Sequence: one request's page table (page ids + token count), growing one page at a time."""
from __future__ import annotations

import operator

import torch

from kvpager.allocator import BlockAllocator
from kvpager.block_table import slot_mapping
from kvpager.config import KERNEL_PAGE_SIZE
from kvpager.errors import InvalidArgument, SequenceTooLong


class Sequence:
    """Token i of the sequence lives in slot `pages[i // page_size] * page_size + i % page_size`.

    Pages are allocated only at page boundaries, so `num_pages == ceil(num_tokens / page_size)`.
    Full pages are never written again, so they can be shared as they are (fork); only the last,
    partly filled page is copied when a sequence that shares it appends (copy-on-write).

    `_room`: tokens the held pages take with no allocation and no copy: num_pages * page_size,
    or num_tokens while the partly filled last page may be shared (after fork()). reserve()'s
    fast path stays below it, so it never writes a shared page. A sequence assumes that only
    fork() shares its partly filled last page (an incref of it from elsewhere must fork).
    """

    __slots__ = ("seq_id", "allocator", "page_size", "max_pages", "pages", "num_tokens",
                 "_room", "_pending")

    def __init__(self, seq_id: object, allocator: BlockAllocator, page_size: int | None = None,
                 max_pages: int | None = None) -> None:
        page_size = _check_page_size(allocator, page_size)
        if max_pages is not None and _count(max_pages, "max_pages") < 0:
            raise InvalidArgument(f"max_pages={max_pages} must be >= 0 or None")
        self.seq_id = seq_id
        self.allocator = allocator
        self.page_size = page_size
        self.max_pages = max_pages
        self.pages: list[int] = []
        self.num_tokens = self._room = 0
        # COW copies (src, dst) not yet taken; the sequence keeps a reference on each src until
        # take_pending_copies() so the page cannot be reused before the caller copies it.
        self._pending: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id!r}, num_tokens={self.num_tokens}, pages={self.pages})"

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    def pages_needed(self, n: int) -> int:
        """Pages append(n) would allocate now: new pages past the boundary, plus one if the
        partly filled last page is shared (copy-on-write)."""
        if type(n) is int and 0 <= n and self.num_tokens + n <= self._room:
            return 0
        n = _count(n)
        if n == 0:
            return 0
        ps = self.page_size
        new = (self.num_tokens + n + ps - 1) // ps - len(self.pages)
        return new + self._needs_cow()

    def append(self, n: int) -> torch.Tensor:
        """Reserve slots for n new tokens; returns their slot mapping, int64 [n] on the CPU.
        Raises SequenceTooLong (beyond max_pages) or OutOfPages, with nothing changed. Check
        take_pending_copies() afterwards and apply those copies before writing the new slots."""
        start = self.num_tokens
        self.reserve(n)
        return self.slot_mapping(start, self.num_tokens)

    def reserve(self, n: int) -> int:
        """append(n) without building the slot mapping (the engine computes slots from the block
        table): reserve_to(num_tokens + n)."""
        return self.reserve_to(self.num_tokens + _count(n))

    def reserve_to(self, num_tokens: int) -> int:
        """Grow to num_tokens tokens (>= the current count), allocating pages as append() does.
        Returns how many entries at the end of `pages` are new: pages[-k:] (fresh pages, and
        the last old one when it was copied on write; 0 when none), the event a block table
        takes. O(1) within the held pages; raises like append() with nothing changed."""
        if num_tokens.__class__ is int and self.num_tokens <= num_tokens <= self._room:
            self.num_tokens = num_tokens  # the hot path: no page changes
            return 0
        try:
            n = operator.index(num_tokens) - self.num_tokens
        except TypeError:
            raise InvalidArgument(f"token count {num_tokens!r} must be an int") from None
        if n < 0:
            raise InvalidArgument(f"reserve_to({num_tokens}): sequence {self.seq_id!r} already "
                                  f"holds {self.num_tokens} tokens")
        ps = self.page_size
        total_pages = (self.num_tokens + n + ps - 1) // ps
        if self.max_pages is not None and total_pages > self.max_pages:
            raise SequenceTooLong(
                f"sequence {self.seq_id!r}: {self.num_tokens} + {n} tokens need {total_pages} "
                f"pages but its table row holds {self.max_pages} ({self.max_pages * ps} tokens); "
                f"stop it earlier or raise max_pages")
        cow = n > 0 and self._needs_cow()
        needed = total_pages - len(self.pages) + cow
        if needed:
            fresh = self.allocator.allocate(needed)  # OutOfPages here changes nothing
            if cow:
                dst = fresh.pop(0)
                self._pending.append((self.pages[-1], dst))  # our reference on src moves here
                self.pages[-1] = dst
            self.pages.extend(fresh)
        self.num_tokens += n
        if n:  # the last page is ours alone now: fresh, copied, or found unshared
            self._room = len(self.pages) * ps
        return needed

    def slot_mapping(self, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end), int64 [end - start] on the CPU."""
        ps = self.page_size
        if not 0 <= start <= end <= self.num_tokens:
            raise InvalidArgument(f"token range [{start}, {end}) is outside [0, {self.num_tokens}]")
        first = start // ps
        row = torch.tensor([self.pages[first:(end + ps - 1) // ps]], dtype=torch.int32)
        return slot_mapping(row, torch.arange(start - first * ps, end - first * ps)[None], ps)[0]

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """COW copies (src, dst) accumulated by append(); the caller applies them with
        PagePool.copy_pages before writing. Taking them releases the sequence's hold on src."""
        copies, self._pending = self._pending, []
        if copies:
            self.allocator.free([src for src, _ in copies])
        return copies

    @classmethod
    def from_prefix(cls, seq_id: object, allocator: BlockAllocator, hit, page_size: int = 64,
                    max_pages: int | None = None) -> "Sequence":
        """A sequence that starts with a prefix-cache hit (PrefixCache.lookup / acquire): its
        full pages are shared as they are (the hit's references move here) and, for a mid-page
        hit, one fresh page receives a copy of the partial page, taken like a copy-on-write
        (apply take_pending_copies() before writing). num_tokens == hit.num_tokens; append the
        rest of the prompt next. Raises SequenceTooLong / OutOfPages (the hit stays the
        caller's), InvalidArgument (hit not acquired or used twice). O(hit pages)."""
        seq = cls(seq_id, allocator, page_size, max_pages)
        if hit.page_size != page_size:
            raise InvalidArgument(f"hit of page_size {hit.page_size} for a sequence of page_size "
                                  f"{page_size}")
        num_pages = -(-hit.num_tokens // page_size)
        if max_pages is not None and num_pages > max_pages:
            raise SequenceTooLong(f"sequence {seq_id!r}: the cached prefix alone needs {num_pages} "
                                  f"pages but its table row holds {max_pages}; raise max_pages")
        fresh = allocator.allocate(1) if hit.partial_page is not None else []
        try:
            hit.take()
        except InvalidArgument:
            allocator.free(fresh)
            raise
        seq.pages = hit.pages + fresh
        if fresh:  # our reference on the partial page moves to the pending copy, as in COW
            seq._pending.append((hit.partial_page, fresh[0]))
        seq.num_tokens = hit.num_tokens
        # Shared pages are all full and a partial hit gets a private copy: every held slot is ours.
        seq._room = len(seq.pages) * page_size
        return seq

    def fork(self, new_id: object) -> "Sequence":
        """A new sequence sharing every page (each gains a reference); no data is copied."""
        self.allocator.incref(self.pages)
        child = Sequence(new_id, self.allocator, self.page_size, self.max_pages)
        child.pages = list(self.pages)
        child.num_tokens = self._room = child._room = self.num_tokens  # the last page is shared
        return child

    def release(self) -> None:
        """Drop every page reference (pending COW sources too); the sequence is empty after."""
        self.allocator.free(self.pages + [src for src, _ in self._pending])
        self.pages, self._pending, self.num_tokens, self._room = [], [], 0, 0

    def _needs_cow(self) -> bool:
        return self.num_tokens % self.page_size != 0 and self.allocator.refcount(self.pages[-1]) > 1


def _count(n: int, what: str = "token count") -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise InvalidArgument(f"{what} {n!r} must be an int") from None
    if n < 0:
        raise InvalidArgument(f"{what} {n} must be >= 0")
    return n


def _check_page_size(allocator: BlockAllocator, page_size: int | None) -> int:
    """The sequence's page size: the one its allocator's pool uses (BlockAllocator.page_size),
    or 64 when neither says. A sequence whose page size differs from its pool's would compute
    slots inside other sequences' pages, so a mismatch is refused here, where it enters."""
    if not isinstance(allocator, BlockAllocator):
        raise InvalidArgument(f"allocator must be a BlockAllocator, got {type(allocator).__name__}")
    pool_size = allocator.page_size
    if page_size is None:
        return pool_size or KERNEL_PAGE_SIZE
    if _count(page_size, "page_size") < 1:
        raise InvalidArgument(f"page_size={page_size} must be >= 1")
    if pool_size is not None and page_size != pool_size:
        raise InvalidArgument(f"page_size={page_size} differs from the page size of the pool the "
                              f"allocator serves ({pool_size}); build the Sequence with "
                              f"page_size={pool_size} (or omit it)")
    return operator.index(page_size)
