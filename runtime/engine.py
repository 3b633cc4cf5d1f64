"""The continuous-batching engine: submit / abort at any time, `step()` runs one scheduled step
through the model, `generate()` runs an offline batch to completion.

One step: the scheduler plans (admissions, chunks, preemptions, page appends); the prefill chunks
share model calls (a PrefillBatch: varlen chunks left-padded to the call's longest, causal,
grouped so that padding stays bounded: runtime/prefill.py; or one call per chunk with
SchedulerConfig(batched_prefill=False)); all decoding requests are one model call with the block
table, cache_seqlens and MLA metadata computed once; the engine samples (and computes the
logprobs requests asked for), appends tokens, and retires finished requests, freeing their pages
before the step returns.

MTP / speculative mode (num_speculative_tokens = k > 0): each decode row is the last token plus k
draft tokens proposed by prompt lookup (the longest recent n-gram match in the request's own
tokens; model-free). The model returns logits for all 1 + k positions; drafts are accepted while
they equal the token sampled at the previous position, so the output is exactly what one-token
decoding would produce, one or more tokens per step.

Failures (a model call, the sampler or an on_token callback raising, NaN logits, a device
error) end exactly the requests the failed work was for, with finish_reason "error", and the
step goes on for everyone else: see Engine.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence as Seq

import numpy as np
import torch

from kvpager import BlockAllocator, BlockTables, CacheConfig, PagePool, get_mla_metadata, slot_mapping
from kvpager.errors import ConfigError, DuplicateRequest, RequestError, UnknownRequest
from kvpager.runtime.bookkeeping import Bookkeeping
from kvpager.runtime.drafts import accept_drafts, propose_drafts
from kvpager.runtime.checks import (check_engine_args, check_prompt, check_request_id,
                                    check_submit_args, warn_cpu_threads)
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.protocol import DecodeBatch, Model
from kvpager.runtime.outputs import RequestOutput
from kvpager.runtime.prefill import build_prefill_batch, group_chunks
from kvpager.runtime.request import Request, RequestHandle, SamplingParams, Status, Timings
from kvpager.runtime.sampling import make_generator, sample_batch, token_logprobs
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan, check_fits
from kvpager.runtime.step_gate import StepGate

logger = logging.getLogger("kvpager")


class Engine:
    """The serving loop's state: pool, allocator, scheduler, decode tables and the requests.

    Memory stays bounded however long it serves: `requests` holds the unfinished requests and
    only the last `retain_finished` finished ones (a finished request's callback and generator
    are dropped at once; its handle keeps the outputs), and `metrics` keeps aggregates and
    latency reservoirs, not per-step series (`full_metrics=True` keeps those, as the simulator
    does).

    A failing step changes nothing for the requests it did not fail for. Each piece of model
    work is a unit: one prefill chunk (its own model call), or the whole decode batch (one
    call, its MLA metadata and inputs included). When a unit raises (a model bug, a device
    error), the requests it computed for end with status ABORTED and finish_reason "error"; a
    row with NaN logits, or whose sampler raised, ends the same way, alone; so does a request
    whose on_token callback raised. Their pages and decode rows are freed before step()
    returns, they emit no token of the failed step, and every other request continues as if
    nothing happened (its KV and tokens were never touched). Undoing the step instead would
    need the scheduler's preemptions and reservations rolled back, and would retry a
    deterministic failure forever; ending the failed requests bounds the damage to them.

    Threads: submit(), abort() and generate() are safe from any thread, and step() from any
    one thread at a time (others wait), all through a StepGate (runtime/step_gate.py). A
    submit or abort made while no other thread is inside step() applies before it returns (an
    abort frees the pages at once, as in a single-threaded program); one made during another
    thread's step is posted and applied at that step's end, so it never waits for a whole step
    and the step never sees a half-applied change. Iterating a RequestHandle, or generate(),
    waits for the serving thread's next step when another thread is stepping, and steps itself
    when nobody is. step() from inside a step (an on_token callback) raises ReentrantStep, so
    a callback cannot break its request's limits. Callbacks run on the stepping thread.

    On the CPU, torch's default intra-op threads make small models (the tiny test model, the
    demo) slow on a busy machine; the first CPU engine of a process logs a warning when torch
    uses more than one thread (README, "Threads").
    """

    def __init__(self, model: Model, cache_config: CacheConfig,
                 config: SchedulerConfig | None = None, clock: Callable[[], float] = time.perf_counter,
                 *, retain_finished: int = 1024, full_metrics: bool = False):
        check_engine_args(model, cache_config, config, clock, retain_finished, full_metrics)
        self.config = config = config or SchedulerConfig()
        if model.num_layers != cache_config.num_layers:
            raise ConfigError(f"model has {model.num_layers} layers but CacheConfig.num_layers="
                              f"{cache_config.num_layers}; build the cache for the model")
        self.model, self.cache_config, self.clock = model, cache_config, clock
        self.pool = PagePool(cache_config)
        ps = self.page_size = cache_config.page_size
        self.allocator = BlockAllocator(cache_config.resolved_num_pages, ps)
        self.scheduler = Scheduler(config, self.allocator, ps)
        self.max_pages = self.scheduler.max_pages
        self.device = device = torch.device(cache_config.device)
        # One BlockTables per kind of model call, rows keyed by Request. Decode rows follow
        # events: a request joins when its prefill ends and leaves when it is retired or
        # preempted; the decode batch is the rows' order (decode_tables.handles). Prefill rows
        # are rebuilt each step from the step's chunks (a few rows, each a whole chunk of work).
        self.decode_tables = BlockTables(config.max_batch_size, self.max_pages, device, ps)
        self.prefill_tables = BlockTables(config.max_batch_size, self.max_pages, device, ps)
        self._short: dict[Request, int] = {}  # MTP rows that accepted fewer than s_q tokens
        # Unfinished requests and the last retain_finished finished ones (ids in _finished).
        self.requests: dict[str, Request] = {}
        self.retain_finished = retain_finished
        self._finished: deque[str] = deque()
        self.metrics = Metrics(self.allocator.num_pages, keep_all=full_metrics)
        self.book = Bookkeeping(self.scheduler, self.metrics, clock, self._on_retire)
        self._ids = itertools.count()
        self._q_offsets = torch.arange(config.s_q, device=device)
        self._num_sampling = 0  # unfinished requests that do not decode greedily
        self._gate = StepGate()  # other threads' way in (runtime/step_gate.py)
        self._num_logprobs = 0  # unfinished requests that asked for logprobs
        # This step's (request, [(logprob, top-n or None)] per sampled token), recorded once
        # the tokens are (RequestOutput.logprobs stays aligned with the tokens kept).
        self._logprobs: list[tuple[Request, list[tuple[float, dict[int, float] | None]]]] = []
        if device.type == "cpu":
            warn_cpu_threads()

    # --- public API --------------------------------------------------------------------------
    def submit(self, prompt_token_ids: Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None, on_token: Callable[[str, int], None] | None = None,
               arrival_time: float | None = None) -> RequestHandle:
        """Queue a request; raises RequestError subclasses for bad input, nothing else changes.
        Safe from any thread.

        prompt_token_ids: ints in [0, vocab_size) (a list, or an integer numpy array / torch
        tensor); params: a SamplingParams (default: greedy, 16 tokens); request_id: a str not
        in use (default: a fresh id, never one in use); on_token(request_id, token): called for
        every generated token, in order, on the stepping thread (a callback that raises ends its
        request with finish_reason "error"); arrival_time: a finite number on the engine's clock
        (default: now)."""
        req = self._prepare(prompt_token_ids, params, request_id, on_token, arrival_time)
        self._enqueue([req])
        return RequestHandle(req, self)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; aborting a finished request does nothing. Safe
        from any thread: applied before it returns unless another thread is inside step(), and
        then at that step's end."""
        check_request_id(request_id)
        with self._gate.lock:
            req = self.requests.get(request_id)
            if req is None:
                raise UnknownRequest(f"no request with id {request_id!r} is known: it was never "
                                     f"submitted, or it finished more than retain_finished="
                                     f"{self.retain_finished} requests ago")
            if self._gate.in_step_elsewhere():
                self._gate.posted.append(lambda: self._abort_now(req))
            else:
                self._abort_now(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._gate.posted)

    def load(self) -> dict[str, int]:
        """How busy the engine is now: running and waiting requests, pages used and in the
        pool, and kv_tokens (tokens whose KV is cached for running requests). O(running).
        Approximate while another thread steps."""
        running = list(self.scheduler.running)
        return {"running": len(running), "waiting": len(self.scheduler.waiting),
                "pages_used": self.allocator.num_used, "pages_total": self.allocator.num_pages,
                "kv_tokens": sum(r.num_computed for r in running)}

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (with anything already queued); their RequestOutputs
        (tokens, finish reason, logprobs if asked, timings), in order.
        All or nothing: every prompt and params is checked before any is queued. If waiting is
        interrupted (KeyboardInterrupt), its requests are aborted."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise RequestError(f"prompts={prompts!r:.40} must be a list of prompts (lists of "
                               f"token ids)")
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, Iterable):
            raise RequestError(f"params={params!r:.40} must be a SamplingParams, None, or a "
                               f"list of one per prompt")
        elif len(params := list(params)) != len(prompts):
            raise RequestError(f"params holds {len(params)} SamplingParams for {len(prompts)} "
                               f"prompts; pass one per prompt, or one for all")
        reqs = [self._prepare(p, sp, None, None, None) for p, sp in zip(prompts, params)]
        self._enqueue(reqs)
        handles = [RequestHandle(r, self) for r in reqs]
        try:
            for h in handles:
                while not h.finished:
                    self.advance()
        except BaseException:
            for h in handles:
                h.abort()
            raise
        return [h.output() for h in handles]

    def advance(self) -> None:
        """Make progress for a thread that waits for tokens: wait for the end of the next step
        when another thread is serving (it stepped last), else step() (StepGate.wait_for_step)."""
        if not self._gate.wait_for_step():
            self.step()

    def step(self) -> StepPlan:
        """Plan and run one step; returns the plan (what ran, what was preempted). Model,
        sampler and callback failures end only their requests (see the class docstring).
        ReentrantStep from inside a step; another thread's call waits for this one.

        Per-request Python for a one-token decode row (the hot case at large batches): one
        pass in the scheduler, one to gather input ids, one to take the sampled token
        (Bookkeeping.take_decoded); the decode tables cost O(changed rows)
        (advance_decode_rows). Measured by `kvpager bench scheduler`."""
        return self._gate.run_step(self._step, self._drain)

    # --- requests in and out ----------------------------------------------------------------
    def _prepare(self, prompt_token_ids: object, params: object, request_id: object,
                 on_token: object, arrival_time: object) -> Request:
        """A checked Request, not yet queued (request_id None: the engine picks one)."""
        params = SamplingParams() if params is None else params
        prompt = check_prompt(prompt_token_ids, self.model.vocab_size)
        check_submit_args(params, request_id, on_token, arrival_time)
        check_fits(len(prompt), params.max_new_tokens, self.config, self.allocator.num_pages,
                   self.page_size)
        req = Request(request_id, prompt, len(prompt), params,
                      Timings(self.clock() if arrival_time is None else float(arrival_time)),
                      on_token=on_token, generator=make_generator(params, self.device))
        if params.logprobs is not None:
            req.logprobs = []
            req.top_logprobs = [] if params.logprobs else None
        return req

    def _enqueue(self, reqs: list[Request]) -> None:
        """Queue reqs, all or none: DuplicateRequest if an id is in use (or repeated)."""
        with self._gate.lock:
            chosen = [r.request_id for r in reqs if r.request_id is not None]
            for request_id in chosen:
                if request_id in self.requests or chosen.count(request_id) > 1:
                    raise DuplicateRequest(f"request id {request_id!r} was already submitted; "
                                           f"use a new id")
            for req in reqs:
                if req.request_id is None:
                    req.request_id = str(next(self._ids))
                    while req.request_id in self.requests:  # never one a user chose
                        req.request_id = str(next(self._ids))
                self.requests[req.request_id] = req
                self._num_sampling += not req.params.greedy
                self._num_logprobs += req.params.logprobs is not None
            add = self.scheduler.add
            if self._gate.in_step_elsewhere():
                self._gate.posted.extend(lambda r=r: add(r) for r in reqs)
            else:
                for req in reqs:
                    add(req)

    def _abort_now(self, req: Request) -> None:
        if req.is_done:
            return
        running = req.status is Status.RUNNING
        self.book.retire(req, Status.ABORTED, "abort", self.clock())
        if running:
            self.scheduler.remove_running(req)

    def _drain(self) -> None:
        """What other threads posted during the step, in order (the gate's lock is held)."""
        posted = self._gate.posted
        for fn in posted:
            fn()
        posted.clear()

    def _step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        self._apply_copies(plan)
        self.advance_decode_rows(plan)
        started = now = self.clock()
        book = self.book
        failed: list[Request] = []  # requests whose model work or sampling failed this step
        new_tokens: list[tuple[Request, list[int]]] = []
        if plan.prefill:
            sampled = dict(self._prefill(plan, failed))
            # in the plan's order (decode rows join in it), whatever order the calls ran in
            new_tokens = [(req, sampled[req]) for req, _, _ in plan.prefill if req in sampled]
            for req, _, n in plan.prefill:
                book.prefilled(req, n, now)
        # A copy: retiring a request during this step moves the rows (BlockTables.leave).
        reqs = self.decode_tables.handles.copy()
        targets = rows = None
        if reqs:
            try:
                targets, rows, bad = self._decode(reqs)
            except Exception:
                logger.exception("the decode call for %d requests failed; they end with "
                                 "finish_reason 'error'", len(reqs))
                failed.extend(reqs)
            else:
                if bad:  # rows without a token: their requests fail, the others take theirs
                    failed.extend(reqs[i] for i in bad)
                    keep = [i for i in range(len(reqs)) if i not in bad]
                    reqs, targets = [reqs[i] for i in keep], [targets[i] for i in keep]
                    rows = None if rows is None else [rows[i] for i in keep]
        now = self.clock()
        for req in failed:  # first: they get no token of this step, and their pages go back
            if not req.is_done:
                book.retire(req, Status.ABORTED, "error", now)
        generated = 0
        # Emit only once every model call is done: a callback may abort any request.
        for req, tokens in new_tokens:
            generated += book.emit(req, tokens, now)
            if req.status is Status.RUNNING:  # its prefill is done: it decodes from next step
                self.decode_tables.join(req, req.seq.pages, req.seq.num_tokens)
        if targets is not None:
            generated += self._take_decoded(reqs, targets, rows, now)
        if self._logprobs:
            self._record_logprobs()
        book.end_step(plan, now, now - started, generated)
        return plan

    # --- model calls ------------------------------------------------------------------------
    def _prefill(self, plan: StepPlan, failed: list[Request]) -> list[tuple[Request, list[int]]]:
        """The step's prefill chunks in the model calls group_chunks makes (one per chunk when
        batched_prefill is off), on rows of the prefill tables rebuilt in the calls' order, so
        each call's block_table / cache_seqlens are contiguous rows (views). Returns (request,
        [sampled token]) for each chunk that completes its request's prefill. A call that raises
        puts every request it carried in `failed`; a row whose logits are NaN (or whose sampler
        failed) puts its request there alone."""
        chunks = plan.prefill
        groups = group_chunks([n for _, _, n in chunks], self.config.prefill_padding)
        ordered = [chunks[i] for group in groups for i in group]
        reqs = [req for req, _, _ in ordered]
        try:
            block_table, cache_seqlens = self.prefill_tables.rebuild([r.seq for r in reqs], reqs)
        except Exception:
            logger.exception("building the prefill tables failed; %d requests end with "
                             "finish_reason 'error'", len(reqs))
            failed.extend(reqs)
            return []
        done, first = [], 0
        for group in groups:
            calls = ordered[first:first + len(group)]
            rows = slice(first, first + len(group))
            first += len(group)
            last = [b for b, (req, start, n) in enumerate(calls) if start + n == req.num_prefill]
            try:
                batch = build_prefill_batch(
                    [req.request_id for req, _, _ in calls],
                    [req.token_ids[start:start + n] for req, start, n in calls], last,
                    block_table[rows], cache_seqlens[rows], self.page_size, self.metadata)
                logits = self.model.prefill(batch, self.pool)
                if not last:
                    continue
                ended = [calls[b][0] for b in last]
                tokens, bad = self._sample(logits[:, None], ended)
            except Exception:
                logger.exception("a prefill call for %d requests failed; they end with "
                                 "finish_reason 'error'", len(calls))
                failed.extend(req for req, _, _ in calls)
                continue
            failed.extend(ended[i] for i in bad)
            done.extend((req, tok) for i, (req, tok) in enumerate(zip(ended, tokens)) if i not in bad)
        return done

    def _decode(self, reqs: list[Request]
                ) -> tuple[list[list[int]], list[list[int]] | None, list[int]]:
        """One model call for every decoding request; reqs is the decode tables' row order.
        Returns the sampled tokens [B][s_q], in MTP mode each row's input tokens (last token +
        drafts), and the rows that could not be sampled (sample())."""
        s_q = self.config.s_q
        block_table, cache_seqlens = self.decode_tables.view()
        positions = (cache_seqlens.long() - s_q)[:, None] + self._q_offsets
        if s_q == 1:  # ints -> numpy -> torch: torch.tensor(list) is several times slower
            last = np.array([r.output_token_ids[-1] for r in reqs], dtype=np.int64)
            input_ids = torch.from_numpy(last).view(-1, 1).to(self.device)
            rows = None
        else:
            rows = [[r.output_token_ids[-1]] + propose_drafts(r.token_ids, s_q - 1) for r in reqs]
            input_ids = torch.tensor(rows, dtype=torch.int64, device=self.device)
        batch = DecodeBatch(
            request_ids=[r.request_id for r in reqs], input_ids=input_ids, positions=positions,
            slot_mapping=slot_mapping(block_table, positions, self.page_size).view(-1),
            block_table=block_table, cache_seqlens=cache_seqlens,
            mla_metadata=self.metadata(cache_seqlens, s_q),
        )
        logits = self.model.decode(batch, self.pool)
        tokens, bad = self._sample(logits, reqs)
        return tokens, rows, bad

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[list[int]], list[int]]:
        """sample(), plus the logprobs of the rows that asked for them (kept for
        _record_logprobs); rows that could not be sampled get none."""
        tokens, bad = self.sample(logits, reqs)
        if self._num_logprobs:
            rows = [b for b, r in enumerate(reqs) if r.params.logprobs is not None and b not in bad]
            if rows:
                found = token_logprobs(logits[rows], [tokens[b] for b in rows],
                                       [reqs[b].params.logprobs for b in rows])
                self._logprobs.extend((reqs[b], entries) for b, entries in zip(rows, found))
        return tokens, bad

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[list[int]], list[int]]:
        """Tokens [B][s_q] from logits [B, s_q, vocab] and the rows without one (NaN logits or
        a failed sampler: sample_batch), without building per-request lists while every row is
        greedy."""
        if self._num_sampling == 0:
            return sample_batch(logits, None)
        return sample_batch(logits, [r.params for r in reqs], [r.generator for r in reqs])

    def _record_logprobs(self) -> None:
        """Give each request the logprobs of the tokens it kept this step: the first k of its
        candidates, k = tokens appended (a stop token, max_new_tokens, an abort or rejected
        MTP drafts keep fewer than were sampled)."""
        for req, entries in self._logprobs:
            kept = entries[:len(req.output_token_ids) - len(req.logprobs)]
            req.logprobs.extend(lp for lp, _ in kept)
            if req.top_logprobs is not None:
                req.top_logprobs.extend(top for _, top in kept)
        self._logprobs.clear()

    def metadata(self, cache_seqlens: torch.Tensor, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLA split-KV metadata for one model call, shared by every layer."""
        h_kv = self.cache_config.num_kv_heads
        return get_mla_metadata(cache_seqlens, s_q * self.model.num_heads // h_kv, h_kv)

    def _take_decoded(self, reqs: list[Request], targets: list[list[int]],
                      rows: list[list[int]] | None, now: float) -> int:
        """Record the decode rows' tokens; returns how many were emitted."""
        if rows is None:
            return self.book.take_decoded(reqs, targets, now)
        generated, s_q, short = 0, self.config.s_q, self._short  # MTP
        short.clear()
        for req, row, target in zip(reqs, rows, targets):
            accepted = accept_drafts(row[1:], target)
            if len(accepted) < s_q:  # its sequence keeps spare slots: grows less next step
                short[req] = len(accepted)
            generated += self.book.accepted(req, accepted, now)
        return generated

    def _apply_copies(self, plan: StepPlan) -> None:
        """Copy the pages the plan's new sequences start from (a mid-page prefix-cache hit)
        before any model call writes: one gather + scatter over every layer. The scheduler
        took them from the sequences after its last allocation, so no page moved since."""
        if plan.copies:
            src, dst = zip(*plan.copies)
            self.pool.copy_pages(list(src), list(dst))

    # --- decode rows ------------------------------------------------------------------------
    def advance_decode_rows(self, plan: StepPlan) -> None:
        """Bring the decode tables up to the plan: preempted rows leave; rows whose sequence
        crossed into new pages get them; every row grows by the tokens the scheduler reserved:
        s_q, or fewer for MTP rows whose sequence kept spare slots. O(preempted + rows that
        cross a page) plus one pass over [B] for one-token decoding."""
        tables = self.decode_tables
        for req in plan.preempted:
            if req in tables:
                tables.leave(req)
        s_q, short = self.config.s_q, self._short
        grew = [short.get(req, s_q) for req in tables.handles] if short else s_q
        short.clear()
        new_pages = [(req, req.seq.pages[held:]) for req, held in tables.crossing(grew)]
        tables.grow(grew, plan.decode_kv_tokens, new_pages)

    def _on_retire(self, req: Request) -> None:
        if req in self.decode_tables:
            self.decode_tables.leave(req)
        with self._gate.lock:  # submit() on another thread changes these
            self._num_sampling -= not req.params.greedy
            self._num_logprobs -= req.params.logprobs is not None
            self._forget(req)

    def _forget(self, req: Request) -> None:
        """A finished request needs no callback or generator; its bookkeeping goes once
        retain_finished newer ones have finished (its handle keeps the outputs). O(1)."""
        req.on_token = None
        req.generator = None
        finished = self._finished
        finished.append(req.request_id)
        if len(finished) > self.retain_finished:
            del self.requests[finished.popleft()]
