"""`kvpager bench scheduler`: CPU cost per decode step of the runtime's bookkeeping at a full
batch — scheduler.schedule() (page appends included), BatchTables.update() (block_table +
cache_seqlens) and the per-request step update (tokens, finish checks, metrics) — with the cost
model standing in for the model, so no model compute is counted. Goal: <= 200 us at 512.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kvpager.tables import BatchTables
from kvpager.runtime.scheduler import SchedulerConfig
from kvpager.runtime.simulator import Simulator
from kvpager.runtime.workload import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=512, help="running requests (default 512)")
    parser.add_argument("--steps", type=int, default=2000, help="timed decode steps (default 2000)")
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--mtp", type=int, default=0, help="draft tokens per step (s_q = 1 + mtp)")


def measure(batch: int = 512, steps: int = 2000, prompt_len: int = 1000, mtp: int = 0) -> dict:
    """Per-step seconds (lists) of schedule, tables and update, after every request is decoding."""
    s_q = 1 + mtp
    max_len = prompt_len + (steps + 16) * s_q + 64
    workload = Workload(np.zeros(batch), np.full(batch, prompt_len, dtype=np.int64),
                        np.full(batch, max_len - prompt_len - s_q, dtype=np.int64))
    config = SchedulerConfig(max_batch_size=batch, max_num_batched_tokens=max(batch * s_q, 8192),
                             num_speculative_tokens=mtp, max_model_len=max_len)
    pages_per_seq = -(-max_len // 64) + 1
    sim = Simulator(workload, batch * pages_per_seq, config)
    tables = BatchTables(batch, sim.scheduler.max_pages)
    for i in range(batch):
        sim._submit(i, 0.0, prompt_len, int(workload.output_len[i]))
    sched = sim.scheduler
    while len(sched.running) < batch or any(r.num_computed < r.num_prefill for r in sched.running):
        sim._advance(sched.schedule())  # prefill everything first
    times: dict[str, list[float]] = {"schedule": [], "tables": [], "update": [], "total": []}
    clock = time.perf_counter
    for _ in range(steps):
        t0 = clock()
        plan = sched.schedule()
        t1 = clock()
        tables.update([r.seq for r in plan.decode])
        t2 = clock()
        sim._advance(plan)
        t3 = clock()
        times["schedule"].append(t1 - t0)
        times["tables"].append(t2 - t1)
        times["update"].append(t3 - t2)
        times["total"].append(t3 - t0)
    assert len(plan.decode) == batch, "a request finished or was preempted during the benchmark"
    return times


def run(args: argparse.Namespace) -> int:
    times = measure(args.batch, args.steps, args.prompt_len, args.mtp)
    print(f"scheduler + tables per decode step, {args.batch} running requests, s_q={1 + args.mtp}, "
          f"{args.steps} steps (CPU, no model compute):")
    for name, values in times.items():
        us = sorted(v * 1e6 for v in values)
        print(f"  {name:<9} median {statistics.median(us):7.1f} us   mean {statistics.fmean(us):7.1f} us"
              f"   p90 {us[int(0.9 * (len(us) - 1))]:7.1f} us")
    print("goal: total <= 200 us per step at 512 requests")
    return 0
