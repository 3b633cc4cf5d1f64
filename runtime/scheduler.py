"""FCFS continuous-batching scheduler with chunked prefill and preemption by recompute.

State is two queues and the allocator: `waiting` (FCFS; preempted requests go back to its
front) and `running` (in admission order, oldest first). One `schedule()` call plans one step:

  1. every running request gets its work, oldest first: a decoding request s_q tokens
     (s_q = 1 + num_speculative_tokens), a prefilling one its next chunk from the step's token
     budget (decode tokens are reserved first, so prefill never starves decode). When the pages
     a request needs are not free, the most recently admitted running requests are preempted
     (pages freed, back to the front of `waiting`) until they are; if that reaches the request
     itself, it is preempted too and the pass stops.
  2. waiting requests are admitted in order while the batch, the budget and the pages allow:
     free pages minus those promised to unfinished prefills must cover the request's whole
     prefill plus `admit_headroom_pages` (no headroom when nothing runs, so any request that
     fits the pool is admitted eventually). The queue head blocks the rest: strict FCFS.

No starvation: the oldest running request is never preempted while a younger one runs, and a
preempted request is readmitted before any later arrival.

Prefix caching (`enable_prefix_caching=True`, runtime/prefix.py): admission matches the
request's tokens against the cache and needs only the pages the hit does not supply; the
prefill starts after the hit; filled pages are committed at the start of each step and before a
request releases its pages (finish, abort, preemption), so they stay cached at refcount 0. A
mid-page hit's copy is in `StepPlan.copies`, to apply before the step writes. Off, the plan is
exactly what it was without the feature.

Cost: O(running + admitted) Python per step; pages are appended only for the tokens scheduled.

A request's sequence may hold up to s_q - 1 "spare" slots beyond `num_computed` after an MTP
step whose drafts were rejected; the next step overwrites them (Sequence has no truncate, and
none is needed: cache_seqlens always equals num_computed + s_q while a step runs).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pydantic import model_validator

from kvpager import BlockAllocator, Sequence
from kvpager.errors import ConfigError, OutOfPages, RequestTooLarge
from kvpager.validation import Int, validated
from kvpager.runtime.prefix import PrefixCaching
from kvpager.runtime.request import Request, Status


@validated(ConfigError)
class SchedulerConfig:
    """max_batch_size: running requests at most; max_num_batched_tokens: new tokens per step
    (decode + prefill chunks); admit_headroom_pages: free pages beyond a prompt required to admit
    it while others run (room for them to grow); num_speculative_tokens: draft tokens per decode
    step (MTP), s_q = 1 + this; max_model_len: prompt + output tokens at most (sets the block
    table width); batched_prefill: the step's prefill chunks share model calls (False: one call
    per chunk, the old path, kept to measure against); max_prefill_padding: the largest fraction
    of a batched prefill call's slots that may be padding (kvpager.runtime.prefill.group_chunks);
    enable_prefix_caching: reuse the KV pages of cached prompt prefixes
    (runtime/prefix.py; needs a pool that holds one max_model_len request).

    Frozen and strict (kvpager.validation): a bad or misspelt field raises ConfigError naming
    it; reading a field costs what a plain dataclass field does (the scheduler reads them every
    step)."""

    max_batch_size: Int = 256
    max_num_batched_tokens: Int = 4096
    admit_headroom_pages: Int = 1
    num_speculative_tokens: Int = 0
    max_model_len: Int = 32768
    batched_prefill: bool = True
    max_prefill_padding: float = 0.1
    enable_prefix_caching: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> "SchedulerConfig":
        for name in ("max_batch_size", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("admit_headroom_pages", "num_speculative_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.max_prefill_padding < 1.0:
            raise ValueError(f"max_prefill_padding={self.max_prefill_padding} must be in [0, 1) "
                             f"(0: only equal-length chunks share a prefill call)")
        if self.max_num_batched_tokens < self.max_batch_size * self.s_q:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} cannot decode a full batch "
                f"(max_batch_size={self.max_batch_size} x s_q={self.s_q}); raise it or lower the batch"
            )
        return self

    @property
    def s_q(self) -> int:
        return 1 + self.num_speculative_tokens

    @property
    def prefill_padding(self) -> float | None:
        """group_chunks' max_padding: None (one call per chunk) unless batched_prefill."""
        return self.max_prefill_padding if self.batched_prefill else None


@dataclass
class StepPlan:
    """One step's work. prefill: (request, first position, tokens); decode: requests decoding
    s_q tokens, oldest first; preempted: requests sent back. Every sequence already holds the
    step's tokens (Sequence.reserve)."""

    prefill: list[tuple[Request, int, int]] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_prefill_tokens: int = 0
    decode_kv_tokens: int = 0  # sum of the decode sequences' num_tokens (their cache_seqlens)
    # (src, dst) page copies to apply before the step writes (a mid-page prefix hit's page)
    copies: list[tuple[int, int]] = field(default_factory=list)
    kv_usage_tokens: int = 0  # tokens of KV the running requests hold (shared pages once)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_hit_tokens: int = 0  # of those, tokens found cached
    evictions: int = 0  # cached pages evicted this step

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def check_fits(prompt_len: int, max_new_tokens: int, config: SchedulerConfig, num_pages: int,
               page_size: int) -> None:
    """RequestTooLarge unless the request could run alone: prompt + output (+ s_q - 1 draft
    slots) within max_model_len and within the pool."""
    tokens = prompt_len + max_new_tokens + config.s_q - 1
    if prompt_len + max_new_tokens > config.max_model_len:
        raise RequestTooLarge(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_model_len="
            f"{config.max_model_len}; shorten the request or raise max_model_len")
    if pages_for(tokens, page_size) > num_pages:
        raise RequestTooLarge(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) needs "
            f"{pages_for(tokens, page_size)} pages but the pool has {num_pages}; shorten the "
            f"request or build a larger pool")


class Scheduler:
    """Plans steps; owns the queues and each running request's Sequence (it alone reserves,
    preempts and releases them)."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, page_size: int = 64):
        self.config = config
        self.allocator = allocator
        self.page_size = page_size
        self.max_pages = pages_for(config.max_model_len + config.s_q, page_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix: PrefixCaching | None = None
        if config.enable_prefix_caching:
            self.prefix = PrefixCaching(allocator, page_size, config.max_model_len + config.s_q - 1,
                                        self.max_pages)

    def add(self, req: Request) -> None:
        if self.prefix is not None:
            self.prefix.add(req)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        prefix = self.prefix
        if prefix is not None:
            counters = prefix.counters()
            prefix.commit_filled(self.running)
        s_q = self.config.s_q
        running, add_decode = self.running, plan.decode.append
        # Reserve s_q tokens for every running request (prefilling ones too: simpler, and it
        # costs at most s_q tokens of budget per prefilling request).
        budget = self.config.max_num_batched_tokens - s_q * len(running)
        kv_tokens = idle_tokens = 0
        # `running` only shrinks from the end while we walk it (preemption pops the youngest),
        # so a plain for loop visits each remaining request once.
        for req in running:
            computed = req.num_computed
            if computed >= req.num_prefill:  # decoding: up to num_computed + s_q tokens
                target = computed + s_q  # (the sequence may hold spare MTP slots)
                try:
                    req.seq.reserve_to(target)  # O(1) within the held pages
                except OutOfPages:
                    if not self._make_room(req, target - req.seq.num_tokens, plan):
                        break
                    req.seq.reserve_to(target)
                kv_tokens += target
                add_decode(req)
            else:
                n = min(req.num_prefill - computed, budget)
                if n > 0:
                    if not self._make_room(req, n, plan):
                        break
                    req.seq.reserve(n)
                    plan.prefill.append((req, computed, n))
                    plan.num_prefill_tokens += n
                    budget -= n
                else:
                    idle_tokens += req.seq.num_tokens
        plan.decode_kv_tokens = kv_tokens
        self._admit(plan, budget)
        for req, _, _ in plan.prefill:  # only a new sequence (a prefix hit) or a fork has copies
            plan.copies += req.seq.take_pending_copies()
        if prefix is None:  # no page is shared: usage is the sequences' tokens
            plan.kv_usage_tokens = (kv_tokens + idle_tokens
                                    + sum(start + n for _, start, n in plan.prefill))
        else:
            plan.kv_usage_tokens = prefix.kv_usage_tokens(self.running)
            query, hit, evictions = prefix.counters()
            plan.prefix_query_tokens = query - counters[0]
            plan.prefix_hit_tokens = hit - counters[1]
            plan.evictions = evictions - counters[2]
        return plan

    def _make_room(self, req: Request, n: int, plan: StepPlan) -> bool:
        """Preempt from the young end of `running` until req's next n tokens have pages.
        False when req itself had to go."""
        need = req.seq.pages_needed(n)
        while self.allocator.num_free < need:
            victim = self.running.pop()
            self.preempt(victim)
            plan.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, plan: StepPlan, budget: int) -> None:
        waiting, running, ps, prefix = self.waiting, self.running, self.page_size, self.prefix
        if not waiting or budget <= 0 or len(running) >= self.config.max_batch_size:
            return
        promised = sum(pages_for(r.num_prefill, ps) - r.seq.num_pages
                       for r in running if r.num_computed < r.num_prefill)
        while waiting and budget > 0 and len(running) < self.config.max_batch_size:
            req = waiting[0]
            num_prefill = req.prompt_len + req.num_generated
            headroom = self.config.admit_headroom_pages if running else 0
            room = self.allocator.num_free - promised - headroom
            if prefix is None:
                if room < pages_for(num_prefill, ps):
                    break
                seq = Sequence(req.request_id, self.allocator, ps, self.max_pages)
            else:
                hit = prefix.match(req, num_prefill)
                if room < hit.pages_needed(num_prefill):
                    # Reviving every hit page can need one page more than no hit (the copy
                    # of an evictable partial page): then start from scratch if that fits.
                    if room < pages_for(num_prefill, ps):
                        break
                    hit = None
                seq = prefix.start(req, hit)
            waiting.popleft()
            req.status = Status.RUNNING
            req.seq = seq
            req.num_prefill = num_prefill
            req.num_computed = start = seq.num_tokens
            n = min(num_prefill - start, budget)
            seq.reserve(n)
            plan.prefill.append((req, start, n))
            plan.num_prefill_tokens += n
            promised += pages_for(num_prefill, ps) - req.seq.num_pages
            budget -= n
            running.append(req)

    def preempt(self, req: Request) -> None:
        """Free req's pages and queue it first, to be recomputed from prompt + output (with
        prefix caching, its filled pages stay cached for the readmission to hit)."""
        if self.prefix is not None:
            self.prefix.commit(req)
        req.seq.release()
        req.seq = None
        req.num_computed = 0
        req.status = Status.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def retire(self, req: Request, status: Status) -> None:
        """Finish or abort req, freeing its pages now. Running requests leave `running` at
        `drop_retired()` (once per step, O(running))."""
        if req.seq is not None:
            if self.prefix is not None:
                self.prefix.commit(req)
            req.seq.release()
            req.seq = None
        elif req.status in (Status.WAITING, Status.PREEMPTED):
            self.waiting.remove(req)
        req.status = status
        req.keys = None

    def drop_retired(self) -> None:
        self.running = [r for r in self.running if r.status is Status.RUNNING]

    def remove_running(self, req: Request) -> None:
        self.running.remove(req)
