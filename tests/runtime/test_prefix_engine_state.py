"""Stateful property test of the engine with prefix caching on: random submits of prompts that
share, extend and abandon prefixes, aborts and steps, in tiny pools (so pages are evicted and
requests preempted).

The model stores each token's id as its KV and computes the next token from the ids it reads
back from the cache (through the block table), so a request that read another request's KV, or a
page copied too late, gives a different output; it also asserts that what it reads is the
request's own tokens. After every step: allocator and cache invariants, refcounts equal the
running sequences' references, and every cached page holds the tokens its key names."""
from collections import Counter

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpager import slot_mapping
from kvpager.config import CacheConfig
from kvpager.errors import RequestTooLarge
from kvpager.runtime.engine import Engine
from kvpager.runtime.request import SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig

VOCAB = 32
STOP = 5


def next_token(ids_so_far_sum: int) -> int:
    return ids_so_far_sum * 7 % VOCAB


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    """What the model outputs for prompt alone (it depends on the request's own tokens only)."""
    total, out = sum(prompt), []
    while len(out) < params.max_new_tokens:
        token = next_token(total)
        out.append(token)
        total += token
        if token in params.stop_token_ids:
            break
    return out


class KVEchoModel:
    """Writes each token's id as its KV; the logits depend on the ids read back."""

    num_layers, num_heads, vocab_size, device = 1, 4, VOCAB, torch.device("cpu")

    def __init__(self):
        self.engine = None

    def _cached_ids(self, pool, block_table, upto: int) -> torch.Tensor:
        slots = slot_mapping(block_table, torch.arange(upto)[None], 64)[0]
        return pool.kv[0].view(-1, pool.kv.shape[-1])[slots, 0]

    def _write(self, pool, slots, ids):
        latent = ids.to(torch.float32)[:, None].expand(-1, pool.kv.shape[-1])
        pool.write(0, slots, latent)

    def _read_checked(self, request_id, pool, block_table, start):
        seen = self._cached_ids(pool, block_table, start).long().tolist()
        own = self.engine.requests[request_id].token_ids[:start]
        assert seen == own, f"request {request_id} read {seen} instead of its tokens {own}"
        return sum(seen)

    def prefill(self, batch, pool):
        """The batched protocol: row b's chunk is its last query_lens[b] columns (left padding,
        whose writes go to the null page)."""
        s_q = batch.input_ids.shape[1]
        self._write(pool, batch.slot_mapping, batch.input_ids.view(-1))
        logits = []
        for b, rid in enumerate(batch.request_ids):
            n = batch.query_lens[b]
            start = int(batch.positions[b, s_q - n])
            total = self._read_checked(rid, pool, batch.block_table[b:b + 1], start)
            logits.append(total + int(batch.input_ids[b, s_q - n:].sum()))
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(next_token(logits[b])), VOCAB).float()
                            for b in batch.logits_rows.tolist()]) if len(batch.logits_rows) else \
            torch.zeros(0, VOCAB)

    def decode(self, batch, pool):
        b, s_q = batch.input_ids.shape
        self._write(pool, batch.slot_mapping, batch.input_ids.view(-1))
        out = torch.zeros(b, s_q, VOCAB)
        for i, rid in enumerate(batch.request_ids):
            start = int(batch.positions[i, 0])
            total = self._read_checked(rid, pool, batch.block_table[i:i + 1], start)
            for j in range(s_q):
                total += int(batch.input_ids[i, j])
                out[i, j, next_token(total)] = 1.0
        return out


PREFIXES = [[(3 * j + k) % VOCAB for j in range(150)] for k in range(3)]


class CachingEngineMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(4, 8), mtp=st.integers(0, 1), headroom=st.integers(0, 1),
                budget=st.sampled_from([16, 48, 200]))
    def setup(self, num_pages, mtp, headroom, budget):
        config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=max(budget, 4 * (1 + mtp)),
                                 admit_headroom_pages=headroom, num_speculative_tokens=mtp,
                                 max_model_len=240, enable_prefix_caching=True)
        cache = CacheConfig(num_layers=1, num_pages=num_pages, dtype="float32")
        model = KVEchoModel()
        self.engine = model.engine = Engine(model, cache, config)
        self.handles, self.submitted = [], 0

    @rule(prefix=st.integers(0, 2), cut=st.integers(1, 150), tail=st.lists(st.integers(0, VOCAB - 1),
          max_size=40), new=st.integers(1, 90), stop=st.booleans())
    def submit(self, prefix, cut, tail, new, stop):
        prompt = PREFIXES[prefix][:cut] + tail
        params = SamplingParams(max_new_tokens=new, stop_token_ids=(STOP,) if stop else ())
        try:
            h = self.engine.submit(prompt, params)
        except RequestTooLarge:
            return
        self.submitted += 1
        self.handles.append((h, prompt, params))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def abort(self, data):
        h, _, _ = data.draw(st.sampled_from(self.handles))
        h.abort()

    @rule(n=st.integers(1, 8))
    def step(self, n):
        for _ in range(n):
            self.engine.step()

    @invariant()
    def pages_cache_and_outputs_are_right(self):
        eng = self.engine
        sched, cache = eng.scheduler, eng.scheduler.prefix.cache
        holders = Counter(p for r in sched.running for p in r.seq.pages)
        eng.allocator.check_invariants(holders)
        cache.check_invariants()
        kv = eng.pool.kv[0, :, :, 0, 0]
        for _, tokens, page in cache.entries():  # a cached page holds the tokens of its key
            assert kv[page].long().tolist() == list(tokens[-64:])
        for h, prompt, params in self.handles:
            if h.status is Status.FINISHED:
                assert h.output_token_ids == reference(prompt, params)
        for r in eng.requests.values():
            assert (r.seq is None) == (r.status is not Status.RUNNING)
        done = Counter(r.status for r in eng.requests.values())
        assert len(sched.running) + len(sched.waiting) + done[Status.FINISHED] \
            + done[Status.ABORTED] == self.submitted

    def teardown(self):
        if hasattr(self, "engine"):
            for _ in range(3000):
                if not self.engine.has_unfinished():
                    break
                self.engine.step()
            eng = self.engine
            assert not eng.has_unfinished() and eng.allocator.num_used == 0
            assert eng.allocator.num_free == eng.allocator.num_pages  # no leak
            for h, prompt, params in self.handles:
                if h.status is Status.FINISHED:
                    assert h.output_token_ids == reference(prompt, params)


TestCachingEngineState = CachingEngineMachine.TestCase
TestCachingEngineState.settings = settings(max_examples=max(10, settings.default.max_examples * 2 // 5),
                                          stateful_step_count=25, deadline=None)
