"""Bookkeeping: what a step does to its requests once their tokens are known — record them,
retire the finished, count the metrics. The engine and the simulator both run it, so their
request lifecycles cannot drift apart; only where tokens come from differs (a model and a
sampler, or a cost model and a coin)."""
from __future__ import annotations

import logging
from collections.abc import Callable

from kvpager.runtime.metrics import Metrics
from kvpager.runtime.request import Request, Status
from kvpager.runtime.scheduler import Scheduler, StepPlan

logger = logging.getLogger("kvpager")


class Bookkeeping:
    """Per-request state changes after the model ran. on_retire(req) runs first thing when a
    request finishes or is aborted (the engine frees its decode row there). keep_tokens=False
    (the simulator) counts tokens without storing them or their times."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics, clock: Callable[[], float],
                 on_retire: Callable[[Request], None] | None = None,
                 keep_tokens: bool = True) -> None:
        self.scheduler, self.metrics, self.clock = scheduler, metrics, clock
        self.on_retire, self.keep_tokens = on_retire, keep_tokens
        self.retired = 0  # requests retired since the last end_step()

    def prefilled(self, req: Request, n: int, now: float) -> None:
        """req's chunk of n prompt tokens is in the cache."""
        if req.timings.admitted is None:
            req.timings.admitted = now
        req.num_computed += n

    def take_decoded(self, reqs: list[Request], tokens: list[list[int]], now: float) -> int:
        """One token per row (s_q = 1): tokens[i] = [token] for reqs[i]. Returns how many were
        emitted. Rows that cannot end, stop or stream this step (Request.plain_until) take
        the inlined common case, with no call per request; the rest go through emit()."""
        generated, keep = 0, self.keep_tokens
        running = Status.RUNNING
        for req, (token,) in zip(reqs, tokens):
            req.num_computed += 1
            n = req.num_generated
            if n < req.plain_until and req.status is running:
                req.num_generated = n + 1
                generated += 1
                if keep:
                    req.output_token_ids.append(token)
                    req.timings.token_times.append(now)
            else:
                generated += self.emit(req, [token], now)
        return generated

    def accepted(self, req: Request, tokens: list[int], now: float) -> int:
        """An MTP row: the last token's KV and the accepted drafts' are in the cache; emit the
        tokens (targets[0] plus one per accepted draft)."""
        req.num_computed += len(tokens)
        return self.emit(req, tokens, now)

    def emit(self, req: Request, tokens: list[int], now: float) -> int:
        """Append tokens until a stop token or max_new_tokens; retire if done. Returns count."""
        if req.is_done:  # aborted by a callback earlier in this step
            return 0
        p, t = req.params, req.timings
        for i, token in enumerate(tokens):
            req.num_generated += 1
            if t.first_token is None:
                t.first_token = now
            if self.keep_tokens:
                req.output_token_ids.append(token)
                t.token_times.append(now)
            self._callback(req, token)
            if req.is_done:  # the callback aborted it (or raised): retired once, already
                return i + 1
            if token in p.stop_token_ids or req.num_generated >= p.max_new_tokens:
                self.retire(req, Status.FINISHED, "stop" if token in p.stop_token_ids else "length",
                            now)
                return i + 1
        return len(tokens)

    def retire(self, req: Request, status: Status, reason: str, now: float) -> None:
        """Finish or abort req: free its pages, record it. Running requests leave the
        scheduler's batch at end_step()."""
        if self.on_retire is not None:
            self.on_retire(req)
        self.scheduler.retire(req, status)
        self.retired += 1
        req.finish_reason = reason
        req.timings.finished = now
        self.metrics.record_request(req)

    def end_step(self, plan: StepPlan, now: float, duration: float, generated: int) -> int:
        """Drop the step's retired requests from the batch and record the step. Returns how
        many requests it retired."""
        retired, self.retired = self.retired, 0
        if retired:
            self.scheduler.drop_retired()
        if not plan.empty or plan.preempted:
            alloc, sched = self.scheduler.allocator, self.scheduler
            self.metrics.record_step(
                time=now, duration=duration, batch_size=len(plan.prefill) + len(plan.decode),
                prefill_tokens=plan.num_prefill_tokens,
                decode_tokens=len(plan.decode) * sched.config.s_q,
                generated=generated, pages_used=alloc.num_used, pages_free=alloc.num_free,
                preemptions=len(plan.preempted), waiting=len(sched.waiting),
                kv_usage_tokens=plan.kv_usage_tokens, prefix_query_tokens=plan.prefix_query_tokens,
                prefix_hit_tokens=plan.prefix_hit_tokens, evictions=plan.evictions)
        return retired

    def _callback(self, req: Request, token: int) -> None:
        if req.on_token is None:
            return
        try:
            req.on_token(req.request_id, token)
        except Exception:  # a broken consumer must not take the engine down
            logger.exception("on_token callback of request %r raised; it ends with "
                             "finish_reason 'error'", req.request_id)
            self.retire(req, Status.ABORTED, "error", self.clock())
