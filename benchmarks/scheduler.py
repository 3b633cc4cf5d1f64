"""`kvpager bench scheduler`: the CPU cost the engine pays per decode step at a full batch,
without model compute. It runs the real `Engine.step()` (scheduler, BlockTables, slot mapping,
input ids, sampling hand-off, per-request token bookkeeping, metrics) with a model that returns
fixed logits, and reports:

  schedule   Scheduler.schedule() (Sequence.reserve included)
  tables     the decode tables' events and view (ModelRunner.advance_decode_rows: leaves, new
             pages, grow; BlockTables.view: block_table + cache_seqlens)
  rest       everything else step() does on the host: slots, input ids, DecodeBatch, taking
             each row's token (append, counters, finish checks), metrics
  total      schedule + tables + rest (the engine's whole host cost per step)

The goal, scheduler + table overhead <= 200 us at 512 requests, is schedule + tables.
  excluded   device work, timed but not in total: the model call (a no-op here), MLA metadata
             (one kernel on a GPU; the torch planner on CPU) and the argmax of sampling

Every request is greedy with no stop tokens or callback (the engine's common case).

`--prefill N` measures prefill steps instead: each timed step admits N new requests of ragged
prompts (--prompt-len / 4 .. --prompt-len tokens) and prefills all of them (each then emits its
one token and finishes), once with batched prefill and once with one model call per chunk
(SchedulerConfig.batched_prefill=False). Reported per step: the host cost (step() minus the
excluded model calls, MLA metadata and sampling argmax), the model calls, and the padding
columns the batched calls compute. On a GPU every model call is also a few hundred kernel
launches and every metadata call one more kernel: the call count is the other half of the gain.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from kvpager import CacheConfig
from kvpager.cli_args import nonneg_int, positive_int
from kvpager.runtime.engine import Engine
from kvpager.runtime.prefill import group_chunks, padded_slots
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

VOCAB = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=512, help="running requests")
    parser.add_argument("--steps", type=positive_int, default=2000, help="timed decode steps")
    parser.add_argument("--prompt-len", type=positive_int, default=1000, help="prompt tokens")
    parser.add_argument("--mtp", type=nonneg_int, default=0, help="draft tokens per step (s_q = 1 + mtp)")
    parser.add_argument("--prefill", type=nonneg_int, default=0, metavar="N",
                        help="measure prefill steps of N new requests each, batched against one "
                             "call per request (0: the decode benchmark)")


class FixedLogits:
    """A Model that computes nothing: token 1 wins every row."""

    num_layers, num_heads, vocab_size, device = 1, 16, VOCAB, torch.device("cpu")

    def __init__(self, batch: int, s_q: int):
        self.logits = torch.zeros(batch, s_q, VOCAB)
        self.logits[..., 1] = 1.0

    def prefill(self, batch, pool):
        return self.logits[0, 0].expand(batch.num_logits, VOCAB)

    def decode(self, batch, pool):
        return self.logits[:len(batch.request_ids)]


def _timed(fn: Callable, log: list[float]) -> Callable:
    clock = time.perf_counter

    def wrapper(*args, **kwargs):
        t0 = clock()
        out = fn(*args, **kwargs)
        log.append(clock() - t0)
        return out
    return wrapper


def measure(batch: int = 512, steps: int = 2000, prompt_len: int = 1000, mtp: int = 0) -> dict:
    """Per-step seconds (lists) of each part, after every request is decoding."""
    s_q = 1 + mtp
    budget = max(batch * s_q, 8192)
    # Requests whose prefill ends early decode s_q tokens a step while the rest prefill: room
    # for those steps too, so that no request finishes inside the timed steps.
    prefill_steps = -(-batch * prompt_len // budget) + 1
    max_len = prompt_len + (steps + prefill_steps + 16) * s_q + 64
    config = SchedulerConfig(max_batch_size=batch, max_num_batched_tokens=budget,
                             num_speculative_tokens=mtp, max_model_len=max_len)
    cache = CacheConfig(num_layers=1, num_pages=batch * (-(-max_len // 64) + 1), head_dim=2,
                        head_dim_v=1, dtype="float32")
    model = FixedLogits(batch, s_q)
    engine = Engine(model, cache, config)
    params = SamplingParams(max_new_tokens=max_len - prompt_len - s_q)
    for i in range(batch):
        engine.submit([(i + j) % VOCAB for j in range(prompt_len)], params)
    sched = engine.scheduler
    while len(sched.running) < batch or any(r.is_prefilling for r in sched.running):
        engine.step()  # prefill everything first
    logs: dict[str, list[float]] = {k: [] for k in ("schedule", "advance", "view", "model",
                                                    "metadata", "sampling")}
    sched.schedule = _timed(sched.schedule, logs["schedule"])
    engine.runner.advance_decode_rows = _timed(engine.runner.advance_decode_rows, logs["advance"])
    engine.decode_tables.view = _timed(engine.decode_tables.view, logs["view"])
    model.decode = _timed(model.decode, logs["model"])
    engine.runner.metadata = _timed(engine.runner.metadata, logs["metadata"])
    engine.runner.sample = _timed(engine.runner.sample, logs["sampling"])
    step_times, clock = [], time.perf_counter
    for _ in range(steps):
        t0 = clock()
        plan = engine.step()
        step_times.append(clock() - t0)
    assert len(plan.decode) == batch, "a request finished or was preempted during the benchmark"
    excluded = [sum(v) for v in zip(logs["model"], logs["metadata"], logs["sampling"])]
    total = [t - x for t, x in zip(step_times, excluded)]
    tables = [a + v for a, v in zip(logs["advance"], logs["view"])]
    rest = [t - a - b for t, a, b in zip(total, logs["schedule"], tables)]
    return {"schedule": logs["schedule"], "tables": tables, "rest": rest, "total": total,
            "metadata": logs["metadata"], "sampling": logs["sampling"]}


def measure_prefill(requests: int = 64, steps: int = 200, prompt_len: int = 256,
                    batched: bool = True, seed: int = 0) -> dict:
    """Per-step host seconds of prefill steps (lists), the model calls and padding per step.
    Each step admits `requests` prompts of prompt_len / 4 .. prompt_len tokens (the same ones
    for either mode) and prefills them whole; each emits one token and finishes."""
    rng = random.Random(seed)
    prompts = [[1] * rng.randint(max(1, prompt_len // 4), prompt_len) for _ in range(requests)]
    budget = max(requests * prompt_len, 8192)
    config = SchedulerConfig(max_batch_size=requests, max_num_batched_tokens=budget,
                             max_model_len=prompt_len + 1, batched_prefill=batched)
    cache = CacheConfig(num_layers=1, num_pages=requests * (-(-(prompt_len + 1) // 64) + 1),
                        head_dim=2, head_dim_v=1, dtype="float32")
    model = FixedLogits(requests, 1)
    engine = Engine(model, cache, config)
    one = SamplingParams(max_new_tokens=1)
    logs: dict[str, list[float]] = {k: [] for k in ("model", "metadata", "sampling")}
    model.prefill = _timed(model.prefill, logs["model"])
    engine.runner.metadata = _timed(engine.runner.metadata, logs["metadata"])
    engine.runner.sample = _timed(engine.runner.sample, logs["sampling"])
    host, calls, clock = [], [], time.perf_counter
    for step in range(steps + 5):  # 5 untimed warm-up steps
        for p in prompts:
            engine.submit(p, one)
        for log in logs.values():
            log.clear()
        t0 = clock()
        plan = engine.step()
        elapsed = clock() - t0
        assert len(plan.prefill) == requests and not engine.has_unfinished()
        if step >= 5:
            host.append(elapsed - sum(sum(log) for log in logs.values()))
            calls.append(len(logs["model"]))
    lengths = [len(p) for p in prompts]
    groups = group_chunks(lengths, config.prefill_padding)
    return {"host": host, "calls": statistics.fmean(calls), "tokens": sum(lengths),
            "padding": padded_slots(lengths, groups)}


def run_prefill(args: argparse.Namespace) -> int:
    print(f"engine host cost per prefill step, {args.prefill} new requests of "
          f"{max(1, args.prompt_len // 4)}-{args.prompt_len} tokens each step, {args.steps} steps "
          f"(CPU, no model compute; model calls, MLA metadata and argmax excluded):")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small host ops: intra-op threads only add contention
    try:
        results = [measure_prefill(args.prefill, args.steps, args.prompt_len, b) for b in (True, False)]
    finally:
        torch.set_num_threads(threads)
    for batched, r in zip((True, False), results):
        us = sorted(v * 1e6 for v in r["host"])
        mode = "batched" if batched else "per-request"
        print(f"  {mode:<12} host median {statistics.median(us):8.1f} us   p90 "
              f"{us[int(0.9 * (len(us) - 1))]:8.1f} us   model calls {r['calls']:5.1f}   "
              f"padding {r['padding']} of {r['tokens']} tokens "
              f"({100 * r['padding'] / (r['tokens'] + r['padding']):.1f}% of the slots)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.prefill:
        return run_prefill(args)
    times = measure(args.batch, args.steps, args.prompt_len, args.mtp)
    print(f"engine host overhead per decode step, {args.batch} running requests, s_q={1 + args.mtp}, "
          f"{args.steps} steps (CPU, no model compute):")
    for name, values in times.items():
        if name == "metadata":
            print("  excluded (device work on a GPU):")
        us = sorted(v * 1e6 for v in values)
        print(f"  {name:<9} median {statistics.median(us):7.1f} us   mean {statistics.fmean(us):7.1f} us"
              f"   p90 {us[int(0.9 * (len(us) - 1))]:7.1f} us")
    print("goal: schedule + tables <= 200 us per step at 512 requests; total is the engine's "
          "whole host cost")
    return 0
