"""Engine behaviour with the tiny MLA model on CPU: greedy outputs do not depend on batching,
preemption or MTP; streaming, callbacks, abort and sampling seeds work."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpager.runtime.drafts import accept_drafts, propose_drafts
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.protocol import Model
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.request import SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


MODEL = TinyMLA(num_layers=2, num_heads=4, hidden=32, vocab_size=96, seed=0)
# Prompts of 40..61 tokens with 24 new tokens cross the first page boundary while decoding.
PROMPTS = [[(5 * i + 3 * j + 1) % 96 for j in range(40 + 7 * i)] for i in range(4)]
GREEDY = SamplingParams(max_new_tokens=24)


def engine(num_pages=32, **kw) -> Engine:
    config = SchedulerConfig(**{"max_batch_size": 8, "max_num_batched_tokens": 128,
                                "max_model_len": 256, **kw})
    return Engine(MODEL, MODEL.cache_config(num_pages), config)


def run(eng: Engine, prompts, params=GREEDY) -> list[list[int]]:
    """generate()'s token ids, as lists."""
    return [list(out.token_ids) for out in eng.generate(prompts, params)]


@pytest.fixture(scope="module")
def alone():
    return [run(engine(), [p], GREEDY)[0] for p in PROMPTS]


def test_tiny_model_satisfies_protocol():
    assert isinstance(MODEL, Model)


def test_full_batch_matches_alone(alone):
    assert run(engine(), PROMPTS, GREEDY) == alone


def test_chunked_prefill_matches_alone(alone):
    # budget 16 tokens: prompts are prefilled over several steps, interleaved with decodes
    assert run(engine(max_num_batched_tokens=16, max_batch_size=4), PROMPTS, GREEDY) == alone


def test_preemption_matches_alone(alone):
    # 4 pages: every request holds one page until it crosses 64 tokens, then someone must go
    eng = engine(num_pages=4, admit_headroom_pages=0)
    assert run(eng, PROMPTS, GREEDY) == alone
    assert eng.scheduler.num_preemptions > 0
    assert eng.allocator.num_used == 0
    eng.allocator.check_invariants({})


def test_mtp_matches_alone(alone):
    eng = engine(num_speculative_tokens=2, max_num_batched_tokens=128)
    assert run(eng, PROMPTS, GREEDY) == alone
    eng.allocator.check_invariants({})


def test_streaming_iterator_and_callback():
    eng = engine()
    seen = []
    h1 = eng.submit(PROMPTS[0], GREEDY, on_token=lambda rid, tok: seen.append((rid, tok)))
    h2 = eng.submit(PROMPTS[1], GREEDY)
    streamed = list(h2)  # steps the engine, which also advances h1
    assert streamed == h2.output_token_ids and len(streamed) == 24
    while eng.has_unfinished():
        eng.step()
    assert [t for rid, t in seen] == h1.output_token_ids
    assert {rid for rid, _ in seen} == {h1.request_id}
    t = h1.timings
    assert t.arrival <= t.admitted <= t.first_token <= t.finished and len(t.token_times) == 24


def test_stop_token_and_abort():
    eng = engine()
    ref = run(engine(), [PROMPTS[0]], GREEDY)[0]
    stop = eng.submit(PROMPTS[0], SamplingParams(max_new_tokens=24, stop_token_ids=(ref[3],)))
    victim = eng.submit(PROMPTS[1], GREEDY)
    for _ in range(3):
        eng.step()
    victim.abort()
    assert victim.status is Status.ABORTED and victim.finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert stop.output_token_ids == ref[:ref.index(ref[3]) + 1] and stop.finish_reason == "stop"
    assert eng.allocator.num_used == 0
    s = eng.metrics.summary()
    assert s["requests_finished"] == 1 and s["requests_aborted"] == 1


@pytest.mark.parametrize("mtp", [0, 2])
def test_callback_aborting_its_request_on_the_last_token_retires_it_once(mtp):
    eng = engine(num_speculative_tokens=mtp)
    params = SamplingParams(max_new_tokens=5)

    def on_token(rid, tok):
        if len(eng.requests[rid].output_token_ids) == params.max_new_tokens:
            eng.abort(rid)

    handle = eng.submit(PROMPTS[0], params, on_token=on_token)
    other = eng.submit(PROMPTS[1], params)
    while eng.has_unfinished():
        eng.step()
    assert handle.status is Status.ABORTED and other.status is Status.FINISHED
    assert (eng.metrics.aborted, eng.metrics.finished) == (1, 1)
    assert len(eng.scheduler.running) == 0 and eng.allocator.num_used == 0
    assert eng.decode_tables.batch_size == 0


def test_callback_aborting_a_later_row_stops_it_in_the_same_step():
    # The decode loop records plain rows inline; one aborted earlier in the loop gets nothing more.
    eng = engine()
    at_abort = []

    def on_token(rid, tok):
        if len(eng.requests[rid].output_token_ids) == 3:
            at_abort.append(len(later.output_token_ids))
            later.abort()

    first = eng.submit(PROMPTS[0], GREEDY, on_token=on_token)  # older: earlier in the batch
    later = eng.submit(PROMPTS[1], GREEDY)
    while eng.has_unfinished():
        eng.step()
    assert later.status is Status.ABORTED and first.status is Status.FINISHED
    assert at_abort == [len(later.output_token_ids)] == [len(later.timings.token_times)]
    assert eng.allocator.num_used == 0


def test_seeded_sampling_is_reproducible_across_batches():
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    short = SamplingParams(max_new_tokens=4)
    alone = run(engine(), [PROMPTS[2]], params)[0]
    batched = run(engine(), PROMPTS[:3], [short, short, params])[2]
    assert alone == batched


def _propose_drafts_naive(token_ids, k, max_ngram=3):
    """The definition, token by token: the oracle for the backward list.index search."""
    if k == 0:
        return []
    for n in range(min(max_ngram, len(token_ids) - 1), 0, -1):
        tail = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == tail:
                follow = token_ids[start + n:start + n + k]
                return follow + [token_ids[-1]] * (k - len(follow))
    return [token_ids[-1]] * k


@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.integers(0, 3),
       st.integers(1, 4))
def test_propose_drafts_matches_its_definition(token_ids, k, max_ngram):
    assert propose_drafts(token_ids, k, max_ngram) == _propose_drafts_naive(token_ids, k, max_ngram)


def test_draft_helpers():
    assert propose_drafts([28, 29, 0, 2, 1, 2, 1, 21, 0, 29], 2) == [0, 2]  # only n=1 matches
    assert propose_drafts([1, 2, 3, 9, 1, 2], 2) == [3, 9]
    assert propose_drafts([4, 5], 3) == [5, 5, 5]
    assert accept_drafts([7, 8], [7, 8, 9]) == [7, 8, 9]
    assert accept_drafts([7, 1], [7, 8, 9]) == [7, 8]
    assert accept_drafts([0, 8], [7, 8, 9]) == [7]


def test_a_cpu_engine_warns_once_when_torch_uses_several_threads(caplog, monkeypatch):
    import torch

    from kvpager.runtime import checks

    monkeypatch.setattr(checks, "_threads_warned", False)
    torch.set_num_threads(2)
    try:
        with caplog.at_level("WARNING", logger="kvpager"):
            engine()
            engine()
    finally:
        torch.set_num_threads(1)
    warnings = [r for r in caplog.records if "torch.set_num_threads(1)" in r.getMessage()]
    assert len(warnings) == 1 and "2 threads" in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(checks, "_threads_warned", False)
    engine()  # one thread: nothing to say
    assert not caplog.records
