"""generate() returns RequestOutputs; SamplingParams.logprobs fills their logprobs / top_logprobs
with the raw logits' log-softmax, aligned with the tokens kept (stop tokens, MTP drafts)."""
import math

import pytest
import torch

from kvpager.errors import RequestError
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.outputs import RequestOutput
from kvpager.runtime.request import MAX_LOGPROBS, SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = TinyMLA(num_layers=1, num_heads=2, hidden=32, vocab_size=64, seed=2)
PROMPTS = [[(3 * i + j) % 64 for j in range(5 + 9 * i)] for i in range(3)]


class Recorder:
    """The tiny model, keeping every logits row it returns per request (prefill's last row,
    then each decode row's first position)."""

    def __init__(self, model):
        self.model = model
        self.num_layers, self.num_heads = model.num_layers, model.num_heads
        self.vocab_size, self.device = model.vocab_size, model.device
        self.rows: dict[str, list[torch.Tensor]] = {}

    def prefill(self, batch, pool):
        out = self.model.prefill(batch, pool)
        for b, row in zip(batch.logits_rows.tolist(), out):
            self.rows.setdefault(batch.request_ids[b], []).append(row)
        return out

    def decode(self, batch, pool):
        out = self.model.decode(batch, pool)
        for b, rid in enumerate(batch.request_ids):
            self.rows.setdefault(rid, []).append(out[b, 0])
        return out


def engine(model=MODEL, **kw) -> Engine:
    config = SchedulerConfig(**{"max_batch_size": 4, "max_num_batched_tokens": 64,
                                "max_model_len": 128, **kw})
    return Engine(model, MODEL.cache_config(num_pages=16), config)


def test_generate_returns_request_outputs():
    outs = engine().generate(PROMPTS, SamplingParams(max_new_tokens=5))
    assert all(isinstance(o, RequestOutput) for o in outs)
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    assert all(o.finish_reason == "length" and o.logprobs is None and o.top_logprobs is None
               for o in outs)
    assert [list(o.prompt_token_ids) for o in outs] == PROMPTS
    t = outs[0].timings
    assert 0 <= t.queue <= t.ttft <= t.e2e and t.tpot >= 0


def test_logprobs_are_the_raw_logits_log_softmax():
    rec = Recorder(MODEL)
    eng = engine(rec)
    params = [SamplingParams(max_new_tokens=6, logprobs=3),
              SamplingParams(max_new_tokens=6, logprobs=0, temperature=2.0, seed=1),
              SamplingParams(max_new_tokens=6)]
    handles = [eng.submit(p, sp, request_id=str(i)) for i, (p, sp) in
               enumerate(zip(PROMPTS, params))]
    while eng.has_unfinished():
        eng.step()
    greedy, sampled, plain = (h.output() for h in handles)
    for out in (greedy, sampled):
        want = [torch.log_softmax(row.float(), -1) for row in rec.rows[out.request_id]]
        assert len(out.logprobs) == len(out.token_ids) == 6
        for lp, tok, w in zip(out.logprobs, out.token_ids, want):
            assert math.isclose(lp, float(w[tok]), abs_tol=1e-5)  # temperature is not applied
    assert sampled.top_logprobs is None
    for tok, lp, top in zip(greedy.token_ids, greedy.logprobs, greedy.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == tok and math.isclose(top[tok], lp)
        assert all(v <= lp + 1e-6 for v in top.values())
    assert plain.logprobs is None


def test_logprobs_stay_aligned_with_stop_tokens_and_mtp():
    ref = engine().generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, logprobs=1))[0]
    stop = ref.token_ids[4]
    first = ref.token_ids.index(stop)
    cut = engine().generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, logprobs=1,
                                                         stop_token_ids=(stop,)))[0]
    assert cut.token_ids == ref.token_ids[:first + 1] and cut.finish_reason == "stop"
    assert cut.logprobs == pytest.approx(ref.logprobs[:first + 1], abs=1e-5)
    mtp = engine(num_speculative_tokens=2).generate([PROMPTS[1]],
                                                     SamplingParams(max_new_tokens=12, logprobs=1))[0]
    assert mtp.token_ids == ref.token_ids
    assert mtp.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert [list(t) for t in mtp.top_logprobs] == [list(t) for t in ref.top_logprobs]


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, 1.5, "2", True])
def test_bad_logprobs_are_refused(bad):
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=bad)


def test_assigning_engine_model_routes_the_next_calls_through_it():
    """Engine.model is assignable (the CUDA-graph example swaps in a wrapper of the same Protocol
    after build): every later prefill and decode call goes through the new object."""
    eng = engine()
    recorder = Recorder(MODEL)
    eng.model = recorder
    assert eng.model is recorder
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    assert sorted(recorder.rows) == sorted(o.request_id for o in outs)
    assert all(len(rows) == 3 for rows in recorder.rows.values())  # prefill's row + 2 decode rows
