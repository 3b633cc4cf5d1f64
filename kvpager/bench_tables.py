"""`kvpager bench tables`: µs per step of BatchTables.update under continuous-batching churn.

Every step a binomial(B, churn) number of sequences finish and as many new ones join (prompt
length uniform in [1, max_len / 2]), then every sequence grows by one token. Only update() is
timed, twice per step on two identical BatchTables: the first call
runs with the caches as the rest of the step left them (`cold`), the second does the same work
right after (`warm`: the code's own cost). Orders: `compact` keeps batch order and appends joiners at the end (rows after a leaver
move up, as with a deque-based scheduler); `stable` puts each joiner in a leaver's slot.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from kvpager.allocator import BlockAllocator
from kvpager.sequence import Sequence
from kvpager.tables import BatchTables

PAGE_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--churn", type=float, default=0.005,
                        help="probability that a sequence finishes in a given step")
    parser.add_argument("--max-len", type=int, default=4096, help="longest sequence, tokens")
    parser.add_argument("--order", choices=["compact", "stable"], nargs="+",
                        default=["compact", "stable"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def bench(batch: int, steps: int, warmup: int, churn: float, max_len: int, order: str,
          device: str, seed: int) -> tuple[list[float], list[float]]:
    """Seconds per update() call: (cold, warm), one each per timed step."""
    rng = random.Random(seed)
    max_pages = -(-max_len // PAGE_SIZE)
    allocator = BlockAllocator(batch * max_pages + 1)
    tables = [BatchTables(batch, max_pages, device, page_size=PAGE_SIZE) for _ in range(2)]
    ids = iter(range(1 << 62))

    def join() -> Sequence:
        seq = Sequence(next(ids), allocator, PAGE_SIZE, max_pages)
        seq.append(rng.randint(1, max_len // 2))
        return seq

    seqs = [join() for _ in range(batch)]
    # Start from a spread of lengths, as in a running server.
    for seq in seqs:
        seq.append(rng.randint(0, max_len // 2 - 1))
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(warmup + steps):
        finished = [i for i, s in enumerate(seqs) if rng.random() < churn or s.num_tokens >= max_len]
        for i in finished:
            seqs[i].release()
        if order == "stable":
            for i in finished:
                seqs[i] = join()
        else:
            gone = set(finished)
            seqs = [s for i, s in enumerate(seqs) if i not in gone]
            seqs.extend(join() for _ in finished)
        for seq in seqs:
            seq.reserve(1)
        for table, out in zip(tables, times):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            table.update(seqs)
            if device != "cpu":
                torch.cuda.synchronize()
            if step >= warmup:
                out.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    print(f"BatchTables.update, churn={args.churn}/seq/step, max_len={args.max_len}, "
          f"device={args.device}, {args.steps} steps")
    print(f"{'B':>5} {'order':>8} {'cache':>6} {'mean us/step':>13} {'p50':>7} {'p99':>7}")
    for batch in args.batch:
        for order in args.order:
            runs = bench(batch, args.steps, args.warmup, args.churn, args.max_len, order,
                         args.device, args.seed)
            for cache, times in zip(("cold", "warm"), runs):
                us = sorted(t * 1e6 for t in times)
                print(f"{batch:>5} {order:>8} {cache:>6} {statistics.fmean(us):>13.1f} "
                      f"{us[len(us) // 2]:>7.1f} {us[int(len(us) * 0.99)]:>7.1f}")
    return 0
