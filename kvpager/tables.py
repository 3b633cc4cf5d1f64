"""BatchTables: block_table and cache_seqlens of a ragged batch, kept in persistent buffers and
updated incrementally each step."""
from __future__ import annotations

import operator
from collections.abc import Sequence as SequenceList

import numpy as np
import torch

from kvpager.errors import InvalidArgument, SequenceTooLong
from kvpager.sequence import Sequence

PAD_PAGE = 0
"""Table entries past a row's page count hold PAD_PAGE. It is a valid page id so that a stray
(e.g. speculative) read stays in bounds, but nothing may rely on it: the kernel and the
reference read only the first ceil(cache_seqlens[b] / page_size) entries of row b."""


class BatchTables:
    """The kernel's view of a batch: block_table int32 [B, max_pages] and cache_seqlens int32 [B].

    Host mirrors (numpy) hold the tables; on a CPU device the returned tensors share their memory,
    on a GPU each update() ends with at most two H2D copies (the changed block_table rows as one
    contiguous range, and cache_seqlens[:B]).

    Per row the builder remembers the layout id of the sequence it was written for and how many
    page ids it holds (see Sequence.table_key). A step then costs one pass reading one int per
    sequence plus four numpy ops; further work only for stale rows: rows that gained a page
    (about B / page_size per step when all grow by one) or now hold another sequence or layout
    (joined, moved, forked, copied-on-write, released). A few stale rows are fixed one by one;
    many (rows moved up after a leave) go through a vectorised path that copies each moved
    sequence's old row in one gather. Measured figures: docs/foundation.md.
    """

    FEW_ROWS = 32
    """Up to this many stale rows are fixed one by one in Python (a few hundred ns each);
    more (e.g. many rows moved up after a leave) go through the vectorised _refresh."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device | str = "cpu",
                 page_size: int = 64) -> None:
        for name, value in (("max_batch", max_batch), ("max_pages", max_pages),
                            ("page_size", page_size)):
            if operator.index(value) < 1:
                raise InvalidArgument(f"{name}={value} must be >= 1")
        self.max_batch, self.max_pages, self.page_size = max_batch, max_pages, page_size
        self.device = torch.device(device)
        self._table = np.full((max_batch, max_pages), PAD_PAGE, dtype=np.int32)
        self._lens = np.zeros(max_batch, dtype=np.int32)
        # Per row: the layout id it was written for (0: never written) and how many page ids it
        # holds. Derived for the one-pass staleness test in update(): lo = layout << 32 and
        # span = pages * page_size; the row is current iff 0 <= table_key - lo <= span.
        self._row_layout = np.zeros(max_batch, dtype=np.int64)
        self._row_pages = np.zeros(max_batch, dtype=np.int64)
        self._row_lo = np.zeros(max_batch, dtype=np.int64)
        self._row_span = np.zeros(max_batch, dtype=np.uint64)
        self._scratch = np.zeros(max_batch, dtype=np.int64)
        host_table, host_lens = torch.from_numpy(self._table), torch.from_numpy(self._lens)
        if self.device.type == "cpu":
            self.block_table, self.cache_seqlens = host_table, host_lens
        else:
            self.block_table = host_table.to(self.device)
            self.cache_seqlens = host_lens.to(self.device)
        self._host_table, self._host_lens = host_table, host_lens
        self._views: dict[int, tuple] = {}
        self._batch = 0
        self._max_layout = 0

    def update(self, seqs: SequenceList[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Make rows 0..B-1 describe `seqs` (in batch order). Returns (block_table int32
        [B, max_pages], cache_seqlens int32 [B]): views of the persistent buffers, overwritten by
        the next update(). Raises InvalidArgument (B > max_batch) or SequenceTooLong (a sequence
        needs more than max_pages pages) before changing anything.

        Cost: one pass reading Sequence.table_key, four numpy ops, then work only for stale rows
        (Python per row that gained a page; vectorised for rows that moved); on a GPU, at most
        two H2D copies."""
        batch = len(seqs)
        if batch > self.max_batch:
            raise InvalidArgument(f"batch of {batch} sequences exceeds max_batch={self.max_batch}")
        view = self._views.get(batch) or self._make_views(batch)
        keys = np.fromiter([s.table_key for s in seqs], np.int64, batch)
        row_lo, row_span, scratch, scratch_u64, lens, result = view
        np.subtract(keys, row_lo, out=scratch)
        stale = np.flatnonzero(scratch_u64 > row_span)
        if stale.size > self.FEW_ROWS:
            self._refresh(seqs, keys, stale)
        elif stale.size:
            self._refresh_few(seqs, stale.tolist())
        np.copyto(lens, keys, casting="unsafe")  # int64 -> int32 keeps the low half: num_tokens
        self._batch = batch
        if self.device.type != "cpu":
            # Pageable host memory: the copy is staged before copy_ returns, so the next
            # update() may rewrite the mirrors while the transfer is still in flight.
            if stale.size:
                lo, hi = int(stale[0]), int(stale[-1]) + 1
                self.block_table[lo:hi].copy_(self._host_table[lo:hi], non_blocking=True)
            self.cache_seqlens[:batch].copy_(self._host_lens[:batch], non_blocking=True)
        return result

    def last_token_slots(self) -> torch.Tensor:
        """Slot of each row's last token, int64 [B] on the CPU, from the last update(): the
        decode step's slot mapping (after Sequence.reserve(1) for every row) in a few
        vectorised ops. Rows with no tokens get -1."""
        batch = self._batch
        last = self._lens[:batch].astype(np.int64) - 1
        page_idx = np.maximum(last, 0) // self.page_size
        pages = self._table[np.arange(batch), page_idx].astype(np.int64)
        slots = np.where(last >= 0, pages * self.page_size + last % self.page_size, -1)
        return torch.from_numpy(slots)

    def _refresh_few(self, seqs: SequenceList[Sequence], rows: list[int]) -> None:
        """_refresh for a handful of rows: a row with an unchanged layout gets its new page ids,
        any other is rebuilt from Sequence.pages."""
        ps, plan = self.page_size, []
        for row in rows:  # check everything before changing anything
            seq = seqs[row]
            key = seq.table_key
            pages = ((key & 0xFFFFFFFF) + ps - 1) // ps
            if pages > self.max_pages:
                raise SequenceTooLong(
                    f"sequence {seq.seq_id!r} (row {row}) needs {pages} pages but the table "
                    f"holds max_pages={self.max_pages}; build BatchTables with a larger "
                    f"max_pages or give sequences max_pages={self.max_pages}")
            if seq.page_size != ps:
                raise InvalidArgument(f"sequence {seq.seq_id!r} has page_size={seq.page_size} "
                                      f"but the tables use {ps}")
            plan.append((row, seq.pages, key >> 32, pages))
        table, row_layout, row_pages = self._table, self._row_layout, self._row_pages
        for row, seq_pages, layout, pages in plan:
            old = int(row_pages[row])
            if layout == row_layout[row]:
                if pages - old == 1:
                    table[row, old] = seq_pages[old]
                else:
                    table[row, old:pages] = seq_pages[old:pages]
            else:
                table[row, :pages] = seq_pages
                if old > pages:
                    table[row, pages:old] = PAD_PAGE
                row_layout[row] = layout
                if layout > self._max_layout:
                    self._max_layout = layout
            row_pages[row] = pages
            self._row_lo[row] = layout << 32
            self._row_span[row] = pages * ps

    def _refresh(self, seqs: SequenceList[Sequence], keys: np.ndarray, rows: np.ndarray) -> None:
        """Bring stale rows up to date. A row whose layout is unchanged only gained pages: write
        the new ids. A row with another layout copies the row of a sequence that moved (any row
        still holding that layout) in one gather, or is rebuilt from Sequence.pages."""
        ps = self.page_size
        keys = keys[rows]
        layouts = keys >> 32
        pages = ((keys & 0xFFFFFFFF) + (ps - 1)) // ps
        if pages.max() > self.max_pages:
            i = int(pages.argmax())
            row = int(rows[i])
            raise SequenceTooLong(
                f"sequence {seqs[row].seq_id!r} (row {row}) needs {int(pages[i])} pages but the "
                f"table holds max_pages={self.max_pages}; build BatchTables with a larger "
                f"max_pages or give sequences max_pages={self.max_pages}")
        relaid = layouts != self._row_layout[rows]
        if relaid.any():
            self._relayout(seqs, rows[relaid], layouts[relaid])
        table, row_pages = self._table, self._row_pages
        old = row_pages[rows]
        grew = np.flatnonzero(pages > old)
        for row, a, b in zip(rows[grew].tolist(), old[grew].tolist(), pages[grew].tolist()):
            if b - a == 1:
                table[row, a] = seqs[row].pages[a]
            else:
                table[row, a:b] = seqs[row].pages[a:b]
        row_pages[rows] = pages
        self._row_lo[rows] = layouts << 32
        self._row_span[rows] = pages * ps

    def _relayout(self, seqs: SequenceList[Sequence], rows: np.ndarray,
                  layouts: np.ndarray) -> None:
        # Layout ids only grow, so one above every id ever written cannot be in any row: joiners,
        # forks and COW skip the search; only sequences that moved slot are looked up.
        fresh = layouts > self._max_layout
        found = np.zeros(len(rows), dtype=bool)
        if not fresh.all():
            order = np.argsort(self._row_layout)
            known = self._row_layout[order]
            pos = np.searchsorted(known, layouts).clip(max=len(known) - 1)
            found = known[pos] == layouts
        rebuild = rows[~found].tolist()
        for row in rebuild:
            if seqs[row].page_size != self.page_size:
                raise InvalidArgument(f"sequence {seqs[row].seq_id!r} has page_size="
                                      f"{seqs[row].page_size} but the tables use {self.page_size}")
        if found.any():
            src, dst = order[pos[found]], rows[found]
            self._table[dst] = self._table[src]  # fancy-indexed RHS: read fully before writing
            self._row_pages[dst] = self._row_pages[src]
        table, row_pages = self._table, self._row_pages
        for row in rebuild:
            pages = seqs[row].pages
            n, old = len(pages), int(row_pages[row])
            table[row, :n] = pages
            if old > n:
                table[row, n:old] = PAD_PAGE
            row_pages[row] = n
        self._row_layout[rows] = layouts
        self._max_layout = max(self._max_layout, int(layouts.max()))

    def _make_views(self, batch: int) -> tuple:
        scratch = self._scratch[:batch]
        view = (self._row_lo[:batch], self._row_span[:batch], scratch, scratch.view(np.uint64),
                self._lens[:batch], (self.block_table[:batch], self.cache_seqlens[:batch]))
        self._views[batch] = view
        return view
