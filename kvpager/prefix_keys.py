"""PrefixKeys: one request's token ids in the form the prefix cache matches on, validated once.

A page's key is the raw bytes of its page_size token ids (int32, 4 bytes a token: every
vocabulary fits, and half the bytes to compare and keep per cached page of int64). bytes keep
their hash once computed and compare with memcmp, so after the one-off O(tokens) build a lookup
costs one dict probe per page, and equal keys mean equal token ids: no hash collision can alias
two contents. The tokens before a page are not in its key: the cache keys each page under its
parent page's node (a chain), so a key is (parent, own tokens).
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceList

import numpy as np

from kvpager.errors import InvalidArgument

TOKEN_BYTES = 4  # int32 token ids
MAX_TOKEN_ID = 2**31 - 1
_EXTRA_KEY_TYPES = (str, int, bytes)


class PrefixKeys:
    """token_ids: list | tuple | 1-D integer numpy array of ids in [0, 2**31); extra_keys: a tuple of
    str / int / bytes values that must also match (e.g. ('lora-7',) for an adapter), () for none.

    Attributes: `page_size`; `extra_keys` (tuple); `page_keys[i]`: key of full page i (bytes of
    tokens [i * page_size, (i + 1) * page_size)). `append()` adds tokens as a request generates
    them. The commit cursor (`_node`, `_num_committed`: the cache node of the last page
    committed, and how many pages are done) belongs to PrefixCache.commit / acquire.

    Build: O(tokens) (numpy validation + one bytes copy + one hash per full page), about
    0.3 ms for 8k tokens; do it once per request (at submit), not per admission attempt.
    Raises InvalidArgument naming the bad value, with nothing built.
    """

    __slots__ = ("page_size", "extra_keys", "page_keys", "_buf", "_node", "_num_committed")

    def __init__(self, token_ids: SequenceList[int] | np.ndarray, extra_keys: tuple = (),
                 page_size: int = 64) -> None:
        if type(page_size) is not int or page_size < 1:
            raise InvalidArgument(f"page_size={page_size!r} must be an int >= 1")
        self.page_size = page_size
        self.extra_keys = check_extra_keys(extra_keys)
        self._buf = bytearray(_token_bytes(token_ids))
        self.page_keys: list[bytes] = []
        self._node = None
        self._num_committed = 0
        self._add_page_keys()

    @property
    def num_tokens(self) -> int:
        return len(self._buf) // TOKEN_BYTES

    @property
    def num_full_pages(self) -> int:
        return len(self.page_keys)

    def append(self, token_ids: SequenceList[int] | np.ndarray) -> None:
        """Add tokens (e.g. the ones a request just generated); keys the pages they complete.
        O(new tokens). Raises InvalidArgument with nothing changed."""
        self._buf += _token_bytes(token_ids)
        self._add_page_keys()

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Token ids [start, end) as ints (for checks and messages; not a hot path)."""
        end = self.num_tokens if end is None else end
        raw = bytes(self._buf[start * TOKEN_BYTES:end * TOKEN_BYTES])
        return np.frombuffer(raw, dtype="<i4").tolist()

    def token_bytes(self, start: int, end: int) -> bytes:
        """Key bytes of tokens [start, end)."""
        return bytes(self._buf[start * TOKEN_BYTES:end * TOKEN_BYTES])

    def copy(self) -> "PrefixKeys":
        """An independent copy (for a forked sequence): same tokens and commit cursor."""
        twin = PrefixKeys.__new__(PrefixKeys)
        twin.page_size, twin.extra_keys = self.page_size, self.extra_keys
        twin._buf, twin.page_keys = bytearray(self._buf), list(self.page_keys)
        twin._node, twin._num_committed = self._node, self._num_committed
        return twin

    def _add_page_keys(self) -> None:
        width = self.page_size * TOKEN_BYTES
        buf, keys = self._buf, self.page_keys
        for start in range(len(keys) * width, len(buf) - width + 1, width):
            key = bytes(buf[start:start + width])
            hash(key)  # computed once here, kept by the bytes object for every later probe
            keys.append(key)


def check_extra_keys(extra_keys: object) -> tuple:
    """extra_keys as a tuple of str / int / bytes, or InvalidArgument naming the bad value."""
    if extra_keys is None:
        return ()
    if type(extra_keys) is not tuple:
        raise InvalidArgument(f"extra_keys={extra_keys!r} must be a tuple of str / int / bytes, "
                              f"e.g. ('lora-7',); use () for none")
    for key in extra_keys:
        if type(key) not in _EXTRA_KEY_TYPES:
            raise InvalidArgument(f"extra key {key!r} of type {type(key).__name__} is not a str, "
                                  f"int or bytes; pass e.g. the adapter's name or id")
    return extra_keys


def _token_bytes(token_ids: object) -> bytes:
    """Validated token ids as int32 bytes. One numpy conversion: O(n) in C, no Python loop
    except to name the bad element of a bad list."""
    if not isinstance(token_ids, (list, tuple, np.ndarray)):
        raise InvalidArgument(f"token ids must be a list, tuple or 1-D integer numpy array, got "
                              f"{type(token_ids).__name__}; pass e.g. tensor.tolist()")
    if len(token_ids) == 0:
        return b""
    try:
        arr = np.asarray(token_ids)
    except (ValueError, TypeError):  # ragged nesting
        arr = np.asarray(token_ids, dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        bad = next((i for i, t in enumerate(token_ids)
                    if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
        where = f"token_ids[{bad}] = {token_ids[bad]!r}" if bad is not None else \
            f"an array of dtype {arr.dtype} and shape {arr.shape}"
        raise InvalidArgument(f"token ids must be non-negative ints; got {where}")
    if arr.dtype.kind == "i" and arr.min() < 0:
        bad = int(np.argmax(arr < 0))
        raise InvalidArgument(f"token ids must be >= 0; token_ids[{bad}] = {int(arr[bad])}")
    if arr.max() > MAX_TOKEN_ID:
        bad = int(np.argmax(arr > MAX_TOKEN_ID))
        raise InvalidArgument(f"token ids must be < 2**31 (a vocabulary index); token_ids[{bad}]"
                              f" = {int(arr[bad])}")
    return arr.astype("<i4", copy=False).tobytes()
