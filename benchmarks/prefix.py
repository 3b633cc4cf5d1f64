"""`kvpager bench prefix`: the host cost of admitting a request through the prefix cache.

The request: a prompt of --prompt-len tokens (8192) whose first --hit tokens (7168) are cached
and whose tail (1024) must be computed. The cache holds what a busy server would: the prefix
was written by a request that has finished (so its pages wait at refcount 0 in the LRU queue and
the hit revives them), --siblings other requests that extended the same prefix differently (the
node where the match ends has that many children to search for a mid-page match), and
--other-prompts unrelated cached prompts. Each timed iteration is one admission:

  admission  (the goal figure) PrefixCache.lookup(keys) [match: one dict probe per cached page
             + bisection among the last node's children; acquire: one reference per hit page]
             + Sequence.from_prefix(hit) [one fresh page for a mid-page hit's copy]
             + seq.reserve(tail) [the tail's pages from the allocator]
and, timed separately (not in the goal figure):
  keys       PrefixKeys(prompt): validating the token ids and keying every full page; O(prompt),
             done once per request when it is submitted, not per admission attempt
  slots      seq.slot_mapping over the tail (the engine builds it for the first prefill chunk;
             the simulator does not)
  commit     PrefixCache.commit after the prefill: the tail's full pages enter the cache
Every iteration's tail is new (its first token is one no cached request has), so each sees
the same hit; the tails it commits stay cached. By default the pool has room for
all of them (allocation takes free pages); with --full-pool the free stack is empty, as on a
busy server, and the tail's pages are evicted from the LRU queue inside the timed admission.

Goal (issue 11): admission <= 50 us for 8k tokens with a 7k hit, on the 2-core CI VM.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import time

from kvpager.allocator import BlockAllocator
from kvpager.prefix_cache import PrefixCache
from kvpager.prefix_keys import PrefixKeys
from kvpager.sequence import Sequence

PAGE_SIZE = 64
PARTS = ("admission", "keys", "slots", "commit")
FIRST_TAIL_TOKEN = 1 << 20  # + iteration: above every random token, so no cached tail matches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--hit", type=int, nargs="+", default=[7168, 7200],
                        help="cached prompt tokens; 7200 ends mid-page (a copied partial page)")
    parser.add_argument("--iters", type=int, default=2000, help="timed admissions per case")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--siblings", type=int, default=64,
                        help="cached requests that extend the prefix with other tokens")
    parser.add_argument("--other-prompts", type=int, default=32,
                        help="unrelated cached prompts of --prompt-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-pool", action="store_true",
                        help="also run with no free page: the tail's pages are evicted")


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 128_000) for _ in range(n)]


def _cache_prompt(cache: PrefixCache, allocator: BlockAllocator, tokens: list[int]) -> None:
    """A request that ran tokens to the end, committed its pages and finished."""
    keys = PrefixKeys(tokens, page_size=PAGE_SIZE)
    seq = Sequence.from_prefix(None, allocator, cache.lookup(keys), PAGE_SIZE)
    seq.reserve(len(tokens) - seq.num_tokens)
    seq.take_pending_copies()
    cache.commit(seq, keys, len(tokens))
    seq.release()


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e6


def bench(prompt_len: int, hit: int, iters: int, warmup: int, siblings: int, other_prompts: int,
          seed: int, full_pool: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each timed part (see the module docstring), one sample per iteration."""
    rng = random.Random(seed)
    pages_per_prompt = -(-prompt_len // PAGE_SIZE)
    tail_pages = pages_per_prompt - hit // PAGE_SIZE
    cached = other_prompts * pages_per_prompt + hit // PAGE_SIZE + siblings * tail_pages
    spare = 0 if full_pool else (warmup + iters) * tail_pages
    allocator = BlockAllocator(cached + spare)
    cache = PrefixCache(allocator, PAGE_SIZE)
    shared = _tokens(rng, hit)
    for _ in range(other_prompts):
        _cache_prompt(cache, allocator, _tokens(rng, prompt_len))
    for _ in range(siblings):  # requests that extended the prefix differently and finished
        _cache_prompt(cache, allocator, shared + _tokens(rng, prompt_len - hit))
    wall, cpu = time.perf_counter, time.thread_time
    times: dict[str, list[float]] = {f"{part}{kind}": [] for part in PARTS for kind in ("", " cpu")}
    gc.collect()
    for i in range(warmup + iters):
        prompt = shared + [FIRST_TAIL_TOKEN + i] + _tokens(rng, prompt_len - hit - 1)
        t0, c0 = wall(), cpu()
        keys = PrefixKeys(prompt, page_size=PAGE_SIZE)
        t1, c1 = wall(), cpu()
        got = cache.lookup(keys)
        seq = Sequence.from_prefix(i, allocator, got, PAGE_SIZE, pages_per_prompt)
        seq.reserve(prompt_len - seq.num_tokens)
        t2, c2 = wall(), cpu()
        seq.slot_mapping(got.num_tokens, prompt_len)
        t3, c3 = wall(), cpu()
        seq.take_pending_copies()
        t4, c4 = wall(), cpu()
        cache.commit(seq, keys, prompt_len)
        t5, c5 = wall(), cpu()
        seq.release()
        if got.num_tokens != hit:
            raise RuntimeError(f"expected a {hit}-token hit, got {got.num_tokens}")
        if i >= warmup:
            for part, dt, dc in (("keys", t1 - t0, c1 - c0), ("admission", t2 - t1, c2 - c1),
                                 ("slots", t3 - t2, c3 - c2), ("commit", t5 - t4, c5 - c4)):
                times[part].append(dt)
                times[f"{part} cpu"].append(dc)
    return times


def run(args: argparse.Namespace) -> int:
    print(f"prefix-cache admission, {args.prompt_len}-token prompt, page {PAGE_SIZE}, "
          f"{args.siblings} sibling branches + {args.other_prompts} other prompts cached, "
          f"{args.iters} iterations, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("wall: perf_counter; cpu: this thread's CPU time (what the code costs when the "
          "machine is shared)")
    print(f"{'hit':>6} {'tail':>6} {'pool':<5} {'part':<10} {'p50 us':>8} {'p99 us':>8} "
          f"{'cpu p50':>8} {'cpu p99':>8}")
    for full_pool in ([False, True] if args.full_pool else [False]):
        for hit in args.hit:
            times = bench(args.prompt_len, hit, args.iters, args.warmup, args.siblings,
                          args.other_prompts, args.seed, full_pool)
            for part in PARTS:
                print(f"{hit:>6} {args.prompt_len - hit:>6} {'full' if full_pool else 'room':<5} "
                      f"{part:<10} {_pct(times[part], 50):8.1f} {_pct(times[part], 99):8.1f} "
                      f"{_pct(times[part + ' cpu'], 50):8.1f} {_pct(times[part + ' cpu'], 99):8.1f}")
    print("goal (issue 11): admission (lookup + Sequence.from_prefix + the tail's pages) <= 50 us "
          "at 8k tokens with a 7k hit; keys is per request (at submit), slots and commit per "
          "prefill")
    return 0
