"""EventTables: BatchTables driven by events (join, leave, grow) instead of re-reading every
sequence each step."""
from __future__ import annotations

import operator
from collections.abc import Sequence as SequenceList

import numpy as np
import torch

from kvpager.errors import (BatchFull, InvalidArgument, KVPagerError, RowOutOfRange,
                            SequenceTooLong, TablesOutOfSync)
from kvpager.sequence import Sequence
from kvpager.tables import PAD_PAGE, BatchTables


class EventTables(BatchTables):
    """BatchTables whose caller reports what changed, so a step costs O(changed rows) plus a few
    numpy ops over [B] and never reads the sequences that did not change.

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
        _cap[r] == _pages[r] * page_size, _layouts[r] == the layout id they were written for;
        these plain lists (cheaper per row than numpy scalars) cover all max_batch rows and are
        copied into the BatchTables bookkeeping only when update() runs, and back after it.
    Errors change nothing.
    """

    def __init__(self, max_batch: int, max_pages: int, device: torch.device | str = "cpu",
                 page_size: int = 64) -> None:
        super().__init__(max_batch, max_pages, device, page_size)
        self._seqs: list[Sequence] = []
        self._pages = [0] * max_batch
        self._layouts = [0] * max_batch
        self._cap = np.zeros(max_batch, dtype=np.int32)  # tokens the row's written pages hold
        self._dirty: set[int] = set()  # rows to copy to the device at the next view()

    @property
    def batch_size(self) -> int:
        return len(self._seqs)

    def update(self, seqs: SequenceList[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTables.update, then the event path takes over from `seqs`. O(max_batch)."""
        pages = np.array(self._pages, dtype=np.int64)
        layouts = np.array(self._layouts, dtype=np.int64)
        self._row_pages[:], self._row_layout[:] = pages, layouts
        self._row_lo[:], self._row_span[:] = layouts << 32, pages * self.page_size
        self._max_layout = max(self._max_layout, int(layouts.max()))
        result = super().update(seqs)
        self._seqs = list(seqs)
        self._pages, self._layouts = self._row_pages.tolist(), self._row_layout.tolist()
        np.multiply(self._row_pages, self.page_size, out=self._cap, casting="unsafe")
        self._dirty.clear()  # update() has already copied its rows
        return result

    def join(self, seq: Sequence) -> int:
        """Put seq in row B; returns B. O(seq.num_pages). Raises BatchFull, InvalidArgument
        (page_size) or SequenceTooLong."""
        row = len(self._seqs)
        if row == self.max_batch:
            raise BatchFull(f"cannot join sequence {seq.seq_id!r}: all max_batch={self.max_batch} "
                            f"rows are taken; leave() one first or build with a larger max_batch")
        self._check_fits(seq, row)
        self._seqs.append(seq)
        self._write_row(row, seq)
        self._batch = row + 1
        return row

    def leave(self, row: int) -> int | None:
        """Drop the sequence in `row`; the last row moves into the gap. Returns the moved row's
        old index, or None if `row` was the last. O(max_pages). Raises RowOutOfRange."""
        last = self._check_row(row)[1]
        if row != last:
            self._table[row] = self._table[last]
            self._lens[row], self._cap[row] = self._lens[last], self._cap[last]
            self._pages[row], self._layouts[row] = self._pages[last], self._layouts[last]
            self._seqs[row] = self._seqs[last]
            self._dirty.add(row)
        self._seqs.pop()
        self._batch = last
        return last if row != last else None

    def grow(self, n: int = 1) -> None:
        """Every active row grew by n tokens (after Sequence.reserve(n) on each). One in-place add
        and one compare over [B]; rows that crossed a page boundary copy their new page ids from
        the sequence (about B * n / page_size rows). Raises SequenceTooLong or InvalidArgument (a
        crossing sequence lacks the pages: reserve before grow) with nothing changed."""
        n = operator.index(n)
        if n < 0:
            raise InvalidArgument(f"grow(n={n}): n must be >= 0")
        batch = len(self._seqs)
        lens = self._lens[:batch]
        np.add(lens, n, out=lens)
        crossed = np.flatnonzero(lens > self._cap[:batch])
        if not crossed.size:
            return
        ps, seqs, table, cap = self.page_size, self._seqs, self._table, self._cap
        npages, layouts = self._pages, self._layouts
        plan = []
        try:
            for row in crossed.tolist():
                seq = seqs[row]
                k = (int(lens[row]) + ps - 1) // ps
                if k > len(seq.pages):
                    raise InvalidArgument(
                        f"row {row}: grow({n}) takes sequence {seq.seq_id!r} to "
                        f"{int(lens[row])} tokens ({k} pages) but it has {len(seq.pages)} pages; "
                        f"call Sequence.reserve({n}) on every sequence before grow({n})")
                if k > self.max_pages:
                    self._check_fits(seq, row, k)
                plan.append((row, seq, k))
        except KVPagerError:
            np.subtract(lens, n, out=lens)
            raise
        dirty = self._dirty
        for row, seq, k in plan:
            old = npages[row]
            if k - old == 1 and seq.table_key >> 32 == layouts[row]:
                table[row, old] = seq.pages[old]
                npages[row] = k
                cap[row] = k * ps
                dirty.add(row)
            else:  # several pages, or copy-on-write since the row was written
                self._write_row(row, seq, num_tokens=int(lens[row]), num_pages=k)

    def refresh(self, row: int) -> None:
        """Re-read `row` (pages and num_tokens) from its sequence. O(num_pages). Raises
        RowOutOfRange or SequenceTooLong."""
        seq = self._check_row(row)[0]
        self._check_fits(seq, row)
        self._write_row(row, seq)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table int32 [B, max_pages], cache_seqlens int32 [B]): views of the persistent
        buffers. On the CPU they share the host mirrors: no copy. On a GPU: one H2D copy of
        cache_seqlens[:B] plus one per row changed since the last view() (one range copy when
        many changed)."""
        batch = len(self._seqs)
        result = (self._views.get(batch) or self._make_views(batch))[5]
        if self.device.type != "cpu":
            dirty = sorted(r for r in self._dirty if r < batch)
            if len(dirty) > 8:
                dirty = [slice(dirty[0], dirty[-1] + 1)]
            for rows in dirty:  # pageable memory: staged before copy_ returns (see update())
                self.block_table[rows].copy_(self._host_table[rows], non_blocking=True)
            self.cache_seqlens[:batch].copy_(self._host_lens[:batch], non_blocking=True)
        self._dirty.clear()
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
        if self._cap.tolist() != [p * self.page_size for p in self._pages]:
            raise TablesOutOfSync("_cap != _pages * page_size (an EventTables bug)")

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
        count, old = len(pages), self._pages[row]
        self._table[row, :count] = pages
        if old > count:
            self._table[row, count:old] = PAD_PAGE
        self._lens[row] = seq.num_tokens if num_tokens is None else num_tokens
        self._pages[row], self._layouts[row] = count, seq.table_key >> 32
        self._cap[row] = count * self.page_size
        self._dirty.add(row)
