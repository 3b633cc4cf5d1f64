"""RequestSequence: a request's kvpager Sequence. A request's sequence is never forked, so no
copy-on-write is ever due: skipping that refcount check keeps pages_needed / extend O(1) on the
scheduler's per-request path.

`extend(n)` is Sequence.reserve: it grows the sequence without building a slot tensor (~14 us
even for one token, 7 ms a step at 512 requests); the engine computes decode slots for the whole
batch from the block table in one op and the simulator needs none. The scheduler's decode loop
also inlines the within-page case (up to `Request.cap` tokens, which it sets after each
page-crossing extend), relying on Sequence's documented table_key == (layout_id << 32) |
num_tokens.
"""
from __future__ import annotations

from kvpager.sequence import Sequence


class RequestSequence(Sequence):
    __slots__ = ()

    extend = Sequence.reserve

    def _needs_cow(self) -> bool:
        return False
