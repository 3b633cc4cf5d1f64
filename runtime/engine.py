"""The continuous-batching engine: submit / abort at any time, `step()` runs one scheduled step
through the model, `generate()` runs an offline batch to completion.

One step: the scheduler plans (admissions, chunks, preemptions, page appends); each prefill chunk
is one model call (batch of one, causal); all decoding requests are one model call with the block
table, cache_seqlens and MLA metadata computed once; the engine samples, appends tokens, and
retires finished requests, freeing their pages before the step returns.

MTP / speculative mode (num_speculative_tokens = k > 0): each decode row is the last token plus k
draft tokens proposed by prompt lookup (the longest recent n-gram match in the request's own
tokens; model-free). The model returns logits for all 1 + k positions; drafts are accepted while
they equal the token sampled at the previous position, so the output is exactly what one-token
decoding would produce, one or more tokens per step.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence as Seq

import numpy as np
import torch

from kvpager.allocator import BlockAllocator
from kvpager.config import CacheConfig
from kvpager.errors import ConfigError, DuplicateRequest, RequestError, UnknownRequest
from kvpager.mla import get_mla_metadata
from kvpager.pool import PagePool
from kvpager.table_events import EventTables
from kvpager.tables import BatchTables
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.protocol import DecodeBatch, Model, PrefillChunk
from kvpager.runtime.request import Request, RequestHandle, SamplingParams, Status, Timings
from kvpager.runtime.sampling import make_generator, sample_batch, sample_row
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan, check_fits

logger = logging.getLogger("kvpager")


class Engine:
    def __init__(self, model: Model, cache_config: CacheConfig,
                 config: SchedulerConfig | None = None, clock: Callable[[], float] = time.perf_counter):
        self.config = config = config or SchedulerConfig()
        if model.num_layers != cache_config.num_layers:
            raise ConfigError(f"model has {model.num_layers} layers but CacheConfig.num_layers="
                              f"{cache_config.num_layers}; build the cache for the model")
        self.model, self.cache_config, self.clock = model, cache_config, clock
        self.pool = PagePool(cache_config)
        self.allocator = BlockAllocator(cache_config.resolved_num_pages)
        ps = self.page_size = cache_config.page_size
        self.scheduler = Scheduler(config, self.allocator, ps)
        self.max_pages = self.scheduler.max_pages
        device = torch.device(cache_config.device)
        # Decode rows, driven by events: a request joins when its prefill ends and leaves when
        # it is retired or preempted; rows[i] holds decode_tables row i (the decode batch order).
        self.decode_tables = EventTables(config.max_batch_size, self.max_pages, device, ps)
        self.rows: list[Request] = []
        self._short: dict[Request, int] = {}  # MTP rows that accepted fewer than s_q tokens
        self.prefill_tables = BatchTables(1, self.max_pages, device, ps)
        self.device = device
        self.requests: dict[str, Request] = {}  # every request ever submitted, by id
        self.metrics = Metrics(self.allocator.num_pages)
        self._ids = itertools.count()
        self._q_offsets = torch.arange(config.s_q, device=device)
        self._num_sampling = 0  # unfinished requests that do not decode greedily
        self._retired = 0  # requests retired during the current step

    # --- public API --------------------------------------------------------------------------
    def submit(self, prompt_token_ids: Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None, on_token: Callable[[str, int], None] | None = None,
               arrival_time: float | None = None) -> RequestHandle:
        """Queue a request; raises RequestError subclasses for bad input, nothing else changes.
        on_token(request_id, token) is called for every generated token, in order."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise RequestError("empty prompt: a request needs at least one prompt token")
        if any(t < 0 or t >= self.model.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {self.model.vocab_size})")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise DuplicateRequest(f"request id {request_id!r} was already submitted; use a new id")
        check_fits(len(prompt), params.max_new_tokens, self.config, self.allocator.num_pages,
                   self.page_size)
        req = Request(request_id, prompt, len(prompt), params,
                      Timings(self.clock() if arrival_time is None else arrival_time),
                      on_token=on_token, generator=make_generator(params, self.device))
        if not params.greedy:
            self._num_sampling += 1
        self.requests[request_id] = req
        self.scheduler.add(req)
        return RequestHandle(req, self)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its pages; aborting a finished request does nothing."""
        req = self.requests.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request with id {request_id!r} was submitted")
        if req.is_done:
            return
        running = req.status is Status.RUNNING
        self._retire(req, Status.ABORTED, "abort", self.clock())
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
                 ) -> list[list[int]]:
        """Run prompts to completion (with anything already queued); their outputs, in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while not all(h.finished for h in handles):
            self.step()
        return [h.output_token_ids for h in handles]

    def step(self) -> StepPlan:
        """Plan and run one step; returns the plan (what ran, what was preempted).

        Per-request Python for a one-token decode row (the hot case at large batches): one
        pass in the scheduler, one to gather input ids, one to take the sampled token
        (`_take_decoded`); the decode tables cost O(changed rows) (`_advance_rows`). Measured
        by `kvpager bench scheduler`."""
        plan = self.scheduler.schedule()
        self._advance_rows(plan)
        started = now = self.clock()
        new_tokens: list[tuple[Request, list[int]]] = []
        for req, start, n, slots in plan.prefill:
            if req.timings.admitted is None:
                req.timings.admitted = now
            logits = self._prefill(req, start, n, slots)
            req.num_computed += n
            if logits is not None:
                new_tokens.append((req, [sample_row(logits, req.params, req.generator)]))
        # A copy: retiring a request during this step moves the rows (EventTables.leave).
        reqs = self.rows.copy()
        decoded = self._decode(reqs) if reqs else None
        now = self.clock()
        self._retired = 0
        generated = 0
        # Emit only once every model call is done: a callback may abort any request.
        for req, tokens in new_tokens:
            generated += self._emit(req, tokens, now)
            if req.status is Status.RUNNING:  # its prefill is done: it decodes from next step
                self._join(req)
        if decoded is not None:
            generated += self._take_decoded(reqs, *decoded, now)
        if self._retired:
            self.scheduler.drop_retired()
        if not plan.empty or plan.preempted:
            self._record_step(plan, now, now - started, generated)
        return plan

    # --- model calls ------------------------------------------------------------------------
    def _prefill(self, req: Request, start: int, n: int, slots: torch.Tensor) -> torch.Tensor | None:
        ids = torch.tensor(req.token_ids[start:start + n], dtype=torch.int64, device=self.device)
        block_table, cache_seqlens = self.prefill_tables.update([req.seq])
        chunk = PrefillChunk(
            request_id=req.request_id, input_ids=ids,
            positions=torch.arange(start, start + n, device=self.device),
            slot_mapping=slots.to(self.device), block_table=block_table, cache_seqlens=cache_seqlens,
            mla_metadata=self._metadata(cache_seqlens, n), is_last=start + n == req.num_prefill,
        )
        return self.model.prefill(chunk, self.pool)

    def _decode(self, reqs: list[Request]) -> tuple[list[list[int]], list[list[int]] | None]:
        """One model call for every decoding request; reqs is `rows` (the tables' row order).
        Returns the sampled tokens [B][s_q] and, in MTP mode, each row's input tokens (last
        token + drafts)."""
        s_q, ps = self.config.s_q, self.page_size
        block_table, cache_seqlens = self.decode_tables.view()
        positions = (cache_seqlens.long() - s_q)[:, None] + self._q_offsets
        slots = block_table.long().gather(1, positions // ps) * ps + positions % ps
        if s_q == 1:  # ints -> numpy -> torch: torch.tensor(list) is ~4x slower
            last = np.array([r.output_token_ids[-1] for r in reqs], dtype=np.int64)
            input_ids = torch.from_numpy(last).view(-1, 1).to(self.device)
            rows = None
        else:
            rows = [[r.output_token_ids[-1]] + propose_drafts(r.token_ids, s_q - 1) for r in reqs]
            input_ids = torch.tensor(rows, dtype=torch.int64, device=self.device)
        batch = DecodeBatch(
            request_ids=[r.request_id for r in reqs], input_ids=input_ids,
            positions=positions, slot_mapping=slots.reshape(-1), block_table=block_table,
            cache_seqlens=cache_seqlens, mla_metadata=self._metadata(cache_seqlens, s_q),
        )
        logits = self.model.decode(batch, self.pool)
        return self._sample(logits, reqs), rows

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[list[int]]:
        """sample_batch, without building per-request lists when every row is greedy (the
        argmax it would take anyway)."""
        if self._num_sampling == 0:
            return torch.argmax(logits, dim=-1).tolist()
        return sample_batch(logits, [r.params for r in reqs], [r.generator for r in reqs])

    def _take_decoded(self, reqs: list[Request], targets: list[list[int]],
                      rows: list[list[int]] | None, now: float) -> int:
        """Record the decode rows' tokens; returns how many were emitted. One-token rows that
        cannot end, stop or stream this step (Request.plain_until) take the inlined common
        case, one pass with no call per request; the rest go through _emit."""
        generated = 0
        if rows is not None:  # MTP
            s_q, short = self.config.s_q, self._short
            short.clear()
            for req, row, target in zip(reqs, rows, targets):
                accepted = accept_drafts(row[1:], target)
                req.num_computed += len(accepted)  # KV of the last token + the accepted drafts
                if len(accepted) < s_q:  # its sequence keeps spare slots: grows less next step
                    short[req] = len(accepted)
                generated += self._emit(req, accepted, now)
            return generated
        running = Status.RUNNING
        for req, (token,) in zip(reqs, targets):
            req.num_computed += 1
            n = req.num_generated
            if n < req.plain_until and req.status is running:
                req.output_token_ids.append(token)
                req.num_generated = n + 1
                req.timings.token_times.append(now)
                generated += 1
            else:
                generated += self._emit(req, [token], now)
        return generated

    def _metadata(self, cache_seqlens: torch.Tensor, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        h_kv = self.cache_config.num_kv_heads
        return get_mla_metadata(cache_seqlens, s_q * self.model.num_heads // h_kv, h_kv)

    # --- bookkeeping ------------------------------------------------------------------------
    def _emit(self, req: Request, tokens: list[int], now: float) -> int:
        """Append tokens until a stop token or max_new_tokens; retire if done. Returns count."""
        if req.is_done:  # aborted by a callback earlier in this step
            return 0
        p, t = req.params, req.timings
        for i, token in enumerate(tokens):
            req.output_token_ids.append(token)
            req.num_generated += 1
            if t.first_token is None:
                t.first_token = now
            t.token_times.append(now)
            self._callback(req, token)
            if req.is_done:  # the callback aborted it (or raised): retired once, already
                return i + 1
            if token in p.stop_token_ids or req.num_generated >= p.max_new_tokens:
                self._retire(req, Status.FINISHED, "stop" if token in p.stop_token_ids else "length", now)
                return i + 1
        return len(tokens)

    def _callback(self, req: Request, token: int) -> None:
        if req.on_token is None:
            return
        try:
            req.on_token(req.request_id, token)
        except Exception:  # a broken consumer must not take the engine down
            logger.exception("on_token callback of request %r raised; aborting it", req.request_id)
            self._retire(req, Status.ABORTED, "abort", self.clock())

    def _retire(self, req: Request, status: Status, reason: str, now: float) -> None:
        if req.row is not None:
            self._leave(req)
        self.scheduler.retire(req, status)
        self._retired += 1
        if not req.params.greedy:
            self._num_sampling -= 1
        req.finish_reason = reason
        req.timings.finished = now
        self.metrics.record_request(req)

    # --- decode rows (EventTables events) -------------------------------------------------------
    def _join(self, req: Request) -> None:
        req.row = self.decode_tables.join(req.seq)
        self.rows.append(req)

    def _leave(self, req: Request) -> None:
        """Drop req's row; the last row moves into the gap (EventTables.leave), so rows too."""
        row, rows = req.row, self.rows
        self.decode_tables.leave(row)
        last = rows.pop()
        if last is not req:
            rows[row] = last
            last.row = row
        req.row = None

    def _advance_rows(self, plan: StepPlan) -> None:
        """Bring the decode tables up to the plan: preempted rows leave, then every row grew by
        the tokens the scheduler reserved: s_q, or fewer for MTP rows whose sequence kept spare
        slots (grow() by the least, refresh() the rest). O(preempted + rows that cross a page)
        for one-token decoding."""
        for req in plan.preempted:
            if req.row is not None:
                self._leave(req)
        s_q, tables = self.config.s_q, self.decode_tables
        short = self._short
        if not short:
            tables.grow(s_q)
            return
        grew = {req: n for req, n in short.items() if req.row is not None}
        short.clear()
        if not grew:
            tables.grow(s_q)
            return
        least = min(grew.values())  # < s_q: rows not in `grew` grew by s_q
        tables.grow(least)
        for req in self.rows:
            if grew.get(req, s_q) != least:
                tables.refresh(req.row)

    def _record_step(self, plan: StepPlan, now: float, duration: float, generated: int) -> None:
        self.metrics.record_step(
            time=now, duration=duration, batch_size=len(plan.prefill) + len(plan.decode),
            prefill_tokens=plan.num_prefill_tokens, decode_tokens=len(plan.decode) * self.config.s_q,
            generated=generated, pages_used=self.allocator.num_used, pages_free=self.allocator.num_free,
            preemptions=len(plan.preempted), waiting=len(self.scheduler.waiting),
        )


def propose_drafts(token_ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting: find the most recent earlier occurrence of the last n tokens
    (n = max_ngram .. 1) and propose the k tokens that followed it; pad by repeating the last
    token. The search runs backwards at C speed (list.index over the reversed history), with
    Python work only per occurrence of the last token: ~20 µs on a 4k-token history where a
    token-by-token scan took ~3 ms when nothing matched."""
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
