"""ModelRunner: the engine's model calls, each a unit of work that fails alone.

A unit is one prefill call (the chunks group_chunks puts together, runtime/prefill.py; one chunk
when batched_prefill is off) or the whole decode batch (its inputs, MLA metadata, call and
sampling). MTP rows (s_q = 1 + k) carry the last token plus k prompt-lookup drafts
(runtime/drafts.py); a row keeps the drafts that equal the token sampled before them.

Invariants:
  - A unit that raises puts every request it carried in the caller's `failed` and returns
    nothing for them; a row with NaN logits, or whose sampler raised, puts its request there
    alone. The engine ends them (finish_reason "error") before it emits any token, and no other
    request's KV or tokens were touched: undoing the step instead would need the scheduler's
    preemptions rolled back and would retry a deterministic failure forever.
  - The decode tables hold exactly the requests that decode, in the decode batch's row order:
    a request joins when its prefill ends and leaves when it is preempted or retired.
  - `_short` holds the MTP rows that accepted fewer than s_q tokens last step (their sequences
    kept spare slots); advance_decode_rows consumes it.
  - The logprobs sampled this step wait in `_logprobs` until record_logprobs(), which runs once
    the tokens are kept, so RequestOutput.logprobs stays aligned with the tokens.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from kvpager import BlockTables, PagePool, get_mla_metadata, slot_mapping
from kvpager.runtime.bookkeeping import Bookkeeping
from kvpager.runtime.drafts import accept_drafts, propose_drafts
from kvpager.runtime.intake import Intake
from kvpager.runtime.models.protocol import DecodeBatch, Model
from kvpager.runtime.prefill import build_prefill_batch, group_chunks
from kvpager.runtime.request import Request
from kvpager.runtime.sampling import sample_batch, token_logprobs
from kvpager.runtime.scheduler import SchedulerConfig, StepPlan

logger = logging.getLogger("kvpager")

Chunk = tuple[Request, int, int]  # (request, start, num_tokens): StepPlan.prefill's rows
Decoded = tuple[list[Request], list[list[int]], list[list[int]] | None]  # reqs, targets, rows


class ModelRunner:
    def __init__(self, model: Model, pool: PagePool, config: SchedulerConfig, max_pages: int,
                 device: torch.device, intake: Intake) -> None:
        self.model, self.pool, self.config, self.intake = model, pool, config, intake
        self.page_size = ps = pool.page_size
        self.device = device
        # Rows keyed by Request. Decode rows follow events (join, leave, advance_decode_rows);
        # prefill rows are rebuilt each step from its chunks (a few rows, each a whole chunk).
        self.decode_tables = BlockTables(config.max_batch_size, max_pages, device, ps)
        self.prefill_tables = BlockTables(config.max_batch_size, max_pages, device, ps)
        self._q_offsets = torch.arange(config.s_q, device=device)
        self._short: dict[Request, int] = {}
        self._logprobs: list[tuple[Request, list[tuple[float, dict[int, float] | None]]]] = []

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

    def join(self, req: Request) -> None:
        """req's prefill is done: it decodes from the next step."""
        self.decode_tables.join(req, req.seq.pages, req.seq.num_tokens)

    def leave(self, req: Request) -> None:
        if req in self.decode_tables:
            self.decode_tables.leave(req)

    def apply_copies(self, plan: StepPlan) -> None:
        """Copy the pages the plan's new sequences start from (a mid-page prefix-cache hit)
        before any model call writes: one gather + scatter over every layer. The scheduler
        took them from the sequences after its last allocation, so no page moved since."""
        if plan.copies:
            src, dst = zip(*plan.copies)
            self.pool.copy_pages(list(src), list(dst))

    # --- the units --------------------------------------------------------------------------
    def prefill(self, chunks: list[Chunk], failed: list[Request]) -> list[tuple[Request, list[int]]]:
        """The step's prefill chunks in the calls group_chunks makes, on rows of the prefill
        tables rebuilt in the calls' order, so each call's block_table / cache_seqlens are
        contiguous rows (views). Returns (request, [sampled token]) for each chunk that
        completes its request's prefill, in the chunks' order (decode rows join in it)."""
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
        done, first = {}, 0
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
            done.update((req, tok) for i, (req, tok) in enumerate(zip(ended, tokens)) if i not in bad)
        return [(req, done[req]) for req, _, _ in chunks if req in done]

    def decode(self, failed: list[Request]) -> Decoded | None:
        """One model call for every decoding request, in the decode tables' row order. Returns
        the requests that got tokens, their sampled tokens [B][s_q] and, in MTP mode, their
        input rows (last token + drafts); None when nobody decodes or the unit failed."""
        # A copy: retiring a request during this step moves the rows (BlockTables.leave).
        reqs = self.decode_tables.handles.copy()
        if not reqs:
            return None
        try:
            targets, rows, bad = self._decode(reqs)
        except Exception:
            logger.exception("the decode call for %d requests failed; they end with "
                             "finish_reason 'error'", len(reqs))
            failed.extend(reqs)
            return None
        if bad:  # rows without a token: their requests fail, the others take theirs
            failed.extend(reqs[i] for i in bad)
            keep = [i for i in range(len(reqs)) if i not in bad]
            reqs, targets = [reqs[i] for i in keep], [targets[i] for i in keep]
            rows = None if rows is None else [rows[i] for i in keep]
        return reqs, targets, rows

    def _decode(self, reqs: list[Request]
                ) -> tuple[list[list[int]], list[list[int]] | None, list[int]]:
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

    def take_decoded(self, decoded: Decoded, book: Bookkeeping, now: float) -> int:
        """Record the decode rows' tokens (MTP: the accepted ones); returns how many were
        emitted."""
        reqs, targets, rows = decoded
        if rows is None:
            return book.take_decoded(reqs, targets, now)
        generated, s_q, short = 0, self.config.s_q, self._short
        short.clear()
        for req, row, target in zip(reqs, rows, targets):
            accepted = accept_drafts(row[1:], target)
            if len(accepted) < s_q:  # its sequence keeps spare slots: grows less next step
                short[req] = len(accepted)
            generated += book.accepted(req, accepted, now)
        return generated

    # --- what every unit shares -------------------------------------------------------------
    def metadata(self, cache_seqlens: torch.Tensor, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLA split-KV metadata for one model call, shared by every layer."""
        h_kv = self.pool.num_kv_heads
        return get_mla_metadata(cache_seqlens, s_q * self.model.num_heads // h_kv, h_kv)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[list[int]], list[int]]:
        """Tokens [B][s_q] from logits [B, s_q, vocab] and the rows without one (NaN logits or
        a failed sampler: sample_batch), without building per-request lists while every row is
        greedy."""
        if self.intake.num_sampling == 0:
            return sample_batch(logits, None)
        return sample_batch(logits, [r.params for r in reqs], [r.generator for r in reqs])

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[list[int]], list[int]]:
        """sample(), plus the logprobs of the rows that asked for them (kept for
        record_logprobs); rows that could not be sampled get none."""
        tokens, bad = self.sample(logits, reqs)
        if self.intake.num_logprobs:
            rows = [b for b, r in enumerate(reqs) if r.params.logprobs is not None and b not in bad]
            if rows:
                found = token_logprobs(logits[rows], [tokens[b] for b in rows],
                                       [reqs[b].params.logprobs for b in rows])
                self._logprobs.extend((reqs[b], entries) for b, entries in zip(rows, found))
        return tokens, bad

    def record_logprobs(self) -> None:
        """Give each request the logprobs of the tokens it kept this step: the first k of its
        candidates, k = tokens appended (a stop token, max_new_tokens, an abort or rejected
        MTP drafts keep fewer than were sampled)."""
        for req, entries in self._logprobs:
            kept = entries[:len(req.output_token_ids) - len(req.logprobs)]
            req.logprobs.extend(lp for lp, _ in kept)
            if req.top_logprobs is not None:
                req.top_logprobs.extend(top for _, top in kept)
        self._logprobs.clear()
