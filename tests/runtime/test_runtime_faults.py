"""Exception-safe steps (issue 12, failure 10): a stateful machine injects faults at random steps
— the model raises in prefill or decode (after writing part of its KV), NaN logits in a row,
the sampler raises, a callback raises or re-enters step() — and checks after every step that
exactly the requests the failed work was for ended with finish_reason "error", every other
request's output equals its output run alone, no page leaks and the tables agree.

CacheModel reads its own KV back through block_table / cache_seqlens, and its next token
depends on every cached token, so a wrong page, a stale row or a lost write changes the output.
"""
from collections import Counter

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpager.config import CacheConfig
from kvpager.errors import RequestTooLarge
from kvpager.runtime import sampling
from kvpager.runtime.engine import Engine
from kvpager.runtime.request import DONE, SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 32
KINDS = ("prefill_raises", "decode_raises", "nan_prefill", "nan_decode", "sampler_raises",
         "callback_raises", "callback_steps")


def next_token(history: list[int]) -> int:
    """The model's rule: a function of every token so far."""
    return (sum(history) * 7 + len(history) - 1) % VOCAB


def oracle(prompt: list[int], params: SamplingParams) -> list[int]:
    """The request's output run alone (test_oracle_is_the_output_run_alone checks it)."""
    tokens, out = list(prompt), []
    while len(out) < params.max_new_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in params.stop_token_ids:
            break
    return out


class CacheModel:
    """Writes (token id + 1, position + 1) as each token's latent, then computes each query's
    next token from the tokens read back from the cache. Faults are armed per step."""

    num_layers, num_heads, vocab_size, device = 1, 4, VOCAB, torch.device("cpu")

    def __init__(self):
        self.armed: dict[str, int] = {}
        self.failed: set[str] = set()  # request ids whose work this model failed

    @staticmethod
    def cache_config(num_pages):
        return CacheConfig(num_layers=1, num_pages=num_pages, head_dim=2, head_dim_v=1,
                           dtype="float32")

    def _write(self, pool, slots, ids, positions):
        latent = torch.stack([ids.reshape(-1) + 1, positions.reshape(-1) + 1], dim=1).float()
        pool.write(0, slots, latent)

    def _history(self, pool, table_row, length):
        pages = table_row[:-(-length // 64)].long()
        kv = pool.layer(0)[pages].reshape(-1, 2)[:length]
        if not torch.equal(kv[:, 1], torch.arange(1, length + 1, dtype=kv.dtype)):
            raise AssertionError("the cache holds stale or misplaced KV")  # a real bug: no fault
        return (kv[:, 0] - 1).long().tolist()

    def _one_hot(self, tokens):
        return torch.nn.functional.one_hot(torch.tensor(tokens), VOCAB).float()

    def prefill(self, batch, pool):
        """The batched protocol: left-padded rows (their writes go to the null page); logits
        for the rows in logits_rows. A raising call fails every request it carries."""
        self._write(pool, batch.slot_mapping, batch.input_ids, batch.positions)
        if self.armed.pop("prefill_raises", None) is not None:
            self.failed.update(batch.request_ids)
            raise RuntimeError("injected: prefill failed after writing its KV")
        rows = batch.logits_rows.tolist()
        if not rows:
            return torch.zeros(0, VOCAB)
        logits = self._one_hot([next_token(self._history(pool, batch.block_table[b],
                                                         int(batch.cache_seqlens[b])))
                                for b in rows])
        if self.armed.pop("nan_prefill", None) is not None:
            self.failed.add(batch.request_ids[rows[0]])
            logits[0, 3] = float("nan")
        return logits

    def decode(self, batch, pool):
        self._write(pool, batch.slot_mapping, batch.input_ids, batch.positions)
        if self.armed.pop("decode_raises", None) is not None:
            self.failed.update(batch.request_ids)
            raise RuntimeError("injected: device error in the decode call")
        s_q = batch.s_q
        rows = []
        for b in range(len(batch.request_ids)):
            history = self._history(pool, batch.block_table[b], int(batch.cache_seqlens[b]))
            cut = len(history) - s_q
            rows.append([next_token(history[:cut + i + 1]) for i in range(s_q)])
        logits = self._one_hot(rows)
        row = self.armed.pop("nan_decode", None)
        if row is not None:
            row %= len(rows)
            self.failed.add(batch.request_ids[row])
            logits[row, -1, 0] = float("nan")
        return logits


class FaultMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(3, 8), mtp=st.integers(0, 1),
                budget=st.sampled_from([16, 64, 200]))
    def setup(self, num_pages, mtp, budget):
        config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=max(budget, 4 * (1 + mtp)),
                                 admit_headroom_pages=0, num_speculative_tokens=mtp,
                                 max_model_len=400)
        self.model = CacheModel()
        self.engine = Engine(self.model, CacheModel.cache_config(num_pages), config)
        self.handles = {}  # request id -> (handle, prompt, params)
        self.callback_fault: dict[str, str] = {}  # armed this step: request id -> kind
        self.by_generator = {}
        self._real_sample_row = sampling.sample_row
        sampling.sample_row = self._sample_row

    def teardown(self):
        if hasattr(self, "engine"):
            sampling.sample_row = self._real_sample_row
            self.model.armed.clear()
            for _ in range(3000):  # everything left finishes
                if not self.engine.has_unfinished():
                    break
                self.engine.step()
            assert self.engine.allocator.num_used == 0
            self.check_outputs()

    # -- faults outside the model ------------------------------------------------------------
    def _sample_row(self, logits, params, generator):
        if self.model.armed.pop("sampler_raises", None) is not None:
            self.model.failed.add(self.by_generator[id(generator)])
            raise RuntimeError("injected: the sampler failed")
        return self._real_sample_row(logits, params, generator)

    def _on_token(self, rid, token):
        kind = self.callback_fault.pop(rid, None)
        if kind is None:
            return
        self.model.failed.add(rid)
        if kind == "callback_steps":
            self.engine.step()  # ReentrantStep, which ends the request like any raise
            raise AssertionError("step() from a callback must raise")
        raise RuntimeError("injected: the consumer broke")

    # -- rules --------------------------------------------------------------------------------
    @rule(prompt_len=st.integers(1, 120), new=st.integers(1, 60), stop=st.booleans(),
          sampled=st.booleans(), seed=st.integers(0, VOCAB - 1))
    def submit(self, prompt_len, new, stop, sampled, seed):
        # temperature 1 with top_k 1 samples through sample_row and still picks the argmax
        params = SamplingParams(max_new_tokens=new, stop_token_ids=(5,) if stop else (),
                                temperature=1.0 if sampled else 0.0, top_k=1, seed=seed)
        prompt = [(seed + 3 * i) % VOCAB for i in range(prompt_len)]
        try:
            h = self.engine.submit(prompt, params, on_token=self._on_token)
        except RequestTooLarge:
            return
        req = self.engine.requests[h.request_id]
        if req.generator is not None:
            self.by_generator[id(req.generator)] = h.request_id
        self.handles[h.request_id] = (h, prompt, params)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def abort(self, data):
        self.engine.abort(data.draw(st.sampled_from(sorted(self.handles))))

    @rule(faults=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 7)), max_size=2),
          steps=st.integers(1, 4))
    def step(self, faults, steps):
        model, engine = self.model, self.engine
        for _ in range(steps):
            model.failed.clear()
            running = [r.request_id for r in engine.scheduler.running]
            for kind, which in faults:
                if kind.startswith("callback"):
                    if running:
                        self.callback_fault[running[which % len(running)]] = kind
                else:
                    model.armed[kind] = which
            engine.step()
            model.armed.clear()
            self.callback_fault.clear()
            errored = {rid for rid, (h, _, _) in self.handles.items() if h.finish_reason == "error"}
            for rid in model.failed:
                assert self.handles[rid][0].finish_reason == "error", rid
            self.failed_ever = getattr(self, "failed_ever", set()) | model.failed
            assert errored <= self.failed_ever, errored - self.failed_ever
            faults = []  # only the first step of the rule is faulty

    # -- checks after every rule -----------------------------------------------------------------
    def check_outputs(self):
        for rid, (h, prompt, params) in self.handles.items():
            want, got = oracle(prompt, params), h.output_token_ids
            if h.finish_reason in ("length", "stop"):
                assert got == want, rid
            else:
                assert got == want[:len(got)], rid

    @invariant()
    def outputs_pages_and_tables_agree(self):
        eng = self.engine
        self.check_outputs()
        eng.allocator.check_invariants(Counter(p for r in eng.scheduler.running for p in r.seq.pages))
        for h, _, _ in self.handles.values():
            req = h._request
            assert (req.seq is None) == (req.status is not Status.RUNNING)
            assert (req.status in DONE) == (h.finish_reason is not None)
        rows = eng.decode_tables.handles
        assert sorted(map(id, rows)) == sorted(
            id(r) for r in eng.scheduler.running if not r.is_prefilling)
        eng.decode_tables.check([r.seq for r in rows], rows)
        assert eng.intake.num_sampling == sum(
            1 for h, _, p in self.handles.values() if not p.greedy and not h.finished)


TestFaults = FaultMachine.TestCase
# Follows the profile: ci 100 examples -> 40, long 1000 -> 400.
TestFaults.settings = settings(max_examples=max(10, settings.default.max_examples * 2 // 5),
                               stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("mtp", [0, 1])
def test_oracle_is_the_output_run_alone(mtp):
    config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64,
                             num_speculative_tokens=mtp, max_model_len=400)
    cases = [([1, 2, 3], SamplingParams(max_new_tokens=70)),
             ([(7 * i) % VOCAB for i in range(100)], SamplingParams(max_new_tokens=30, stop_token_ids=(5,)))]
    for prompt, params in cases:
        engine = Engine(CacheModel(), CacheModel.cache_config(8), config)
        assert list(engine.generate([prompt], params)[0].token_ids) == oracle(prompt, params)


class FlakyDecode(CacheModel):
    """Raises in chosen decode calls (counted from 1)."""

    def __init__(self, fail_steps):
        super().__init__()
        self.fail_steps, self.calls = set(fail_steps), 0

    def decode(self, batch, pool):
        self.calls += 1
        if self.calls in self.fail_steps:
            self.armed["decode_raises"] = 0
        return super().decode(batch, pool)


def test_a_failed_decode_call_ends_its_rows_and_nothing_else():
    # Issue 12, failure 10: the step raised, co-running requests got wrong tokens from then on,
    # and the request whose prefill finished in that step kept its pages forever.
    config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_model_len=400)
    model = FlakyDecode(fail_steps=[2])  # decode calls: steps 2, 3, ...; the second fails
    eng = Engine(model, CacheModel.cache_config(16), config)
    params = SamplingParams(max_new_tokens=12)
    early = eng.submit([1, 2, 3], params)
    for _ in range(2):
        eng.step()
    late = eng.submit([4] * 50, params)  # its prefill ends in the failing step
    eng.step()  # the decode call raises: `early` is the only decode row
    assert early.finish_reason == "error" and late.status is Status.RUNNING
    assert model.failed == {early.request_id}
    after = eng.submit([9, 8, 7], params)
    while eng.has_unfinished():
        eng.step()
    assert late.output_token_ids == oracle([4] * 50, params)
    assert after.output_token_ids == oracle([9, 8, 7], params)
    assert eng.allocator.num_used == 0 and eng.decode_tables.batch_size == 0
    eng.allocator.check_invariants({})
    s = eng.metrics.summary()
    assert (s["requests_finished"], s["requests_failed"]) == (2, 1)


def test_nan_logits_in_a_sampled_row_end_that_request_only():
    class NanFor(CacheModel):
        def decode(self, batch, pool):
            logits = super().decode(batch, pool)
            if "bad" in batch.request_ids:
                logits[batch.request_ids.index("bad")] = float("nan")
            return logits

    config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_model_len=400)
    eng = Engine(NanFor(), CacheModel.cache_config(16), config)
    sampled = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=3, seed=1)
    bad = eng.submit([3, 1], sampled, request_id="bad")
    good = eng.submit([5, 5, 5], SamplingParams(max_new_tokens=6))
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and len(bad.output_token_ids) == 1  # from the prefill
    assert good.output_token_ids == oracle([5, 5, 5], SamplingParams(max_new_tokens=6))
    assert good.finish_reason == "length"
    assert eng.allocator.num_used == 0 and eng.intake.num_sampling == 0
