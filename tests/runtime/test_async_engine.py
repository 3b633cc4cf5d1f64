"""AsyncEngine: many concurrent consumers, cancellation, backpressure, shutdown."""
from __future__ import annotations

import asyncio
import random

import pytest

from kvpager.errors import EngineClosed, QueueFull, RequestError
from kvpager.runtime import Engine, SamplingParams, SchedulerConfig
from kvpager.runtime.async_engine import AsyncEngine
from kvpager.runtime.models.tiny import TinyMLA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = TinyMLA(num_layers=1, num_heads=2, hidden=32, vocab_size=64, seed=3)


def make_engine(num_pages: int = 96, max_batch: int = 32) -> Engine:
    config = SchedulerConfig(max_batch_size=max_batch, max_num_batched_tokens=512, max_model_len=256)
    return Engine(MODEL, MODEL.cache_config(num_pages=num_pages), config)


def alone(prompt: list[int], max_new_tokens: int) -> list[int]:
    return list(make_engine().generate([prompt], SamplingParams(max_new_tokens=max_new_tokens))[0].token_ids)


def test_500_consumers_with_cancellations_match_alone_and_free_every_page():
    rng = random.Random(0)
    unique = [[rng.randrange(64) for _ in range(rng.randint(1, 90))] for _ in range(25)]
    jobs = [(unique[i % 25], rng.randint(1, 12), i % 10 == 3) for i in range(500)]
    want = {(tuple(p), n): alone(p, n) for p, n, _ in jobs}
    engine = make_engine()  # 96 pages for up to 32 running: preemption happens too

    async def consume(aengine: AsyncEngine, prompt: list[int], n: int, cancel: bool):
        stream = await aengine.submit(prompt, SamplingParams(max_new_tokens=n))
        got = []
        async for chunk in stream:
            got.extend(chunk.new_token_ids)
            if cancel and got:
                raise asyncio.CancelledError  # the consumer goes away midway
        return stream.output

    async def main():
        async with AsyncEngine(engine, max_waiting=1000) as aengine:
            tasks = [asyncio.create_task(consume(aengine, p, n, c)) for p, n, c in jobs]
            results = await asyncio.gather(*tasks, return_exceptions=True)
        return results

    results = asyncio.run(main())
    completed = 0
    for (prompt, n, cancel), result in zip(jobs, results):
        if cancel:
            assert isinstance(result, asyncio.CancelledError) or result.finish_reason == "length"
            continue
        assert result.finish_reason == "length"
        assert list(result.token_ids) == want[(tuple(prompt), n)]
        assert result.timings.ttft is not None and result.timings.queue is not None
        completed += 1
    assert completed == 450
    assert engine.allocator.num_used == 0
    assert not engine.has_unfinished()


def test_cancelled_consumer_aborts_its_request_before_the_next_step():
    engine = make_engine()

    async def main():
        async with AsyncEngine(engine) as aengine:
            stream = await aengine.submit([1, 2, 3], SamplingParams(max_new_tokens=200))
            async for chunk in stream:
                if chunk.new_token_ids:
                    break  # leave the stream early
            del chunk
            for _ in range(200):
                if aengine.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            return aengine.stats()

    stats = asyncio.run(main())
    assert stats["running"] == 0 and stats["pages_used"] == 0


def test_queue_full_is_typed_and_leaves_nothing_behind():
    engine = make_engine(max_batch=1)

    async def main():
        aengine = AsyncEngine(engine, max_waiting=2)
        streams = []
        with pytest.raises(QueueFull, match="max_waiting=2"):
            for _ in range(5):  # one runs (max_batch 1), two wait, then the queue is full
                streams.append(await aengine.submit([5] * 4, SamplingParams(max_new_tokens=50)))
        await aengine.shutdown(abort=True)
        return streams

    streams = asyncio.run(main())
    assert len(streams) in (2, 3)  # 2 if the first was not admitted yet when the third came
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_bad_request_raises_at_submit_and_shutdown_refuses_new_work():
    engine = make_engine()

    async def main():
        aengine = AsyncEngine(engine)
        with pytest.raises(RequestError):
            await aengine.submit([], SamplingParams())
        ok = await aengine.generate([1, 2], SamplingParams(max_new_tokens=3))
        await aengine.shutdown()
        with pytest.raises(EngineClosed):
            await aengine.submit([1], SamplingParams())
        return ok

    out = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_graceful_shutdown_finishes_in_flight_requests():
    engine = make_engine()

    async def main():
        aengine = AsyncEngine(engine)
        streams = [await aengine.submit([i + 1] * 5, SamplingParams(max_new_tokens=6)) for i in range(4)]
        await aengine.shutdown()  # drains: every request runs to its end
        return [s._handle.output() for s in streams]

    outputs = asyncio.run(main())
    assert [o.finish_reason for o in outputs] == ["length"] * 4
    assert engine.allocator.num_used == 0
