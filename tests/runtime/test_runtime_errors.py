"""Bad input raises KVPagerError subclasses at the boundary; the engine keeps serving the rest."""
import pytest

from kvpager.errors import (ConfigError, DuplicateRequest, KVPagerError, RequestError,
                            RequestTooLarge, UnknownRequest)
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


MODEL = TinyMLA(num_layers=1, num_heads=4, hidden=16, vocab_size=64, seed=1)


def test_bad_requests_are_rejected_and_others_still_run():
    eng = Engine(MODEL, MODEL.cache_config(4), SchedulerConfig(max_batch_size=4, max_model_len=1024))
    good = eng.submit([1, 2, 3], SamplingParams(max_new_tokens=5), request_id="good")
    with pytest.raises(RequestError, match="empty prompt"):
        eng.submit([], SamplingParams(max_new_tokens=5))
    for bad in (0, -3):
        with pytest.raises(RequestError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(RequestTooLarge, match="pages but the pool has 4"):
        eng.submit([1] * 200, SamplingParams(max_new_tokens=100))  # 300 tokens > 4 x 64
    with pytest.raises(RequestTooLarge, match="max_model_len"):
        eng.submit([1] * 10, SamplingParams(max_new_tokens=2000))
    with pytest.raises(DuplicateRequest, match="'good'"):
        eng.submit([4, 5], request_id="good")
    with pytest.raises(UnknownRequest, match="'nope'"):
        eng.abort("nope")
    with pytest.raises(RequestError, match=r"\[0, 64\)"):
        eng.submit([64])
    with pytest.raises(RequestError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(RequestError):
        SamplingParams(top_p=0.0)
    other = eng.submit([7, 8, 9], SamplingParams(max_new_tokens=4))
    while eng.has_unfinished():
        eng.step()
    assert len(good.output_token_ids) == 5 and len(other.output_token_ids) == 4
    assert eng.allocator.num_used == 0
    eng.abort("good")  # aborting a finished request is a no-op, not an error


def test_every_error_is_a_kvpager_error():
    for exc in (RequestError, RequestTooLarge, DuplicateRequest, UnknownRequest, ConfigError):
        assert issubclass(exc, KVPagerError)


def test_bad_configs():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_batch_size=64, max_num_batched_tokens=32)
    with pytest.raises(ConfigError):
        SchedulerConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="layers"):
        Engine(MODEL, TinyMLA(num_layers=2).cache_config(4))


def test_a_raising_callback_ends_only_its_request_with_error():
    eng = Engine(MODEL, MODEL.cache_config(8))

    def boom(rid, tok):
        raise RuntimeError("consumer broke")

    bad = eng.submit([1, 2], SamplingParams(max_new_tokens=6), on_token=boom)
    ok = eng.submit([3, 4], SamplingParams(max_new_tokens=6))
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and len(ok.output_token_ids) == 6
    assert eng.metrics.summary()["requests_failed"] == 1
    assert eng.allocator.num_used == 0
