"""Stateful property test of the engine with tiny pools: random submits, aborts and steps.

A fast stand-in model (the Protocol, no arithmetic) keeps hundreds of steps cheap; it also checks
that every step's slots are distinct and inside the rows' own pages."""
from collections import Counter

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpager import PAD_PAGE
from kvpager.config import CacheConfig
from kvpager.errors import RequestTooLarge
from kvpager.runtime.engine import Engine
from kvpager.runtime.request import DONE, SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig

VOCAB = 16


class EchoModel:
    """Logits favour (last input + 1) % VOCAB; validates the slot mapping it is given."""

    num_layers, num_heads, vocab_size, device = 1, 4, VOCAB, torch.device("cpu")

    def _check(self, slots, block_table, cache_seqlens, s_q, query_lens=None):
        """Real slots are distinct and in the row's own pages; a prefill row's left padding
        (s_q - query_lens[b] columns) writes only to the null page."""
        rows = slots.view(block_table.shape[0], s_q)
        real = []
        for b in range(block_table.shape[0]):
            pad = 0 if query_lens is None else s_q - query_lens[b]
            assert all(int(s) // 64 == PAD_PAGE for s in rows[b, :pad])
            pages = set(block_table[b, : (int(cache_seqlens[b]) + 63) // 64].tolist())
            assert {int(s) // 64 for s in rows[b, pad:]} <= pages
            real += rows[b, pad:].tolist()
        assert len(set(real)) == len(real)

    def _logits(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % VOCAB, VOCAB).float()

    def prefill(self, batch, pool):
        self._check(batch.slot_mapping, batch.block_table, batch.cache_seqlens, batch.s_q,
                    batch.query_lens)
        return self._logits(batch.input_ids[batch.logits_rows, -1])

    def decode(self, batch, pool):
        self.decoded = list(batch.request_ids)
        self._check(batch.slot_mapping, batch.block_table, batch.cache_seqlens, batch.s_q)
        return self._logits(batch.input_ids)


class EngineMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(2, 6), mtp=st.integers(0, 2), headroom=st.integers(0, 1),
                budget=st.sampled_from([16, 48, 200]))
    def setup(self, num_pages, mtp, headroom, budget):
        config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=max(budget, 4 * (1 + mtp)),
                                 admit_headroom_pages=headroom, num_speculative_tokens=mtp,
                                 max_model_len=512)
        cache = CacheConfig(num_layers=1, num_pages=num_pages, dtype="float32")
        self.engine = Engine(EchoModel(), cache, config)
        self.submitted = 0
        self.ids = []

    @rule(prompt_len=st.integers(1, 150), new=st.integers(1, 120), stop=st.booleans())
    def submit(self, prompt_len, new, stop):
        params = SamplingParams(max_new_tokens=new, stop_token_ids=(5,) if stop else ())
        try:
            h = self.engine.submit([i % VOCAB for i in range(prompt_len)], params)
        except RequestTooLarge:
            assert -(-(prompt_len + new + self.engine.config.s_q - 1) // 64) > self.engine.allocator.num_pages
            return
        self.submitted += 1
        self.ids.append(h.request_id)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def abort(self, data):
        self.engine.abort(data.draw(st.sampled_from(self.ids)))

    @rule(n=st.integers(1, 8))
    def step(self, n):
        model = self.engine.model
        for _ in range(n):
            model.decoded = []
            plan = self.engine.step()
            # The decode batch is the tables' rows (row order), exactly the plan's decoders.
            assert sorted(model.decoded) == sorted(r.request_id for r in plan.decode)

    @invariant()
    def pages_are_owned_once_and_released(self):
        eng = self.engine
        sched = eng.scheduler
        holders = Counter(p for r in sched.running for p in r.seq.pages)
        eng.allocator.check_invariants(holders)
        for r in eng.requests.values():
            if r.status in DONE or r.status in (Status.WAITING, Status.PREEMPTED):
                assert r.seq is None
            else:
                assert r.status is Status.RUNNING and r.seq.num_tokens >= r.num_computed
        done = Counter(r.status for r in eng.requests.values())
        assert len(sched.running) + len(sched.waiting) + done[Status.FINISHED] + done[Status.ABORTED] \
            == self.submitted
        assert all(r.status is Status.RUNNING for r in sched.running)
        assert len(sched.running) <= eng.config.max_batch_size
        # The event-driven decode tables hold every decoding request, rows dense, and nothing else.
        decoding = [r for r in sched.running if not r.is_prefilling]
        rows = eng.decode_tables.handles
        assert sorted(map(id, rows)) == sorted(map(id, decoding))
        assert [eng.decode_tables.row(r) for r in rows] == list(range(len(rows)))
        eng.decode_tables.check([r.seq for r in rows], rows)

    def teardown(self):
        if hasattr(self, "engine"):
            for _ in range(2000):  # everything left finishes: nothing starves
                if not self.engine.has_unfinished():
                    break
                self.engine.step()
            assert not self.engine.has_unfinished() and self.engine.allocator.num_used == 0


TestEngineState = EngineMachine.TestCase
# Follows the profile (HYPOTHESIS_PROFILE=long reaches it too): ci 100 examples -> 40, long -> 400.
TestEngineState.settings = settings(max_examples=max(10, settings.default.max_examples * 2 // 5),
                                    stateful_step_count=25, deadline=None)
