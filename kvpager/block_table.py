"""BlockTables: the kernel's block_table and cache_seqlens for a batch, kept by events.

A page id's path: Sequence.reserve allocates it; the owner of the sequence reports it here
(join / append_pages, keyed by a handle the owner chooses); view() hands block_table and
cache_seqlens to the device (TableUpload on a GPU); kvpager.mla reads them. The tables never
read a Sequence except in rebuild() and check(), the plain paths.
"""
from __future__ import annotations

import operator
from collections.abc import Hashable, Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvpager.errors import BatchFull, InvalidArgument, NoSuchRow, SequenceTooLong, TablesOutOfSync
from kvpager.table_upload import TableUpload

if TYPE_CHECKING:
    from kvpager.sequence import Sequence

from kvpager.block_table_rows import PAD_PAGE, PyRows

try:  # the row primitives in C++ (kvpager/csrc/block_table.cpp); optional, same results
    from kvpager._block_table import Rows as NativeRows
except ImportError:
    NativeRows = None

NATIVE_AVAILABLE = NativeRows is not None
"""Whether the C++ row primitives were built (pip builds them wherever a C++ compiler exists)."""


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor,
                 page_size: int) -> torch.Tensor:
    """Cache slot (page * page_size + offset) of each position: int64, positions' shape.
    block_table int32 [b, max_pages], positions int64 [b, s] (token indices of row b's sequence).
    One gather on block_table's device."""
    return block_table.long().gather(1, positions // page_size) * page_size + positions % page_size


class BlockTables:
    """block_table int32 [max_batch, max_pages] and cache_seqlens int32 [max_batch]; rows 0..B-1
    are in use, one per handle (any hashable the caller owns: a request, a sequence).

    Events carry their data and check it before changing anything (errors change nothing):
      join(handle, page_ids, num_tokens) -> row: the handle takes row B.
      append_pages(handle, page_ids, start=None): the handle's sequence gained pages (start <
        the pages held: entries from start were replaced, e.g. copy-on-write).
      grow(n, total_tokens, new_pages=()): every row grew by n tokens (or n[r] per row), the
        rows crossing(n) lists with the page ids they gained; total_tokens is the rows' sum
        after it, which the tables check, so a grow no Sequence.reserve made is refused.
      leave(handle): the last row moves into the gap (so rows stay dense).
      rebuild(seqs, handles=None): every row from scratch (the plain path; also how a caller
        re-derives the tables after a failure).
    Reads: view(), handles (row order), row(handle), crossing(n), check().

    Invariants, for row r < B whose handle's sequence is s:
      cache_seqlens[r] == s.num_tokens <= pages[r] * page_size;
      block_table[r, :pages[r]] == s.pages, and entries past them hold PAD_PAGE;
      total == sum(cache_seqlens[:B]).
    Cost: join / append_pages O(pages given), leave O(pages moved), grow and crossing one pass
    over [B]; no event reads a Sequence. The row primitives run in C++ when built (native=None
    picks them; False forces the Python twin, which gives bit-identical buffers).
    """

    def __init__(self, max_batch: int, max_pages: int, device: torch.device | str = "cpu",
                 page_size: int = 64, native: bool | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_pages", max_pages),
                            ("page_size", page_size)):
            if operator.index(value) < 1:
                raise InvalidArgument(f"{name}={value} must be >= 1")
        if max_pages * page_size >= 2**31:
            raise InvalidArgument(f"max_pages * page_size = {max_pages * page_size} tokens does "
                                  f"not fit cache_seqlens' int32; lower max_pages")
        if native and not NATIVE_AVAILABLE:
            raise InvalidArgument("native=True but kvpager._block_table was not built; reinstall "
                                  "kvpager where a C++ compiler is available, or pass native=None")
        self.max_batch, self.max_pages, self.page_size = max_batch, max_pages, page_size
        self._max_tokens = max_pages * page_size
        self.device = torch.device(device)
        self._table = np.full((max_batch, max_pages), PAD_PAGE, dtype=np.int32)
        self._lens = np.zeros(max_batch, dtype=np.int32)
        self._pages = np.zeros(max_batch, dtype=np.int32)  # page ids written per row
        self._dirty = np.zeros(max_batch, dtype=np.uint8)  # rows to upload at the next view()
        # Row order and handle -> row: the row primitives hold these two (never rebound).
        self._handles: list[Hashable] = []
        self._row: dict[Hashable, int] = {}
        self._total = 0
        self._lens_mv, self._pages_mv = memoryview(self._lens), memoryview(self._pages)
        buffers = (self._table, self._lens, self._pages, self._dirty)
        if native is not False and NATIVE_AVAILABLE:
            # Addresses of buffers this object keeps alive and never rebinds.
            self._rows = NativeRows(*(b.ctypes.data for b in buffers), max_batch, max_pages,
                                    page_size, self._handles, self._row)
        else:
            self._rows = PyRows(*buffers, page_size, self._handles, self._row)
        self.native = not isinstance(self._rows, PyRows)
        self.block_table, self.cache_seqlens = torch.from_numpy(self._table), \
            torch.from_numpy(self._lens)
        self._upload = None
        if self.device.type != "cpu":
            self.block_table = self.block_table.to(self.device)
            self._upload = TableUpload(max_batch, max_pages, self.device, self.cache_seqlens)
            self.cache_seqlens = self._upload.cache_seqlens
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- reads ---------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self._handles)

    @property
    def handles(self) -> list[Hashable]:
        """The handles in row order (the batch order of view()). Do not mutate; copy it to
        iterate while events may change the rows."""
        return self._handles

    def __contains__(self, handle: Hashable) -> bool:
        return handle in self._row

    def row(self, handle: Hashable) -> int:
        """The row holding `handle`'s sequence; it changes when another row leaves."""
        try:
            return self._row[handle]
        except (KeyError, TypeError):  # TypeError: unhashable, so never joined
            raise NoSuchRow(f"{handle!r} holds no row in these tables; join() it first") from None

    def crossing(self, n: int | Seq[int]) -> list[tuple[Hashable, int]]:
        """(handle, pages held) of the rows whose next n tokens (n[r] for row r) need page ids
        the tables do not hold: pass them to grow(n, ..., new_pages). One pass over [B]."""
        if type(n) is int and 0 <= n <= self._max_tokens:
            return self._rows.crossing(n, None, len(self._handles))
        return self._rows.crossing(*self._growth(n), len(self._handles))

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table int32 [B, max_pages], cache_seqlens int32 [B]) on the device: views of
        persistent buffers, valid until the next event. CPU: the host buffers, no copy. GPU:
        one packed H2D copy of cache_seqlens and the rows changed since the last view(), plus
        one scatter, enqueued on the current stream (TableUpload)."""
        batch = len(self._handles)
        result = self._views.get(batch)
        if result is None:
            result = self._views[batch] = (self.block_table[:batch], self.cache_seqlens[:batch])
        if self._upload is not None:
            self._upload.upload(batch, self._lens, self._table, self._dirty, self.block_table)
        return result

    # --- events --------------------------------------------------------------------------------
    def join(self, handle: Hashable, page_ids: Seq[int], num_tokens: int) -> int:
        """Give `handle` row B holding page_ids and num_tokens; returns B. O(len(page_ids)).
        Raises BatchFull, InvalidArgument (handle already in, bad ids or length) or
        SequenceTooLong (more than max_pages ids)."""
        row = len(self._handles)
        if not isinstance(handle, Hashable):
            raise InvalidArgument(f"handle {handle!r} is not hashable; use the request or an id")
        if handle in self._row:
            raise InvalidArgument(f"{handle!r} already holds row {self._row[handle]}; leave() it "
                                  f"first or use append_pages()")
        if row == self.max_batch:
            raise BatchFull(f"cannot join {handle!r}: all max_batch={self.max_batch} rows are "
                            f"taken; leave() one first or build with a larger max_batch")
        count = self._check_pages(handle, len(page_ids))
        if type(num_tokens) is not int or not 0 <= num_tokens <= count * self.page_size:
            raise InvalidArgument(f"{handle!r}: num_tokens={num_tokens!r} must be an int in "
                                  f"[0, {count} pages * {self.page_size}]")
        self._write(handle, row, page_ids, 0, num_tokens)
        self._handles.append(handle)
        self._row[handle] = row
        self._total += num_tokens
        return row

    def append_pages(self, handle: Hashable, page_ids: Seq[int], start: int | None = None) -> None:
        """The handle's sequence now holds page_ids at entries [start, start + len(page_ids))
        and no more: new pages (start=None: after those held) or, with start < the pages held,
        replaced ones (copy-on-write of the last page). O(len(page_ids))."""
        row = self.row(handle)
        held = self._pages_mv[row]
        start = held if start is None else start
        if type(start) is not int or not 0 <= start <= held:
            raise InvalidArgument(f"append_pages({handle!r}, start={start!r}): start must be an "
                                  f"int in [0, {held}] (the pages the row holds)")
        end = self._check_pages(handle, start + len(page_ids))
        if self._lens_mv[row] > end * self.page_size:
            raise InvalidArgument(f"{handle!r} holds {self._lens_mv[row]} tokens: {end} pages "
                                  f"are too few")
        self._write(handle, row, page_ids, start, -1)

    def grow(self, n: int | Seq[int], total_tokens: int,
             new_pages: Iterable[tuple[Hashable, Seq[int]]] = ()) -> None:
        """Every row grew by n tokens (n[r] for row r, in row order), after the sequences
        reserved them. new_pages: (handle, page ids) of the rows whose sequences gained pages
        (crossing(n) lists them), appended first. total_tokens: the rows' tokens after the
        growth (the sum of their sequences' num_tokens), which the tables check. Raises
        InvalidArgument (a row lacks pages, bad ids or n), SequenceTooLong, NoSuchRow or
        TablesOutOfSync (total_tokens disagrees: a grow no Sequence.reserve made), with nothing
        changed. One pass over [B] plus the new ids."""
        batch = len(self._handles)
        if type(n) is int and 0 <= n <= self._max_tokens:
            step, per_row, after = n, None, self._total + n * batch
        else:
            step, per_row = self._growth(n)
            after = self._total + (step * batch if per_row is None else int(per_row.sum()))
        if after != total_tokens:
            raise TablesOutOfSync(
                f"grow: the rows would hold {after} tokens but total_tokens={total_tokens!r}; "
                f"reserve the tokens on every row's sequence first and pass the sum of their "
                f"num_tokens")
        new_pages = new_pages if type(new_pages) is list else list(new_pages)
        bad = self._rows.grow(step, per_row, batch, new_pages)
        if bad != -1:
            self._grow_error(bad, new_pages)
        self._total = after

    def _grow_error(self, bad: int, new_pages: list) -> None:
        """Raise what grow's primitive refused: a row short of pages (bad >= 0), or new_pages
        themselves (checked again here, in Python, to name the problem)."""
        if bad >= 0:
            raise InvalidArgument(
                f"grow: row {bad} ({self._handles[bad]!r}) would hold more tokens than its "
                f"{self._pages_mv[bad]} pages; pass its new pages (crossing(n) lists the rows)")
        rows = set()
        for pair in new_pages:
            try:
                handle, page_ids = pair
                count = len(page_ids)
            except (TypeError, ValueError):
                raise InvalidArgument(f"grow: new_pages holds {pair!r}; it takes (handle, page "
                                      f"ids) pairs") from None
            row = self.row(handle)
            self._check_pages(handle, self._pages_mv[row] + count)
            if row in rows:
                raise InvalidArgument(f"grow: new_pages lists {handle!r} twice")
            rows.add(row)
        raise InvalidArgument(f"grow: page ids must be ints in [0, 2**31), got {new_pages!r}")

    def leave(self, handle: Hashable) -> None:
        """Drop `handle`'s row; the last row moves into the gap. O(pages moved)."""
        row = self.row(handle)
        handles = self._handles
        last = len(handles) - 1
        self._total -= self._lens_mv[row]
        if row != last:
            self._rows.move(last, row)
            moved = handles[row] = handles[last]
            self._row[moved] = row
        handles.pop()
        del self._row[handle]

    def rebuild(self, seqs: Seq[Sequence], handles: Seq[Hashable] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..len(seqs)-1 from the sequences (handles: one per sequence, default the
        sequences themselves), then view(). O(sum of pages). Raises InvalidArgument or
        SequenceTooLong before changing anything."""
        handles = list(seqs) if handles is None else list(handles)
        if len(handles) != len(seqs) or len(set(handles)) != len(handles):
            raise InvalidArgument(f"rebuild needs one distinct handle per sequence: "
                                  f"{len(seqs)} sequences, {len(set(handles))} distinct handles")
        if len(seqs) > self.max_batch:
            raise InvalidArgument(f"batch of {len(seqs)} sequences exceeds "
                                  f"max_batch={self.max_batch}")
        for seq in seqs:
            if seq.page_size != self.page_size:
                raise InvalidArgument(f"sequence {seq.seq_id!r} has page_size={seq.page_size} "
                                      f"but the tables use {self.page_size}")
            self._check_pages(seq.seq_id, seq.num_pages)
        self._handles.clear()
        self._row.clear()
        self._total = 0
        for seq, handle in zip(seqs, handles):
            self.join(handle, seq.pages, seq.num_tokens)
        return self.view()

    def check(self, seqs: Seq[Sequence], handles: Iterable[Hashable] | None = None) -> None:
        """Raise TablesOutOfSync unless row r holds handles[r] (default seqs[r]) and seqs[r]'s
        pages and num_tokens. O(B * pages); for tests and debugging."""
        handles = list(seqs) if handles is None else list(handles)
        if [id(h) for h in handles] != [id(h) for h in self._handles]:
            raise TablesOutOfSync(f"rows hold {self._handles} but the batch is {handles}")
        for row, seq in enumerate(seqs):
            n = seq.num_pages
            if (self._lens[row] != seq.num_tokens or self._pages[row] != n
                    or self._table[row, :n].tolist() != seq.pages):
                raise TablesOutOfSync(
                    f"row {row} ({handles[row]!r}): tables hold {int(self._lens[row])} tokens, "
                    f"pages {self._table[row, :self._pages[row]].tolist()}; the sequence has "
                    f"{seq.num_tokens}, {seq.pages}. An event was missed")
        if self._total != int(self._lens[:len(seqs)].sum()):
            raise TablesOutOfSync(f"total {self._total} != sum of cache_seqlens (a tables bug)")

    # --- helpers -------------------------------------------------------------------------------
    def _check_pages(self, handle: Hashable, count: int) -> int:
        if count > self.max_pages:
            raise SequenceTooLong(
                f"{handle!r} needs {count} pages but the table holds max_pages={self.max_pages}; "
                f"build the tables with a larger max_pages or give sequences "
                f"max_pages={self.max_pages}")
        return count

    def _write(self, handle: Hashable, row: int, page_ids: Seq[int], start: int,
               num_tokens: int) -> None:
        if not self._rows.write(row, page_ids, start, num_tokens):
            raise InvalidArgument(f"{handle!r}: page ids must be ints in [0, 2**31), got "
                                  f"{list(page_ids)!r}")

    def _growth(self, n: int | Seq[int]) -> tuple[int, np.ndarray | None]:
        """(n, None) for one n for every row, or (0, int64 [B]) for one n per row; checked."""
        if type(n) is not int:
            try:
                n = operator.index(n)
            except TypeError:
                per_row = np.asarray(n)
                per_row = per_row.astype(np.int64) if per_row.size == 0 else per_row
                if per_row.shape != (len(self._handles),) or per_row.dtype.kind not in "iu" or (
                        per_row.size and per_row.min() < 0):
                    raise InvalidArgument(f"per-row growth must be {len(self._handles)} ints "
                                          f">= 0 (one per row), got {n!r}") from None
                return 0, per_row.astype(np.int64)
        if not 0 <= n <= self._max_tokens:
            raise InvalidArgument(f"grow(n={n}): n must be in [0, max_pages * page_size = "
                                  f"{self._max_tokens}]")
        return n, None
