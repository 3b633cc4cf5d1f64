"""`kvpager bench tables`: µs per step of keeping block_table / cache_seqlens current under
continuous-batching churn, for BatchTables.update(seqs) and for the EventTables event path.

Every step a binomial(B, churn) number of sequences finish and as many new ones join (prompt
length uniform in [1, max_len / 2]), then every sequence grows by one token (Sequence.reserve(1),
untimed: the allocator work is the same for both paths), so each crosses a page boundary every 64
steps. Orders: `compact` keeps batch order and appends joiners at the end (rows after a leaver
move up, as with a deque-based scheduler); `stable` puts each joiner in a leaver's slot; `swap`
moves the last row into a leaver's slot and appends joiners (the EventTables contract).

Timed per step: `update` path: the update(seqs) call. `events` path (swap order only): every
leave(row) and join(seq) the churn needs, then grow(1) and view(); it runs join/leave/grow in C++
when kvpager._row_events is built, and `events-py` times the same events on the Python path.
Each path runs on two identical tables: the first call runs with the caches as the rest of the
step left them (`cold`), the second does the same work right after (`warm`: the code's own cost).
On a GPU (--device cuda) the figure is the host time the step pays (the queue is idle before each
call, the copies it enqueues run on); --sync times until the device tables are ready instead.
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

from kvpager.cli_args import at_least, nonneg_int, positive_int, probability

from kvpager.allocator import BlockAllocator
from kvpager.sequence import Sequence
from kvpager.table_events import NATIVE_AVAILABLE, EventTables
from kvpager.tables import BatchTables

PAGE_SIZE = 64
PROGRESS_EVERY = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[64, 256, 512],
                        help="batch sizes to time")
    parser.add_argument("--steps", type=positive_int, default=2000, help="timed steps per batch size")
    parser.add_argument("--warmup", type=nonneg_int, default=200, help="untimed steps first")
    parser.add_argument("--churn", type=probability, default=0.005,
                        help="probability that a sequence finishes in a given step")
    parser.add_argument("--max-len", type=at_least(2, int), default=4096, help="longest sequence, tokens")
    parser.add_argument("--order", choices=["compact", "stable", "swap"], nargs="+",
                        default=["compact", "stable", "swap"],
                        help="update() runs every order; the event path runs with swap")
    parser.add_argument("--device", default="cpu", help="where the tables live (cpu, cuda)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="churn and lengths seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--sync", action="store_true",
                        help="on a GPU, time until the device tables are ready (synchronize after "
                             "each call) instead of the host time the step pays")


def bench(batch: int, steps: int, warmup: int, churn: float, max_len: int, order: str,
          path: str, device: str, seed: int, sync: bool = False,
          progress: Callable[[int], object] | None = None) -> tuple[list[float], list[float]]:
    """Seconds per step spent keeping the tables current: (cold, warm), one each per timed
    step. path: "update", "events" or "events-py" (swap order only). progress(n): n more steps
    done (called every PROGRESS_EVERY steps, outside the timed parts)."""
    rng = random.Random(seed)
    max_pages = -(-max_len // PAGE_SIZE)
    allocator = BlockAllocator(batch * max_pages + 1)
    if path == "update":
        tables = [BatchTables(batch, max_pages, device, PAGE_SIZE) for _ in range(2)]
    else:
        native = None if path == "events" else False
        tables = [EventTables(batch, max_pages, device, PAGE_SIZE, native) for _ in range(2)]
    events = path != "update"
    ids = iter(range(1 << 62))

    def join() -> Sequence:
        seq = Sequence(next(ids), allocator, PAGE_SIZE, max_pages)
        seq.append(rng.randint(1, max_len // 2))
        return seq

    seqs = [join() for _ in range(batch)]
    # Start from a spread of lengths, as in a running server.
    for seq in seqs:
        seq.append(rng.randint(0, max_len // 2 - 1))
    if events:
        for table in tables:
            for seq in seqs:
                table.join(seq)
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(warmup + steps):
        finished = [i for i, s in enumerate(seqs) if rng.random() < churn or s.num_tokens >= max_len]
        for i in finished:
            seqs[i].release()
        joined = []
        if order == "stable":
            for i in finished:
                seqs[i] = join()
        elif order == "compact":
            gone = set(finished)
            seqs = [s for i, s in enumerate(seqs) if i not in gone]
            seqs.extend(join() for _ in finished)
        else:  # swap: highest row first, so a row that moves never is a leaver
            finished.reverse()
            for i in finished:
                last = seqs.pop()
                if i < len(seqs):
                    seqs[i] = last
            joined = [join() for _ in finished]
            seqs.extend(joined)
        spent = [0.0, 0.0]
        if events:  # the caller reports leaves and joins as it schedules them
            for k, table in enumerate(tables):
                t0 = time.perf_counter()
                for i in finished:
                    table.leave(i)
                for seq in joined:
                    table.join(seq)
                spent[k] = time.perf_counter() - t0
        for seq in seqs:
            seq.reserve(1)
        for k, table in enumerate(tables):
            if device != "cpu":
                torch.cuda.synchronize()  # an idle queue, as after the step's sampling
            t0 = time.perf_counter()
            if events:
                table.grow(1)
                table.view()
            else:
                table.update(seqs)
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
          f"max_len={args.max_len}, device={args.device}, {args.steps} steps; events path: "
          f"{'C++ (kvpager._row_events)' if NATIVE_AVAILABLE else 'Python (C++ module not built)'}"
          + ("" if args.device == "cpu" else
             "; until the device tables are ready" if args.sync else "; host time (no sync)"))
    print(f"{'B':>5} {'order':>8} {'cache':>6} {'mean us/step':>13} {'p50':>7} {'p99':>7}  path")
    runs = [(order, "update") for order in args.order]
    if "swap" in args.order:
        runs += [("swap", "events")] + ([("swap", "events-py")] if NATIVE_AVAILABLE else [])
    total = len(args.batch) * len(runs) * (args.warmup + args.steps)
    # The bar goes to stderr and is cleared when done: stdout keeps only the table.
    with tqdm(total=total, unit="step", desc="bench tables", leave=False,
              disable=args.no_progress, mininterval=0.5) as bar:
        for batch in args.batch:
            for order, path in runs:
                bar.set_postfix_str(f"B={batch} {order} {path}", refresh=False)
                times = bench(batch, args.steps, args.warmup, args.churn, args.max_len, order,
                              path, args.device, args.seed, args.sync, bar.update)
                for cache, ts in zip(("cold", "warm"), times):
                    us = sorted(t * 1e6 for t in ts)
                    bar.write(f"{batch:>5} {order:>8} {cache:>6} {statistics.fmean(us):>13.1f} "
                              f"{us[len(us) // 2]:>7.1f} {us[int(len(us) * 0.99)]:>7.1f}  {path}",
                              file=sys.stdout)
    return 0
