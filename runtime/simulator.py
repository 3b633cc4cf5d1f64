"""Discrete-event simulation of serving a workload: the real Scheduler and BlockAllocator, a
CostModel instead of a model, a virtual clock, and no tensors at all.

Each iteration admits the requests that have arrived by the clock (jumping the clock to the next
arrival when idle), plans a step with the scheduler, prices it with the cost model, advances the
clock by that time, then hands the step's tokens to the engine's own Bookkeeping (prefill
progress, one token per decode row — or 1 + accepted drafts in MTP mode — retirement, freeing
pages in the same step, metrics). Per step this is O(running requests) of plain Python.

Requests are pool-less: sequences reserve pages from the real allocator, but no tensor is built
and tokens are counted, not stored (every token is 0). With prefix caching on, the cache runs
for real on synthetic token ids (workload.content, or unique ones; runtime/shared_prefix.py): a
hit shortens the prefill the cost model prices, and mid-page copies are planned, not priced.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from kvpager import BlockAllocator
from kvpager.errors import RequestTooLarge
from kvpager.runtime.bookkeeping import Bookkeeping
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.cost import CostModel
from kvpager.runtime.prefill import group_chunks, padded_slots
from kvpager.runtime.request import Request, SamplingParams, Timings
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan, check_fits
from kvpager.runtime.shared_prefix import unique_content
from kvpager.runtime.workload import Workload


class Simulator:
    """Run `workload` through the scheduler; `run()` returns the Metrics. `accept_rate`: chance
    that each MTP draft token is accepted (only with num_speculative_tokens > 0)."""

    def __init__(self, workload: Workload, num_pages: int, config: SchedulerConfig | None = None,
                 cost: CostModel | None = None, page_size: int = 64, accept_rate: float = 0.7,
                 seed: int = 0):
        self.workload = workload
        self.config = config or SchedulerConfig()
        self.cost = cost or CostModel()
        self.page_size = page_size
        self.allocator = BlockAllocator(num_pages, page_size)
        self.scheduler = Scheduler(self.config, self.allocator, page_size)
        self.metrics = Metrics(num_pages)
        self.book = Bookkeeping(self.scheduler, self.metrics, lambda: self.clock,
                                keep_tokens=False)
        self.accept_rate = accept_rate
        self.rng = random.Random(seed)
        self.clock = 0.0
        self.rejected = 0

    def run(self, on_progress: Callable[[int], None] | None = None) -> Metrics:
        """Simulate to the last request. on_progress(n) reports n more requests finished."""
        wl, sched = self.workload, self.scheduler
        arrival, prompt, output = wl.arrival.tolist(), wl.prompt_len.tolist(), wl.output_len.tolist()
        n, i = len(arrival), 0
        while i < n or sched.has_work():
            if not sched.has_work() and arrival[i] > self.clock:
                self.clock = arrival[i]  # idle: jump to the next arrival
            while i < n and arrival[i] <= self.clock:
                self._submit(i, arrival[i], prompt[i], output[i])
                i += 1
            if not sched.has_work():  # every arrival so far was rejected (RequestTooLarge)
                continue
            plan = sched.schedule()
            if plan.empty:
                if sched.running:
                    raise RuntimeError("scheduler made no progress with requests running")
                if i < n:  # what waits cannot be admitted yet; let time pass
                    self.clock = max(self.clock, arrival[i])
                    continue
                raise RuntimeError("waiting requests can never be admitted")
            done = self._advance(plan)
            if on_progress is not None and done:
                on_progress(done)
        return self.metrics

    def _submit(self, index: int, arrival: float, prompt_len: int, output_len: int) -> None:
        try:
            check_fits(prompt_len, output_len, self.config, self.allocator.num_pages, self.page_size)
        except RequestTooLarge:
            self.rejected += 1
            return
        content = None
        if self.config.enable_prefix_caching:
            wl = self.workload.content
            content = wl[index] if wl is not None else unique_content(index, prompt_len + output_len)
        req = Request(str(index), [], prompt_len, SamplingParams(max_new_tokens=output_len),
                      Timings(arrival), content=content)
        self.scheduler.add(req)

    def _advance(self, plan: StepPlan) -> int:
        """Price the step, move the clock, then the engine's bookkeeping. O(batch). Returns
        how many requests finished."""
        s_q, book = self.config.s_q, self.book
        kv_read = plan.decode_kv_tokens + sum(start + n for _, start, n in plan.prefill)
        # the engine's prefill calls (CostModel: the batched form)
        lengths = [n for _, _, n in plan.prefill]
        groups = group_chunks(lengths, self.config.prefill_padding)
        new_tokens = plan.num_prefill_tokens + padded_slots(lengths, groups) + s_q * len(plan.decode)
        calls = len(groups) + (1 if plan.decode else 0)
        start_time = self.clock
        self.clock = now = start_time + self.cost.step_time(kv_read, new_tokens, calls)
        generated = 0
        for req, start, n in plan.prefill:
            book.prefilled(req, n, start_time)
            if req.num_computed == req.num_prefill:
                generated += book.emit(req, [0], now)
        if s_q == 1:
            generated += book.take_decoded(plan.decode, [[0]] * len(plan.decode), now)
        else:
            for req in plan.decode:
                generated += book.accepted(req, [0] * self._accepted(s_q), now)
        return book.end_step(plan, now, now - start_time, generated)

    def _accepted(self, s_q: int) -> int:
        """1 + the number of leading drafts accepted, each with probability accept_rate."""
        k = 1
        while k < s_q and self.rng.random() < self.accept_rate:
            k += 1
        return k
