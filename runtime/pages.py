"""RequestSequence: kvpager's Sequence plus `extend(n)`, an append that builds no slot tensor.

Sequence.append(n) returns the slot mapping as a tensor, ~14 us even for n = 1; at 512 running
requests that alone would be 7 ms a step. The engine computes decode slots for the whole batch
from the block table in one op, and the simulator needs no slots at all, so both grow sequences
with `extend`, which costs a few attribute updates (plus one allocate() at a page boundary).

It relies on two documented facts of kvpager.sequence.Sequence: table_key ==
(layout_id << 32) | num_tokens, and appending without copy-on-write keeps the layout. The
runtime never forks a request's sequence, so no copy-on-write is ever due.
TODO(foundation): replace with Sequence.append(n, slots=False) once it exists.
"""
from __future__ import annotations

from kvpager.errors import OutOfPages, SequenceTooLong
from kvpager.sequence import Sequence


class RequestSequence(Sequence):
    __slots__ = ()

    def pages_needed(self, n: int) -> int:
        """Pages extend(n) / append(n) would allocate (no copy-on-write: never forked). O(1)."""
        return (self.num_tokens + n + self.page_size - 1) // self.page_size - len(self.pages)

    def extend(self, n: int) -> None:
        """Grow by n >= 0 tokens, allocating pages past the last one; OutOfPages or
        SequenceTooLong leave it unchanged. O(1) + O(new pages)."""
        total = self.num_tokens + n
        have = len(self.pages)
        ps = self.page_size
        if total > have * ps:
            need = (total + ps - 1) // ps
            if self.max_pages is not None and need > self.max_pages:
                raise SequenceTooLong(
                    f"sequence {self.seq_id!r}: {total} tokens need {need} pages but its table "
                    f"row holds {self.max_pages}; raise max_model_len")
            if need - have > self.allocator.num_free:
                raise OutOfPages(need - have, self.allocator.num_free)
            self.pages += self.allocator.allocate(need - have)
        self.num_tokens = total
        self.table_key += n
