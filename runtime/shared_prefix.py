"""Workloads whose requests share content, for simulating prefix caching: synthetic token ids
(`Content`), multi-turn chats, shared system prompts with Zipf popularity, and the Mooncake
trace format.

The simulator stores no tokens, so a request's content is a list of segments (id, length):
token o of a segment with id h is a 64-bit mix of (h, o) cut to 31 bits. Equal ids give equal
tokens (a segment shared by two requests is a shared prefix when it sits at the same place),
different ids differ at every token with probability 1 - 2**-31. Tokens are built on demand, a
range at a time (numpy; PrefixKeys at submit and a page's worth when a page is committed), so
100k-request runs need no per-token storage.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpager.errors import ConfigError, InvalidArgument

MOONCAKE_BLOCK = 512  # tokens per Mooncake hash id
UNIQUE = 1 << 62  # ids from here up are private to one request (trace hash ids stay below)
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, slots=True)
class Content:
    """A request's synthetic tokens: segments ids [k] (uint64) ending at ends [k] (int64,
    increasing; positions past the last end continue its last segment)."""

    ids: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, segments: list[tuple[int, int]]) -> "Content":
        """From (id, length) pairs; zero-length segments are dropped."""
        segments = [(h, n) for h, n in segments if n > 0]
        return cls(np.array([h for h, _ in segments], dtype=np.uint64),
                   np.cumsum([n for _, n in segments], dtype=np.int64))

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids [start, end), int32 in [0, 2**31). O(end - start) numpy."""
        pos = np.arange(start, end, dtype=np.int64)
        seg = np.minimum(np.searchsorted(self.ends, pos, side="right"), len(self.ends) - 1)
        begin = np.where(seg > 0, self.ends[seg - 1], 0)
        with np.errstate(over="ignore"):
            x = self.ids[seg] * _M1 + (pos - begin + 1).astype(np.uint64) * _M2
            x ^= x >> np.uint64(31)
            x *= _M3
            x ^= x >> np.uint64(29)
        return (x & np.uint64(0x7FFFFFFF)).astype(np.int32)


def unique_content(index: int, length: int) -> Content:
    """Content no other request shares (the plain synthetic workload with caching on)."""
    return Content.of([(UNIQUE + 4 * index + 3, length)])


def system_prompts(arrival: np.ndarray, user_len: np.ndarray, output_len: np.ndarray,
                   num_prompts: int, system_len: float, zipf: float, seed: int,
                   max_len: int | None) -> tuple[np.ndarray, list[Content]]:
    """Each request = one of num_prompts system prompts (lengths lognormal around system_len,
    sigma 0.5; the i-th most popular chosen with probability ~ 1 / i**zipf) + its own user
    part + its own output. Returns (prompt_len, content)."""
    if num_prompts < 1 or zipf < 0 or system_len < 1:
        raise ConfigError(f"num_prompts={num_prompts} must be >= 1, zipf={zipf} >= 0 and "
                          f"system_len={system_len} >= 1")
    rng = np.random.default_rng(seed + 1)
    sys_len = np.maximum(1, np.rint(rng.lognormal(np.log(system_len) - 0.125, 0.5, num_prompts)))
    popularity = 1.0 / np.arange(1, num_prompts + 1) ** zipf
    choice = rng.choice(num_prompts, size=len(arrival), p=popularity / popularity.sum())
    prompt = sys_len[choice].astype(np.int64) + user_len
    if max_len is not None:
        prompt = np.minimum(prompt, max_len)
    content = [Content.of([(1 << 40 | int(c), int(sys_len[c])), (UNIQUE + 4 * i, int(u)),
                           (UNIQUE + 4 * i + 1, int(o))])
               for i, (c, u, o) in enumerate(zip(choice, user_len, output_len))]
    return prompt, content


def chats(num_requests: int, rate: float, seed: int, turns: float, think_s: float,
          message_mean: float, output_mean: float, first_mean: float, sigma: float,
          max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Content]]:
    """Multi-turn conversations: turn t's prompt is turn t-1's prompt + its output + a new user
    message, so each turn extends the previous one. Conversations start as a Poisson process
    (rate / turns a second, so requests arrive at ~rate); a conversation has a geometric number
    of turns (mean `turns`), each arriving think_s (exponential mean) after the previous one's
    arrival (open loop). A conversation ends early when its next turn would pass max_len.
    Returns (arrival, prompt_len, output_len, content), sorted by arrival."""
    if turns < 1 or think_s < 0:
        raise ConfigError(f"turns={turns} must be >= 1 and think_s={think_s} >= 0")
    rng = np.random.default_rng(seed)

    def length(mean: float) -> int:
        return max(1, int(round(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))))

    rows, t, conv = [], 0.0, 0
    while len(rows) < num_requests:
        t += rng.exponential(turns / rate)
        when, segments, used = t, [], 0
        for turn in range(int(rng.geometric(1.0 / turns))):
            msg, out = length(first_mean if turn == 0 else message_mean), length(output_mean)
            if used + msg + out > max_len or len(rows) >= num_requests:
                break
            segments.append((1 << 48 | conv << 8 | 2 * turn, msg))
            prompt_len = used + msg
            segments.append((1 << 48 | conv << 8 | 2 * turn + 1, out))
            rows.append((when, prompt_len, out, Content.of(list(segments))))
            used = prompt_len + out
            when += rng.exponential(think_s)
        conv += 1
    rows.sort(key=lambda r: r[0])
    return (np.array([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.int64), [r[3] for r in rows])


def mooncake_rows(rows: list[dict], path: object) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                          list[Content]]:
    """Mooncake trace lines: timestamp (ms), input_length, output_length, hash_ids (one id per
    512-token block of the prompt; equal ids, equal content). Returns (arrival s, prompt_len,
    output_len, content) in file order."""
    arrival, prompt, output, content = [], [], [], []
    for i, r in enumerate(rows):
        try:
            ids = [int(h) for h in r["hash_ids"]]
            n_in, n_out = int(r["input_length"]), int(r["output_length"])
            arrival.append(float(r["timestamp"]) / 1000.0)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"trace {path} line {i + 1}: a Mooncake line needs timestamp "
                                  f"(ms), input_length, output_length and hash_ids (a list of "
                                  f"ints): {exc!r}") from None
        if any(not 0 <= h < UNIQUE for h in ids):
            raise InvalidArgument(f"trace {path} line {i + 1}: hash_ids must be in [0, 2**62)")
        segments = [(h, min(MOONCAKE_BLOCK, n_in - j * MOONCAKE_BLOCK)) for j, h in enumerate(ids)]
        covered = sum(max(n, 0) for _, n in segments)
        segments += [(UNIQUE + 4 * i, n_in - covered), (UNIQUE + 4 * i + 1, n_out)]
        prompt.append(n_in)
        output.append(n_out)
        content.append(Content.of(segments))
    return (np.array(arrival), np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64),
            content)
