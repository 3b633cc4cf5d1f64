"""`kvpager bench tables`: µs per step of keeping block_table / cache_seqlens current under
continuous-batching churn, with BlockTables' events and with its plain rebuild.

Every step a binomial(B, churn) number of sequences finish and as many new ones join (prompt
length uniform in [1, max_len / 2]), then every sequence grows by one token (Sequence.reserve(1),
untimed: the allocator work is the same for every path), so each crosses a page boundary every
64 steps.

Timed per step: `events`: every leave and join the churn needs, crossing(1), grow(1) with the
new pages of the rows that crossed one, and view() (the row primitives in C++ when
kvpager._block_table is built); `events-py`: the same on the Python twin; `rebuild`: rebuild(seqs)
(every row from its sequence). Each path runs on two identical tables: the first call runs with
the caches as the rest of the step left them (`cold`), the second does the same work right after
(`warm`: the code's own cost). On a GPU (--device cuda) the figure is the host time the step pays
(the queue is idle before each call, the copies it enqueues run on); --sync times until the
device tables are ready instead. Measured figures: docs/foundation.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from kvpager import BlockAllocator, BlockTables, Sequence
from kvpager.block_table import NATIVE_AVAILABLE
from kvpager.cli_args import at_least, nonneg_int, positive_int, probability

PAGE_SIZE = 64
PATHS = ("events", "events-py", "rebuild")
PROGRESS_EVERY = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[64, 256, 512],
                        help="batch sizes to time")
    parser.add_argument("--steps", type=positive_int, default=2000, help="timed steps per batch size")
    parser.add_argument("--warmup", type=nonneg_int, default=200, help="untimed steps first")
    parser.add_argument("--churn", type=probability, default=0.005,
                        help="probability that a sequence finishes in a given step")
    parser.add_argument("--max-len", type=at_least(2, int), default=4096, help="longest sequence, tokens")
    parser.add_argument("--path", choices=PATHS, nargs="+", default=list(PATHS), help="paths to time")
    parser.add_argument("--device", default="cpu", help="where the tables live (cpu, cuda)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="churn and lengths seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--sync", action="store_true",
                        help="on a GPU, time until the device tables are ready (synchronize after "
                             "each call) instead of the host time the step pays")


def bench(batch: int, steps: int, warmup: int, churn: float, max_len: int, path: str,
          device: str, seed: int, sync: bool = False,
          progress: Callable[[int], object] | None = None) -> tuple[list[float], list[float]]:
    """Seconds per step spent keeping the tables current: (cold, warm), one each per timed
    step. path: one of PATHS. progress(n): n more steps done (called every PROGRESS_EVERY
    steps, outside the timed parts)."""
    rng = random.Random(seed)
    max_pages = -(-max_len // PAGE_SIZE)
    allocator = BlockAllocator(batch * max_pages + 1)
    native = {"events": None, "events-py": False, "rebuild": None}[path]
    tables = [BlockTables(batch, max_pages, device, PAGE_SIZE, native) for _ in range(2)]
    ids = iter(range(1 << 62))

    def join() -> Sequence:
        seq = Sequence(next(ids), allocator, PAGE_SIZE, max_pages)
        seq.reserve(rng.randint(1, max_len // 2))
        return seq

    seqs = [join() for _ in range(batch)]
    for seq in seqs:  # start from a spread of lengths, as in a running server
        seq.reserve(rng.randint(0, max_len // 2 - 1))
    for table in tables:
        table.rebuild(seqs)
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(warmup + steps):
        finished = [s for s in seqs if rng.random() < churn or s.num_tokens >= max_len]
        for seq in finished:
            seq.release()
            seqs.remove(seq)
        joined = [join() for _ in finished]
        seqs.extend(joined)
        spent = [0.0, 0.0]
        if path != "rebuild":  # the caller reports leaves and joins as it schedules them
            for k, table in enumerate(tables):
                t0 = time.perf_counter()
                for seq in finished:
                    table.leave(seq)
                for seq in joined:
                    table.join(seq, seq.pages, seq.num_tokens)
                spent[k] = time.perf_counter() - t0
        for seq in seqs:
            seq.reserve(1)
        total = sum(s.num_tokens for s in seqs)
        for k, table in enumerate(tables):
            if device != "cpu":
                torch.cuda.synchronize()  # an idle queue, as after the step's sampling
            t0 = time.perf_counter()
            if path == "rebuild":
                table.rebuild(seqs)
            else:
                table.grow(1, total, [(s, s.pages[held:]) for s, held in table.crossing(1)])
                table.view()
            if sync:
                torch.cuda.synchronize()
            spent[k] += time.perf_counter() - t0
        if step >= warmup:
            for out, t in zip(times, spent):
                out.append(t)
        if progress is not None and (step + 1) % PROGRESS_EVERY == 0:
            progress(PROGRESS_EVERY)
    if progress is not None:
        progress((warmup + steps) % PROGRESS_EVERY)
    return times


def run(args: argparse.Namespace) -> int:
    print(f"block_table / cache_seqlens per step, churn={args.churn}/seq/step, "
          f"max_len={args.max_len}, device={args.device}, {args.steps} steps; row primitives: "
          f"{'C++ (kvpager._block_table)' if NATIVE_AVAILABLE else 'Python (C++ not built)'}"
          + ("" if args.device == "cpu" else
             "; until the device tables are ready" if args.sync else "; host time (no sync)"))
    print(f"{'B':>5} {'cache':>6} {'mean us/step':>13} {'p50':>7} {'p99':>7}  path")
    paths = [p for p in args.path if p != "events-py" or NATIVE_AVAILABLE]
    total = len(args.batch) * len(paths) * (args.warmup + args.steps)
    # The bar goes to stderr and is cleared when done: stdout keeps only the table.
    with tqdm(total=total, unit="step", desc="bench tables", leave=False,
              disable=args.no_progress, mininterval=0.5) as bar:
        for batch in args.batch:
            for path in paths:
                bar.set_postfix_str(f"B={batch} {path}", refresh=False)
                times = bench(batch, args.steps, args.warmup, args.churn, args.max_len, path,
                              args.device, args.seed, args.sync, bar.update)
                for cache, ts in zip(("cold", "warm"), times):
                    us = sorted(t * 1e6 for t in ts)
                    bar.write(f"{batch:>5} {cache:>6} {statistics.fmean(us):>13.1f} "
                              f"{us[len(us) // 2]:>7.1f} {us[int(len(us) * 0.99)]:>7.1f}  {path}",
                              file=sys.stdout)
    return 0
