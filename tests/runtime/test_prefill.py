"""Batched prefill: the chunk grouping's bounds, the batch's layout, and greedy outputs identical
to one call per chunk (the old path) with the tiny MLA model."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpager import PAD_PAGE
from kvpager.errors import ConfigError
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.prefill import group_chunks, padded_slots
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = TinyMLA(num_layers=2, num_heads=4, hidden=32, vocab_size=96, seed=1)
# 12 prompts of 1..90 tokens: a burst whose chunks differ widely in length
PROMPTS = [[(11 * i + 5 * j + 2) % 96 for j in range(1 + (37 * i) % 90)] for i in range(12)]


@given(st.lists(st.integers(1, 300), max_size=40), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]))
def test_groups_cover_every_chunk_once_and_bound_the_padding(lengths, max_padding):
    groups = group_chunks(lengths, max_padding)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert lengths[g[0]] == longest  # the first row sets s_q
        pad = len(g) * longest - sum(lengths[i] for i in g)
        assert pad <= max_padding * len(g) * longest + 1e-9
    if max_padding == 0.0:  # only equal lengths share a call
        assert all(len({lengths[i] for i in g}) == 1 for g in groups)
    assert padded_slots(lengths, groups) <= max_padding * sum(
        len(g) * max(lengths[i] for i in g) for g in groups) + 1e-6


def test_similar_chunks_share_one_call_and_per_request_mode_keeps_one_each():
    assert group_chunks([100, 96, 90, 99], 0.25) == [[0, 3, 1, 2]]
    assert group_chunks([2000] + [20] * 30, 0.25) == [[0], list(range(1, 31))]
    assert group_chunks([5, 3, 9], None) == [[0], [1], [2]]


def test_max_prefill_padding_is_checked():
    with pytest.raises(ConfigError, match="max_prefill_padding"):
        SchedulerConfig(max_prefill_padding=1.0)


class Spy:
    """The tiny model, recording each prefill call's layout."""

    def __init__(self, model):
        self.model = model
        self.num_layers, self.num_heads = model.num_layers, model.num_heads
        self.vocab_size, self.device = model.vocab_size, model.device
        self.calls = []

    def prefill(self, batch, pool):
        pad = [batch.s_q - n for n in batch.query_lens]
        slots = batch.slot_mapping.view(batch.batch_size, batch.s_q)
        for b, p in enumerate(pad):  # padding writes only to the null page, ids and positions 0
            assert (slots[b, :p] // pool.page_size == PAD_PAGE).all()
            assert (slots[b, p:] // pool.page_size != PAD_PAGE).all()
            assert (batch.input_ids[b, :p] == 0).all() and (batch.positions[b, :p] == 0).all()
            start = int(batch.cache_seqlens[b]) - batch.query_lens[b]
            assert batch.positions[b, p:].tolist() == list(range(start, int(batch.cache_seqlens[b])))
        self.calls.append(list(batch.query_lens))
        return self.model.prefill(batch, pool)

    def decode(self, batch, pool):
        return self.model.decode(batch, pool)


def run(batched: bool, budget: int, padding: float = 0.25) -> tuple[list[list[int]], Spy]:
    spy = Spy(MODEL)
    config = SchedulerConfig(max_batch_size=12, max_num_batched_tokens=budget, max_model_len=160,
                             batched_prefill=batched, max_prefill_padding=padding)
    engine = Engine(spy, MODEL.cache_config(num_pages=40), config)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    assert engine.allocator.num_used == 0
    return [list(o.token_ids) for o in outs], spy


@pytest.mark.parametrize("budget, padding", [(512, 0.25), (48, 0.25), (512, 0.9)])
def test_batched_prefill_greedy_outputs_equal_one_call_per_chunk(budget, padding):
    """Whole prompts at once (512), chunked prompts at offsets (48), heavy padding (0.9: rows
    whose padding columns see no key at all)."""
    want, per_request = run(False, budget)
    got, batched = run(True, budget, padding)
    assert got == want
    assert all(len(c) == 1 for c in per_request.calls)
    assert any(len(c) > 1 and len(set(c)) > 1 for c in batched.calls)  # padded calls happened
    assert len(batched.calls) < len(per_request.calls)
