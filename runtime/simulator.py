"""Discrete-event simulation of serving a workload: the real Scheduler and BlockAllocator, a
CostModel instead of a model, a virtual clock, and no tensors at all.

Each iteration admits the requests that have arrived by the clock (jumping the clock to the next
arrival when idle), plans a step with the scheduler, prices it with the cost model, advances the
clock by that time, then updates the requests exactly as the engine would (prefill progress,
one token per decode row — or 1 + accepted drafts in MTP mode — and retirement, freeing pages in
the same step). Per step this is O(running requests) of plain Python.

Requests are pool-less: their sequences grow with RequestSequence.extend, so no slot mapping
(no tensor) is ever built; pages come from and go back to the real allocator.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from kvpager.allocator import BlockAllocator
from kvpager.errors import RequestTooLarge
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.cost import CostModel
from kvpager.runtime.request import Request, SamplingParams, Status, Timings
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan, check_fits
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
        self.scheduler = Scheduler(self.config, self.allocator, page_size, want_slots=False)
        self.metrics = Metrics(num_pages)
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
        req = Request(str(index), [], prompt_len, SamplingParams(max_new_tokens=output_len),
                      Timings(arrival))
        self.scheduler.add(req)

    def _advance(self, plan: StepPlan) -> int:
        """Price the step, move the clock, update requests as the engine would. O(batch)."""
        s_q = self.config.s_q
        kv_read = 0
        for req, start, n, _ in plan.prefill:
            kv_read += start + n
        kv_read += plan.decode_kv_tokens
        new_tokens = plan.num_prefill_tokens + s_q * len(plan.decode)
        start_time = self.clock
        self.clock = now = start_time + self.cost.step_time(kv_read, new_tokens)
        done = generated = 0
        for req, start, n, _ in plan.prefill:
            if req.timings.admitted is None:
                req.timings.admitted = start_time
            req.num_computed += n
            if req.num_computed == req.num_prefill:
                generated += 1
                done += self._emit(req, 1, now)
        finished = []
        if s_q == 1:
            for req in plan.decode:  # the hot loop: a few attribute updates per request
                req.num_computed += 1
                req.num_generated += 1
                if req.num_generated >= req.params.max_new_tokens:
                    finished.append(req)
            generated += len(plan.decode)
        else:
            for req in plan.decode:
                k = self._accepted(s_q)
                req.num_computed += k
                req.num_generated += k
                generated += k
                if req.num_generated >= req.params.max_new_tokens:
                    finished.append(req)
        for req in finished:
            done += self._emit(req, 0, now)
        if done:
            self.scheduler.drop_retired()
        sched = self.scheduler
        self.metrics.record_step(
            time=now, duration=now - start_time, batch_size=len(plan.prefill) + len(plan.decode),
            prefill_tokens=plan.num_prefill_tokens, decode_tokens=s_q * len(plan.decode),
            generated=generated, pages_used=self.allocator.num_used,
            pages_free=self.allocator.num_free, preemptions=len(plan.preempted),
            waiting=len(sched.waiting))
        return done

    def _emit(self, req: Request, k: int, now: float) -> int:
        """k tokens for req (capped at max_new_tokens); 1 if it finished and was retired."""
        if req.timings.first_token is None:
            req.timings.first_token = now
        req.num_generated = min(req.num_generated + k, req.params.max_new_tokens)
        if req.num_generated < req.params.max_new_tokens:
            return 0
        self.scheduler.retire(req, Status.FINISHED)
        req.finish_reason = "length"
        req.timings.finished = now
        self.metrics.record_request(req)
        return 1

    def _accepted(self, s_q: int) -> int:
        """1 + the number of leading drafts accepted, each with probability accept_rate."""
        k = 1
        while k < s_q and self.rng.random() < self.accept_rate:
            k += 1
        return k
