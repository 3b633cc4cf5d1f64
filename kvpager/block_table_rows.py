"""PyRows: the row primitives of kvpager.block_table.BlockTables in Python, the twin of
kvpager/csrc/block_table.cpp: same arguments, same results, bit for bit (tests drive both). The
caller (BlockTables) owns the buffers and has checked rows and counts."""
from __future__ import annotations

from array import array
from collections.abc import Sequence as Seq

import numpy as np

from kvpager.allocator import NULL_PAGE

PAD_PAGE = NULL_PAGE
"""Entries past a row's pages hold PAD_PAGE, the reserved null page: owned by no request, so a
stray (speculative) read stays in bounds and reads nobody's tokens; readers use only the first
ceil(cache_seqlens[b] / page_size) entries."""


class PyRows:
    """table int32 [max_batch, max_pages], lens / pages int32 [max_batch] (tokens and page ids
    per row), dirty uint8 [max_batch] (rows changed since the last upload)."""

    def __init__(self, table: np.ndarray, lens: np.ndarray, pages: np.ndarray,
                 dirty: np.ndarray, page_size: int, handles: list, row_of: dict) -> None:
        self._handles, self._row_of = handles, row_of  # BlockTables' row order and index
        self._max_pages, self._page_size = table.shape[1], page_size
        self._lens_np = lens
        self._cap_np = pages * page_size  # tokens each row's pages hold (derived, private)
        # Single entries through flat memoryviews: much cheaper than numpy scalar indexing.
        self._flat = memoryview(table.reshape(-1))
        self._lens, self._pages, self._dirty = memoryview(lens), memoryview(pages), \
            memoryview(dirty)
        self._cap = memoryview(self._cap_np)
        self._pad = memoryview(np.full(self._max_pages, PAD_PAGE, dtype=np.int32))
        self._mask = np.zeros(len(lens), dtype=bool)
        self._views: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def write(self, row: int, ids: Seq[int], start: int, num_tokens: int) -> bool:
        """ids into entries [start, start + len(ids)); the row then holds that many pages (an
        earlier occupant's entries past them are padded); num_tokens >= 0 sets its length.
        False, nothing changed, when an id is not an int in [0, 2**31)."""
        try:
            ids = array("i", ids)
        except (TypeError, OverflowError):
            return False
        if ids and min(ids) < 0:
            return False
        end, old, base = start + len(ids), self._pages[row], row * self._max_pages
        self._flat[base + start:base + end] = ids
        if old > end:
            self._flat[base + end:base + old] = self._pad[:old - end]
        self._pages[row], self._cap[row] = end, end * self._page_size
        if num_tokens >= 0:
            self._lens[row] = num_tokens
        self._dirty[row] = 1
        return True

    def move(self, src: int, dst: int) -> None:
        """Row src's pages and length into row dst."""
        flat, count, old = self._flat, self._pages[src], self._pages[dst]
        s, d = src * self._max_pages, dst * self._max_pages
        flat[d:d + count] = flat[s:s + count]
        if old > count:
            flat[d + count:d + old] = self._pad[:old - count]
        self._pages[dst], self._cap[dst], self._lens[dst] = count, self._cap[src], self._lens[src]
        self._dirty[dst] = 1

    def crossing(self, n: int, per_row: np.ndarray | None, batch: int) -> list[tuple]:
        """(handle, pages held) of the rows r < batch whose length + n (per_row[r] when given)
        exceeds their pages * page_size."""
        lens, cap, mask = self._views.get(batch) or self._view(batch)
        np.greater(lens, cap - (n if per_row is None else per_row), out=mask)
        handles, pages = self._handles, self._pages
        return [(handles[r], pages[r]) for r in mask.nonzero()[0].tolist()]

    def grow(self, n: int, per_row: np.ndarray | None, batch: int, new_pages: list) -> int:
        """Append each (handle, ids) of new_pages to the handle's row, then every row r < batch
        grows by n (per_row[r] when given). Returns -1; or, nothing changed, -2 (a handle
        without a row, too many pages, a row listed twice, an id not an int in [0, 2**31)) or
        the first row whose pages would hold too few tokens."""
        lens, cap, mask = self._views.get(batch) or self._view(batch)
        new: dict[int, array] = {}
        for pair in new_pages:
            try:
                handle, ids = pair
                row = self._row_of.get(handle)
                ids = array("i", ids) if row is not None else None
            except (TypeError, ValueError, OverflowError):
                return -2
            if row is None:
                return -2
            if (ids and min(ids) < 0) or self._pages[row] + len(ids) > self._max_pages or \
                    row in new:
                return -2
            new[row] = ids
        step = n if per_row is None else per_row
        np.greater(lens, cap - step, out=mask)  # rows short of pages before the new ones
        if new:
            for r in mask.nonzero()[0].tolist():
                more = len(new.get(r, ()))
                if self._lens[r] + (n if per_row is None else int(per_row[r])) > \
                        self._cap[r] + more * self._page_size:
                    return r
            flat, pages, cap_mv, ps = self._flat, self._pages, self._cap, self._page_size
            for row, ids in new.items():
                start = row * self._max_pages + pages[row]
                flat[start:start + len(ids)] = ids
                pages[row] += len(ids)
                cap_mv[row] = pages[row] * ps
                self._dirty[row] = 1
        elif mask.any():
            return int(mask.argmax())
        lens += step
        return -1

    def _view(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        views = self._views[batch] = (self._lens_np[:batch], self._cap_np[:batch],
                                      self._mask[:batch])
        return views
