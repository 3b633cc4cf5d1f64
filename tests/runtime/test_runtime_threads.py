"""The engine from several threads, re-entrant steps, atomic generate() and a 10x overload
(issue 12, failures 6, 11 and 12)."""
import random
import threading
import time
from collections import Counter

import pytest
import torch

from kvpager import errors
from kvpager.errors import KVPagerError, RequestError, RequestTooLarge
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.request import SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = TinyMLA(num_layers=1, num_heads=2, hidden=32, vocab_size=64, seed=3)


def make_engine(num_pages: int = 48, max_batch: int = 32, budget: int = 512) -> Engine:
    config = SchedulerConfig(max_batch_size=max_batch, max_num_batched_tokens=budget,
                             max_model_len=256)
    return Engine(MODEL, MODEL.cache_config(num_pages=num_pages), config)


def alone(jobs) -> dict:
    """Each distinct (prompt, max_new_tokens) run alone on a fresh engine."""
    out = {}
    for prompt, n in jobs:
        key = (tuple(prompt), n)
        if key not in out:
            out[key] = list(make_engine().generate([prompt], SamplingParams(max_new_tokens=n))[0].token_ids)
    return out


def check_clean(eng: Engine) -> None:
    eng.allocator.check_invariants(Counter(p for r in eng.scheduler.running for p in r.seq.pages))
    rows = eng.decode_tables.handles
    eng.decode_tables.check([r.seq for r in rows], rows)


# --- failure 6: re-entrant step ------------------------------------------------------------------
def test_a_callback_that_steps_gets_reentrant_step_and_limits_hold():
    eng = make_engine()
    caught = []

    def on_token(rid, tok):
        try:
            eng.step()
        except KVPagerError as exc:
            caught.append(exc)

    h = eng.submit([1, 2, 3], SamplingParams(max_new_tokens=3), on_token=on_token)
    other = eng.submit([4, 5], SamplingParams(max_new_tokens=5))
    while eng.has_unfinished():
        eng.step()
    assert h.output_token_ids == alone([([1, 2, 3], 3)])[((1, 2, 3), 3)]  # 3 tokens, not 61
    assert h.finish_reason == "length" and len(other.output_token_ids) == 5
    assert len(caught) == 3 and all(type(e) is errors.ReentrantStep for e in caught)
    assert eng.allocator.num_used == 0


def test_a_callback_that_iterates_a_handle_ends_its_request_with_error():
    eng = make_engine()
    other = eng.submit([4, 5], SamplingParams(max_new_tokens=5))
    h = eng.submit([1, 2, 3], SamplingParams(max_new_tokens=3),
                   on_token=lambda rid, tok: list(other))  # would step from inside the step
    while eng.has_unfinished():
        eng.step()
    assert h.finish_reason == "error" and len(h.output_token_ids) == 1
    assert other.finish_reason == "length" and eng.allocator.num_used == 0


# --- failure 12: atomic generate, ids -------------------------------------------------------------
def test_generate_checks_every_prompt_before_queueing_any():
    eng = make_engine(num_pages=4)
    good = [1, 2, 3]
    for prompts, params in (([good, []], None), ([good, [1] * 300], None), ([good, [99]], None),
                            ([good, good], [SamplingParams()]), ([good, "text"], None),
                            ([good, good], [SamplingParams(), {"max_new_tokens": 2}])):
        with pytest.raises(RequestError):
            eng.generate(prompts, params)
        assert not eng.has_unfinished() and not eng.requests
        assert eng.allocator.num_used == 0 and eng.load()["waiting"] == 0
    with pytest.raises(RequestTooLarge):
        eng.generate([good, [1] * 200], SamplingParams(max_new_tokens=100))
    assert not eng.requests
    assert [list(o.token_ids) for o in eng.generate([good], SamplingParams(max_new_tokens=4))] == \
        [alone([(good, 4)])[(tuple(good), 4)]]


def test_auto_ids_never_collide_with_user_ids():
    eng = make_engine()
    eng.submit([1], request_id="1")
    eng.submit([1], request_id="0")
    ids = {eng.submit([2]).request_id for _ in range(3)}  # used to raise DuplicateRequest
    assert len(ids) == 3 and not ids & {"0", "1"}
    assert len(eng.requests) == 5


# --- failure 11: threads --------------------------------------------------------------------------
class Gated:
    """TinyMLA whose decode call waits for `release` once `armed`: a step held open."""

    def __init__(self):
        self.inner = MODEL
        self.num_layers, self.num_heads = MODEL.num_layers, MODEL.num_heads
        self.vocab_size, self.device = MODEL.vocab_size, MODEL.device
        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def prefill(self, batch, pool):
        return self.inner.prefill(batch, pool)

    def decode(self, batch, pool):
        if self.armed:
            self.entered.set()
            assert self.release.wait(10)
        return self.inner.decode(batch, pool)


def test_submit_and_abort_during_another_threads_step_apply_at_its_end():
    model = Gated()
    eng = Engine(model, MODEL.cache_config(48), SchedulerConfig(max_batch_size=8, max_model_len=256))
    victim = eng.submit([1, 2, 3], SamplingParams(max_new_tokens=20))
    keep = eng.submit([4, 5, 6], SamplingParams(max_new_tokens=20))
    eng.step()
    model.armed = True
    stepper = threading.Thread(target=eng.step)
    stepper.start()
    assert model.entered.wait(10)
    t0 = time.perf_counter()
    eng.abort(victim.request_id)  # returns at once: applied at the step's end
    late = eng.submit([7, 8], SamplingParams(max_new_tokens=3))
    assert time.perf_counter() - t0 < 1.0 and victim.status is Status.RUNNING
    model.release.set()
    stepper.join(10)
    assert victim.finish_reason == "abort" and victim.status is Status.ABORTED
    assert eng.load()["waiting"] == 1 and late.status is Status.WAITING
    check_clean(eng)
    model.armed = False
    while eng.has_unfinished():
        eng.step()
    want = alone([([4, 5, 6], 20), ([7, 8], 3)])
    assert keep.output_token_ids == want[((4, 5, 6), 20)]
    assert late.output_token_ids == want[((7, 8), 3)]
    assert eng.allocator.num_used == 0


def test_four_client_threads_submit_and_abort_2000_requests_while_one_thread_steps():
    rng = random.Random(0)
    unique = [([rng.randrange(64) for _ in range(rng.randint(1, 40))], rng.randint(1, 6))
              for _ in range(40)]
    want = alone(unique)
    eng = make_engine(num_pages=48, max_batch=32)
    stepping_threads, errors_seen, handles = set(), [], [[] for _ in range(4)]
    real_step = eng.step

    def counted_step():
        stepping_threads.add(threading.get_ident())
        return real_step()

    eng.step = counted_step
    stop, ready = threading.Event(), threading.Event()

    def serve():
        try:
            eng.step()  # the serving thread steps first: readers wait for it from then on
            ready.set()
            while not stop.is_set() or eng.has_unfinished():
                if eng.has_unfinished():
                    eng.step()
                else:
                    time.sleep(0.0002)
        except BaseException as exc:  # noqa: BLE001 - any escape fails the test
            errors_seen.append(exc)

    def client(i):
        crng = random.Random(i)
        try:
            for k in range(500):
                prompt, n = unique[crng.randrange(len(unique))]
                h = eng.submit(prompt, SamplingParams(max_new_tokens=n))
                handles[i].append((h, prompt, n))
                if crng.random() < 0.15:  # abort anyone's request, maybe finished already
                    victim = crng.choice(handles[crng.randrange(4)] or handles[i])[0]
                    victim.abort()
                if i == 0 and k % 25 == 0:
                    assert list(h) == h.output_token_ids  # streams while the server steps
        except BaseException as exc:  # noqa: BLE001
            errors_seen.append(exc)

    server = threading.Thread(target=serve)
    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    server.start()
    assert ready.wait(10)
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    stop.set()
    server.join(60)
    assert not errors_seen, errors_seen
    assert stepping_threads == {server.ident}  # iterating waited for the server, never stepped
    finished = 0
    for h, prompt, n in (x for per in handles for x in per):
        assert h.finished
        if h.finish_reason == "length":
            assert h.output_token_ids == want[(tuple(prompt), n)]
            finished += 1
        else:
            assert h.finish_reason == "abort"
            assert h.output_token_ids == want[(tuple(prompt), n)][:h.num_output_tokens]
    assert 1500 < finished < 2000
    assert eng.allocator.num_used == 0 and eng.allocator.num_free == eng.allocator.num_pages
    check_clean(eng)


# --- overload ------------------------------------------------------------------------------------
def test_ten_times_more_requests_than_the_pool_holds():
    rng = random.Random(1)
    unique = [([rng.randrange(64) for _ in range(rng.randint(1, 100))], rng.randint(1, 30))
              for _ in range(30)]
    want = alone(unique)
    config = SchedulerConfig(max_batch_size=16, max_num_batched_tokens=256, max_model_len=256,
                             admit_headroom_pages=0)
    eng = Engine(MODEL, MODEL.cache_config(num_pages=12), config)  # ~12 one-page requests fit
    jobs = [unique[i % 30] for i in range(120)]
    handles = [(eng.submit(p, SamplingParams(max_new_tokens=n)), p, n) for p, n in jobs]
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps % 7 == 0:
            live = [h for h, _, _ in handles if not h.finished]
            rng.choice(live).abort()
        check_clean(eng)
    done = [(h, p, n) for h, p, n in handles if h.finish_reason == "length"]
    assert len(done) > 80
    for h, p, n in done:
        assert h.output_token_ids == want[(tuple(p), n)]
    assert eng.scheduler.num_preemptions > 0
    assert eng.allocator.num_used == 0
    eng.allocator.check_invariants({})
    assert torch.get_num_threads() == 1
