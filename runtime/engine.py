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
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence as Seq

import numpy as np
import torch

from kvpager import BlockAllocator, BlockTables, CacheConfig, PagePool, get_mla_metadata, slot_mapping
from kvpager.errors import ConfigError, DuplicateRequest, RequestError, UnknownRequest
from kvpager.runtime.bookkeeping import Bookkeeping
from kvpager.runtime.checks import (check_engine_args, check_prompt, check_request_id,
                                    check_submit_args, warn_cpu_threads)
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.protocol import DecodeBatch, Model
from kvpager.runtime.outputs import RequestOutput
from kvpager.runtime.prefill import build_prefill_batch, group_chunks
from kvpager.runtime.request import Request, RequestHandle, SamplingParams, Status, Timings
from kvpager.runtime.sampling import make_generator, sample_batch, token_logprobs
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan, check_fits


class Engine:
    """The serving loop's state: pool, allocator, scheduler, decode tables and the requests.

    Memory stays bounded however long it serves: `requests` holds the unfinished requests and
    only the last `retain_finished` finished ones (a finished request's callback and generator
    are dropped at once; its handle keeps the outputs), and `metrics` keeps aggregates and
    latency reservoirs, not per-step series (`full_metrics=True` keeps those, as the simulator
    does).

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

        prompt_token_ids: ints in [0, vocab_size) (a list, or an integer numpy array / torch
        tensor); params: a SamplingParams (default: greedy, 16 tokens); request_id: a str not
        in use (default: a fresh id, never one in use); on_token(request_id, token): called for
        every generated token, in order; arrival_time: a finite number on the engine's clock
        (default: now)."""
        params = SamplingParams() if params is None else params
        prompt = check_prompt(prompt_token_ids, self.model.vocab_size)
        check_submit_args(params, request_id, on_token, arrival_time)
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self.requests:  # never one a user chose
                request_id = str(next(self._ids))
        elif request_id in self.requests:
            raise DuplicateRequest(f"request id {request_id!r} was already submitted; use a new id")
        check_fits(len(prompt), params.max_new_tokens, self.config, self.allocator.num_pages,
                   self.page_size)
        req = Request(request_id, prompt, len(prompt), params,
                      Timings(self.clock() if arrival_time is None else float(arrival_time)),
                      on_token=on_token, generator=make_generator(params, self.device))
        if not params.greedy:
            self._num_sampling += 1
        if params.logprobs is not None:
            self._num_logprobs += 1
            req.logprobs = []
            req.top_logprobs = [] if params.logprobs else None
        self.requests[request_id] = req
        self.scheduler.add(req)
        return RequestHandle(req, self)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its pages; aborting a finished request does nothing."""
        check_request_id(request_id)
        req = self.requests.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request with id {request_id!r} is known: it was never "
                                 f"submitted, or it finished more than retain_finished="
                                 f"{self.retain_finished} requests ago")
        if req.is_done:
            return
        running = req.status is Status.RUNNING
        self.book.retire(req, Status.ABORTED, "abort", self.clock())
        if running:
            self.scheduler.remove_running(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def load(self) -> dict[str, int]:
        """How busy the engine is now: running and waiting requests, pages used and in the
        pool, and kv_tokens (tokens whose KV is cached for running requests). O(running)."""
        running = self.scheduler.running
        return {"running": len(running), "waiting": len(self.scheduler.waiting),
                "pages_used": self.allocator.num_used, "pages_total": self.allocator.num_pages,
                "kv_tokens": sum(r.num_computed for r in running)}

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (with anything already queued); their RequestOutputs
        (tokens, finish reason, logprobs if asked, timings), in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while not all(h.finished for h in handles):
            self.step()
        return [h.output() for h in handles]

    def step(self) -> StepPlan:
        """Plan and run one step; returns the plan (what ran, what was preempted).

        Per-request Python for a one-token decode row (the hot case at large batches): one
        pass in the scheduler, one to gather input ids, one to take the sampled token
        (Bookkeeping.take_decoded); the decode tables cost O(changed rows)
        (advance_decode_rows). Measured by `kvpager bench scheduler`."""
        plan = self.scheduler.schedule()
        self._apply_copies(plan)
        self.advance_decode_rows(plan)
        started = now = self.clock()
        book = self.book
        new_tokens: list[tuple[Request, list[int]]] = []
        if plan.prefill:
            sampled = dict(self._prefill(plan))
            # in the plan's order (decode rows join in it), whatever order the calls ran in
            new_tokens = [(req, sampled[req]) for req, _, _ in plan.prefill if req in sampled]
            for req, _, n in plan.prefill:
                book.prefilled(req, n, now)
        # A copy: retiring a request during this step moves the rows (BlockTables.leave).
        reqs = self.decode_tables.handles.copy()
        decoded = self._decode(reqs) if reqs else None
        now = self.clock()
        generated = 0
        # Emit only once every model call is done: a callback may abort any request.
        for req, tokens in new_tokens:
            generated += book.emit(req, tokens, now)
            if req.status is Status.RUNNING:  # its prefill is done: it decodes from next step
                self.decode_tables.join(req, req.seq.pages, req.seq.num_tokens)
        if decoded is not None:
            generated += self._take_decoded(reqs, *decoded, now)
        if self._logprobs:
            self._record_logprobs()
        book.end_step(plan, now, now - started, generated)
        return plan

    # --- model calls ------------------------------------------------------------------------
    def _prefill(self, plan: StepPlan):
        """The step's prefill chunks in the model calls group_chunks makes (one per chunk when
        batched_prefill is off), on rows of the prefill tables rebuilt in the calls' order, so
        each call's block_table / cache_seqlens are contiguous rows (views). Yields (request,
        [sampled token]) for each chunk that completes its request's prefill."""
        chunks = plan.prefill
        groups = group_chunks([n for _, _, n in chunks], self.config.prefill_padding)
        ordered = [chunks[i] for group in groups for i in group]
        reqs = [req for req, _, _ in ordered]
        block_table, cache_seqlens = self.prefill_tables.rebuild([r.seq for r in reqs], reqs)
        first = 0
        for group in groups:
            calls = ordered[first:first + len(group)]
            rows = slice(first, first + len(group))
            first += len(group)
            last = [b for b, (req, start, n) in enumerate(calls) if start + n == req.num_prefill]
            batch = build_prefill_batch(
                [req.request_id for req, _, _ in calls],
                [req.token_ids[start:start + n] for req, start, n in calls], last,
                block_table[rows], cache_seqlens[rows], self.page_size, self.metadata)
            logits = self.model.prefill(batch, self.pool)
            if last:
                done = [calls[b][0] for b in last]
                yield from zip(done, self._sample(logits[:, None], done))

    def _decode(self, reqs: list[Request]) -> tuple[list[list[int]], list[list[int]] | None]:
        """One model call for every decoding request; reqs is the decode tables' row order.
        Returns the sampled tokens [B][s_q] and, in MTP mode, each row's input tokens (last
        token + drafts)."""
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
        return self._sample(logits, reqs), rows

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[list[int]]:
        """sample(), plus the logprobs of the rows that asked for them (kept for
        _record_logprobs)."""
        tokens = self.sample(logits, reqs)
        if self._num_logprobs:
            rows = [b for b, r in enumerate(reqs) if r.params.logprobs is not None]
            if rows:
                found = token_logprobs(logits[rows], [tokens[b] for b in rows],
                                       [reqs[b].params.logprobs for b in rows])
                self._logprobs.extend((reqs[b], entries) for b, entries in zip(rows, found))
        return tokens

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[list[int]]:
        """Tokens [B][s_q] from logits [B, s_q, vocab]: sample_batch, without building
        per-request lists while every row is greedy (the argmax it would take anyway)."""
        if self._num_sampling == 0:
            return torch.argmax(logits, dim=-1).tolist()
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
        if not req.params.greedy:
            self._num_sampling -= 1
        if req.params.logprobs is not None:
            self._num_logprobs -= 1
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


def propose_drafts(token_ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting: find the most recent earlier occurrence of the last n tokens
    (n = max_ngram .. 1) and propose the k tokens that followed it; pad by repeating the last
    token. The search runs backwards at C speed (list.index over the reversed history), with
    Python work only per occurrence of the last token (a token-by-token scan is O(history)
    Python when nothing matches)."""
    if k == 0:
        return []
    size, last = len(token_ids), token_ids[-1]
    rev = token_ids[::-1]  # an occurrence ending at i starts at rev[size - 1 - i]
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail, j = rev[:n], 1  # j >= 1: the occurrence ends before the last token
        while True:
            try:
                j = rev.index(last, j, size - n + 1)
            except ValueError:
                if j == 1 and last not in rev[size - n + 1:]:
                    return [last] * k  # the last token never occurred before: no n-gram will
                break
            if rev[j:j + n] == tail:
                follow = token_ids[size - j:size - j + k]
                return follow + [last] * (k - len(follow))
            j += 1
    return [last] * k


def accept_drafts(drafts: list[int], targets: list[int]) -> list[int]:
    """targets[i] is the token sampled after input i (the last token, then the drafts).
    Returns the tokens to emit: targets[0], then targets[i] while drafts[i-1] matched."""
    accepted = [targets[0]]
    for draft, target in zip(drafts, targets[1:]):
        if draft != accepted[-1]:
            break
        accepted.append(target)
    return accepted
