"""EventTables: BatchTables driven by events (join, leave, grow) instead of re-reading every
sequence each step."""
from __future__ import annotations

import operator
from array import array
from collections.abc import Sequence as SequenceList

import numpy as np
import torch

from kvpager.errors import (BatchFull, InvalidArgument, KVPagerError, RowOutOfRange,
                            SequenceTooLong, TablesOutOfSync)
from kvpager.sequence import Sequence
from kvpager.table_upload import TableUpload
from kvpager.tables import PAD_PAGE, BatchTables

try:  # the C++ hot loops (kvpager/csrc/row_events.cpp); optional, same results
    from kvpager._row_events import NOT_HANDLED, RowEvents
except ImportError:
    RowEvents, NOT_HANDLED = None, -2

NATIVE_AVAILABLE = RowEvents is not None
"""Whether the C++ row events were built (pip builds them wherever a C++ compiler exists)."""


class EventTables(BatchTables):
    """BatchTables whose caller reports what changed, so a step costs O(changed rows) plus one
    pass over [B] and never reads the sequences that did not change.

    Contract (rows are dense: rows 0..B-1 hold the active sequences, in join order modulo moves):
      - join(seq) -> row: seq takes row B (the end), as it is now (pages and num_tokens).
      - leave(row) -> moved: the last row moves into the gap; returns its old index (B-1 before
        the call), or None when `row` was the last. Mirror it in the caller's list with
        `last = seqs.pop(); if row < len(seqs): seqs[row] = last`.
      - grow(n=1): every active sequence grew by n tokens. Call it after Sequence.reserve(n) on
        all of them: rows that cross a page boundary read their new page ids from the sequence.
      - refresh(row): re-read one row from its sequence (pages and num_tokens). Needed after a
        change grow() does not describe: copy-on-write of a shared last page (take_pending_copies()
        returned copies) or growth by another amount than the batch (call it after grow()).
      - view() -> (block_table int32 [B, max_pages], cache_seqlens int32 [B]) on the device.
      - update(seqs) still works (e.g. after reordering the batch); events may follow it.

    Invariants, for each active row r holding sequence s (check(seqs) tests them):
      - cache_seqlens[r] == s.num_tokens and block_table[r, :s.num_pages] == s.pages;
      - _pages[r] page ids are written (entries past them hold PAD_PAGE or are never read),
        _cap[r] == _pages[r] * page_size, _layouts[r] == the layout id they were written for.
        _pages and _layouts are BatchTables' own _row_pages / _row_layout, so update() and the
        events share one bookkeeping.
    Errors change nothing.

    join, leave and grow run in C++ when kvpager._row_events is built (native=None picks it
    when available; False forces the Python path). The C++ handles the common event whole or
    hands it to the Python path untouched, so both give identical tables (tests run both).
    """

    def __init__(self, max_batch: int, max_pages: int, device: torch.device | str = "cpu",
                 page_size: int = 64, native: bool | None = None) -> None:
        super().__init__(max_batch, max_pages, device, page_size)
        if native and not NATIVE_AVAILABLE:
            raise InvalidArgument("native=True but kvpager._row_events was not built; reinstall "
                                  "kvpager where a C++ compiler is available, or pass native=None")
        self._seqs: list[Sequence] = []
        self._pages, self._layouts = self._row_pages, self._row_layout
        self._cap = np.zeros(max_batch, dtype=np.int32)  # tokens the row's written pages hold
        self._dirty = np.zeros(max_batch, dtype=np.uint8)  # rows to copy at the next view()
        # The Python path reads and writes single entries through flat memoryviews of the same
        # buffers: ~30 ns each against ~120 ns for a numpy scalar index.
        self._flat = memoryview(self._table.reshape(-1))
        self._lens_mv, self._cap_mv = memoryview(self._lens), memoryview(self._cap)
        self._pages_mv, self._layouts_mv = memoryview(self._pages), memoryview(self._layouts)
        self._dirty_mv = memoryview(self._dirty)
        self._pad = memoryview(np.full(max_pages, PAD_PAGE, dtype=np.int32))
        self._max_tokens = max_pages * page_size
        self._grow_views: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._upload = None
        if self.device.type != "cpu":
            self._upload = TableUpload(max_batch, max_pages, self.device, self.cache_seqlens)
            self.cache_seqlens = self._upload.cache_seqlens
        self._native = None
        if native is not False and NATIVE_AVAILABLE:
            # Addresses of buffers this object keeps alive and never rebinds; _seqs is shared.
            self._native = RowEvents(*(a.ctypes.data for a in (
                self._table, self._lens, self._cap, self._pages, self._layouts, self._dirty)),
                self._seqs, max_batch, max_pages, page_size)

    @property
    def batch_size(self) -> int:
        return len(self._seqs)

    @property
    def native(self) -> bool:
        """Whether join/leave/grow run in C++."""
        return self._native is not None

    def update(self, seqs: SequenceList[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTables.update, then the event path takes over from `seqs`. O(max_batch)."""
        # The events keep _row_pages / _row_layout; refresh what update() derives from them.
        self._row_lo[:] = self._row_layout << 32
        self._row_span[:] = self._row_pages * self.page_size
        self._max_layout = max(self._max_layout, int(self._row_layout.max()))
        result = super().update(seqs)
        self._seqs[:] = seqs  # in place: the C++ events hold this list
        np.multiply(self._row_pages, self.page_size, out=self._cap, casting="unsafe")
        self._dirty[:] = 0  # update() has already copied its rows
        return result

    def join(self, seq: Sequence) -> int:
        """Put seq in row B; returns B. O(seq.num_pages). Raises BatchFull, InvalidArgument
        (page_size) or SequenceTooLong."""
        if self._native is not None:
            row = self._native.join(seq)
            if row != NOT_HANDLED:
                self._batch = row + 1
                return row
        seqs = self._seqs
        row = len(seqs)
        if row == self.max_batch:
            raise BatchFull(f"cannot join sequence {seq.seq_id!r}: all max_batch={self.max_batch} "
                            f"rows are taken; leave() one first or build with a larger max_batch")
        self._check_fits(seq, row)
        self._write_row(row, seq)  # converts the ids before writing: may raise, nothing changed
        seqs.append(seq)
        self._batch = row + 1
        return row

    def leave(self, row: int) -> int | None:
        """Drop the sequence in `row`; the last row moves into the gap. Returns the moved row's
        old index, or None if `row` was the last. O(max_pages). Raises RowOutOfRange."""
        if self._native is not None:
            try:
                moved = self._native.leave(row)
            except TypeError:  # not a C integer: the Python path says what is wrong
                moved = NOT_HANDLED
            if moved != NOT_HANDLED:
                self._batch = len(self._seqs)
                return moved if moved >= 0 else None
        seqs = self._seqs
        last = self._check_row(row)[1]
        if row != last:
            flat, lens, cap, pages = self._flat, self._lens_mv, self._cap_mv, self._pages_mv
            count, old = pages[last], pages[row]
            dst, src = row * self.max_pages, last * self.max_pages
            flat[dst:dst + count] = flat[src:src + count]
            if old > count:
                flat[dst + count:dst + old] = self._pad[:old - count]
            lens[row], cap[row] = lens[last], cap[last]
            pages[row], self._layouts_mv[row] = count, self._layouts_mv[last]
            seqs[row] = seqs[last]
            self._dirty_mv[row] = 1
        seqs.pop()
        self._batch = last
        return last if row != last else None

    def grow(self, n: int = 1) -> None:
        """Every active row grew by n tokens (after Sequence.reserve(n) on each). One pass over
        [B]; rows that crossed a page boundary copy their new page ids from the sequence (about
        B * n / page_size rows). Raises SequenceTooLong or InvalidArgument (a crossing sequence
        lacks the pages: reserve before grow) with nothing changed."""
        n = operator.index(n)
        if not 0 <= n <= self._max_tokens:
            raise InvalidArgument(f"grow(n={n}): n must be in [0, max_pages * page_size = "
                                  f"{self._max_tokens}]")
        if self._native is not None and self._native.grow(n):
            return
        batch = len(self._seqs)
        lens_np, cap_np, crossed_np = self._grow_views.get(batch) or self._make_grow_views(batch)
        np.add(lens_np, n, out=lens_np)
        np.greater(lens_np, cap_np, out=crossed_np)
        crossed = crossed_np.nonzero()[0].tolist()
        ps, mp, seqs, lens = self.page_size, self.max_pages, self._seqs, self._lens_mv
        flat, cap, npages, layouts = self._flat, self._cap_mv, self._pages_mv, self._layouts_mv
        done, slow = [], []
        for row in crossed:  # the common case: one new page, the row's own layout
            seq = seqs[row]
            pages, old = seq.pages, npages[row]
            k = (lens[row] + ps - 1) // ps
            if k == old + 1 and k <= len(pages) and k <= mp and seq.table_key >> 32 == layouts[row]:
                flat[row * mp + old] = pages[old]
                npages[row], cap[row] = k, k * ps
                done.append(row)
            else:
                slow.append(row)
        if slow:
            try:
                for row in slow:  # check them all before writing any
                    self._check_grown(row, n)
            except KVPagerError:
                for row in done:  # the ids written past the old count are never read
                    npages[row] -= 1
                    cap[row] -= ps
                np.subtract(lens_np, n, out=lens_np)
                raise
            for row in slow:  # several pages, or copy-on-write since the row was written
                self._write_row(row, seqs[row], lens[row], (lens[row] + ps - 1) // ps)
        for row in crossed:
            self._dirty_mv[row] = 1

    def refresh(self, row: int) -> None:
        """Re-read `row` (pages and num_tokens) from its sequence. O(num_pages). Raises
        RowOutOfRange or SequenceTooLong."""
        seq = self._check_row(row)[0]
        self._check_fits(seq, row)
        self._write_row(row, seq)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table int32 [B, max_pages], cache_seqlens int32 [B]): views of the persistent
        buffers. On the CPU they share the host mirrors: no copy. On a GPU: one packed H2D copy
        of cache_seqlens and the rows changed since the last view() plus one scatter, enqueued
        on the current stream (TableUpload)."""
        batch = len(self._seqs)
        result = (self._views.get(batch) or self._make_views(batch))[5]
        if self._upload is not None:
            self._upload.upload(batch, self._lens, self._table, self._dirty, self.block_table)
        return result

    def check(self, seqs: SequenceList[Sequence]) -> None:
        """Raise TablesOutOfSync unless the rows equal what update(seqs) builds on fresh tables:
        same batch, cache_seqlens exactly, block_table over each row's valid pages. O(B * pages);
        for tests and debugging."""
        if [id(s) for s in seqs] != [id(s) for s in self._seqs]:
            raise TablesOutOfSync(f"rows hold {[s.seq_id for s in self._seqs]} but the batch is "
                                  f"{[s.seq_id for s in seqs]}")
        want = BatchTables(self.max_batch, self.max_pages, "cpu", self.page_size)
        want_table, want_lens = (t.numpy() for t in want.update(seqs))
        for row, seq in enumerate(seqs):
            pages = seq.num_pages
            if (self._lens[row] != want_lens[row]
                    or (self._table[row, :pages] != want_table[row, :pages]).any()):
                raise TablesOutOfSync(
                    f"row {row} (sequence {seq.seq_id!r}): tables hold {int(self._lens[row])} "
                    f"tokens, pages {self._table[row, :pages].tolist()}; the sequence has "
                    f"{seq.num_tokens}, {seq.pages}. A join/leave/grow/refresh event was missed")
        if (self._cap != self._pages * self.page_size).any():
            raise TablesOutOfSync("_cap != _pages * page_size (an EventTables bug)")

    def _check_grown(self, row: int, n: int) -> None:
        seq, tokens = self._seqs[row], self._lens_mv[row]
        k = (tokens + self.page_size - 1) // self.page_size
        if k > len(seq.pages):
            raise InvalidArgument(
                f"row {row}: grow({n}) takes sequence {seq.seq_id!r} to {tokens} tokens ({k} "
                f"pages) but it has {len(seq.pages)} pages; call Sequence.reserve({n}) on every "
                f"sequence before grow({n})")
        self._check_fits(seq, row, k)

    def _make_grow_views(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        views = (self._lens[:batch], self._cap[:batch], np.zeros(batch, dtype=bool))
        self._grow_views[batch] = views
        return views

    def _check_row(self, row: int) -> tuple[Sequence, int]:
        batch = len(self._seqs)
        if not 0 <= operator.index(row) < batch:
            raise RowOutOfRange(f"row {row} is not an active row: rows 0..{batch - 1} hold "
                                f"sequences (B={batch})")
        return self._seqs[row], batch - 1

    def _check_fits(self, seq: Sequence, row: int, pages: int | None = None) -> None:
        if seq.page_size != self.page_size:
            raise InvalidArgument(f"sequence {seq.seq_id!r} has page_size={seq.page_size} but the "
                                  f"tables use {self.page_size}")
        pages = seq.num_pages if pages is None else pages
        if pages > self.max_pages:
            raise SequenceTooLong(
                f"sequence {seq.seq_id!r} (row {row}) needs {pages} pages but the table holds "
                f"max_pages={self.max_pages}; build the tables with a larger max_pages or give "
                f"sequences max_pages={self.max_pages}")

    def _write_row(self, row: int, seq: Sequence, num_tokens: int | None = None,
                   num_pages: int | None = None) -> None:
        """Write the row whole from seq (its first num_pages pages), padding entries an earlier
        occupant left."""
        pages = seq.pages if num_pages is None else seq.pages[:num_pages]
        count, old, base = len(pages), self._pages_mv[row], row * self.max_pages
        self._flat[base:base + count] = array("i", pages)
        if old > count:
            self._flat[base + count:base + old] = self._pad[:old - count]
        self._lens_mv[row] = seq.num_tokens if num_tokens is None else num_tokens
        self._pages_mv[row], self._layouts_mv[row] = count, seq.table_key >> 32
        self._cap_mv[row] = count * self.page_size
        self._dirty_mv[row] = 1
