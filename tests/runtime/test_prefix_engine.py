"""Prefix caching in the engine with the tiny MLA model: off is exactly main's behaviour, on
gives the same greedy outputs token for token while skipping the cached prefill (full pages,
mid-page matches, prompts cached whole, after preemption), and the metrics count it."""
import json
from pathlib import Path

import pytest

from kvpager.errors import ConfigError
from kvpager.prefix_hit import kv_usage_tokens
from kvpager.runtime.engine import Engine
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

from caching_off_trace import MODEL, trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_new_tokens=12)
SYSTEM = [(11 * j + 5) % 96 for j in range(150)]  # 2 full pages + 22 tokens


def engine(caching: bool, num_pages: int = 32, **kw) -> Engine:
    config = SchedulerConfig(**{"max_batch_size": 8, "max_num_batched_tokens": 128,
                                "max_model_len": 256, "enable_prefix_caching": caching, **kw})
    return Engine(MODEL, MODEL.cache_config(num_pages), config, full_metrics=True)


def test_caching_off_is_mains_behaviour_step_by_step():
    # data/caching_off_trace.json was written by caching_off_trace.py run against main's code
    golden = json.loads((Path(__file__).parent / "data" / "caching_off_trace.json").read_text())
    assert trace() == golden


def test_caching_on_gives_the_same_outputs_on_the_same_trace():
    golden = json.loads((Path(__file__).parent / "data" / "caching_off_trace.json").read_text())
    assert trace(enable_prefix_caching=True)["outputs"] == golden["outputs"]


# Waves of requests run one after another, so later waves find earlier ones' pages cached
# (only full pages of written KV are cached):
#  - the system prompt + other questions: its 2 full pages by reference, the third page
#    matched mid-page (22 of 64 tokens) and copied;
#  - a prompt submitted again (its 3 full pages);
#  - prompts cached whole (all but their last token hit), ending mid-page or on a boundary;
#  - a prompt that extends a finished request's prompt + output (a chat's next turn).
def waves():
    first = [SYSTEM + [1] * 50, SYSTEM[:64] + [7] * 70]
    second = [SYSTEM + [4, 5], first[0], SYSTEM[:100], SYSTEM[:128], [3] * 20]
    return first, second


def run_waves(eng: Engine) -> list[list[int]]:
    first, second = waves()
    out = [list(o.token_ids) for o in eng.generate(first, GREEDY)]
    chat = first[0] + out[0] + [9, 9]
    return out + [list(o.token_ids) for o in eng.generate(second + [chat], GREEDY)]


def test_outputs_with_caching_equal_outputs_without():
    off, on = engine(False), engine(True)
    want = run_waves(off)
    assert run_waves(on) == want
    s = on.metrics.summary()
    # second wave: 128 + 22, 192, 99 and 127 (whole but 1), 0; the chat turn hits the first
    # request's pages (192 of its 211 written tokens)
    assert s["prefix_hit_tokens"] >= 150 + 192 + 99 + 127 + 192
    assert 0 < s["prefix_hit_rate"] < 1
    assert off.metrics.summary()["prefix_hit_tokens"] == 0
    # the cached prefill was skipped: fewer prefill tokens ran
    prefilled = [sum(e.metrics.steps["prefill_tokens"]) for e in (off, on)]
    assert prefilled[1] <= prefilled[0] - s["prefix_hit_tokens"]
    on.allocator.check_invariants({})
    on.scheduler.prefix.cache.check_invariants()


def test_a_mid_page_hit_copies_the_page_before_the_prefill_writes():
    eng = engine(True)
    eng.generate([SYSTEM + [1] * 50], GREEDY)
    h = eng.submit(SYSTEM + [4, 5], GREEDY)
    plan = eng.scheduler.schedule()  # admission only, to look at the plan
    (req, start, n), = plan.prefill
    assert (start, n) == (150, 2) and len(plan.copies) == 1
    src, dst = plan.copies[0]
    assert req.seq.pages[2] == dst and eng.allocator.is_cached(src) and src != dst
    eng.runner.apply_copies(plan)
    assert eng.pool.kv[:, dst, :22].equal(eng.pool.kv[:, src, :22])
    # the rest of the step as Engine.step would run it
    assert eng.runner.prefill(plan.prefill, failed := []) and not failed
    eng.book.prefilled(req, n, 0.0)
    assert h.status.value == "running"


def test_preemption_with_caching_keeps_outputs_and_releases_everything():
    prompts = [SYSTEM[:60] + [i] for i in range(4)] + [SYSTEM + [i] for i in range(2)]
    want = [o.token_ids for o in engine(False).generate(prompts, SamplingParams(max_new_tokens=24))]
    eng = engine(True, num_pages=6, admit_headroom_pages=0, max_batch_size=6)
    assert [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=24))] == want
    assert eng.scheduler.num_preemptions > 0
    assert eng.allocator.num_used == 0 and eng.allocator.num_free == 6
    eng.allocator.check_invariants({})
    eng.scheduler.prefix.cache.check_invariants()
    assert eng.metrics.summary()["prefix_hit_tokens"] > 0


def test_abort_releases_hit_pages():
    eng = engine(True)
    eng.generate([SYSTEM + [1]], GREEDY)
    h = eng.submit(SYSTEM + [2], GREEDY)
    eng.step()
    assert eng.allocator.num_used > 0
    h.abort()
    assert eng.allocator.num_used == 0
    eng.allocator.check_invariants({})
    eng.scheduler.prefix.cache.check_invariants()


def test_kv_usage_tokens_counts_tokens_not_pages():
    for caching in (False, True):
        eng = engine(caching)
        sched, seen = eng.scheduler, []
        schedule = sched.schedule

        def checked_schedule():
            plan = schedule()
            seqs = [r.seq for r in sched.running]
            assert plan.kv_usage_tokens == kv_usage_tokens(eng.allocator, seqs, 64)
            logical = sum(s.num_tokens for s in seqs)
            # off: no page is shared; on: shared pages count once
            assert plan.kv_usage_tokens == logical if not caching else plan.kv_usage_tokens <= logical
            seen.append(plan.kv_usage_tokens < logical)
            return plan

        sched.schedule = checked_schedule
        run_waves(eng)
        assert any(seen) == caching  # the second wave shares the system prompt's pages


def test_caching_needs_a_pool_that_holds_one_request():
    with pytest.raises(ConfigError, match="max_model_len"):
        engine(True, num_pages=3)  # max_model_len 256 needs 5 pages (+ s_q - 1 tokens)
    engine(False, num_pages=3)  # off: requests that do not fit are refused one by one
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        SchedulerConfig(enable_prefix_caching=1)
