"""The example server, for real: uvicorn in a subprocess on 127.0.0.1, driven by the official
openai client. Every loop below is bounded in count and time."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib.error
import urllib.request

import openai
import pytest

from kvpager.runtime import Engine, SamplingParams, SchedulerConfig
from kvpager.runtime.models.tiny import TinyMLA

SERVE = Path(__file__).resolve().parents[2] / "examples" / "serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVE), "--model", "tiny", "--port", str(port), "--max-batch", "8",
         "--max-model-len", "512", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=1).status == 200:
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not answer /health within 60 s")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def expected(prompt: list[int], n: int) -> list[int]:
    """The same request run alone in this process (TinyMLA() is the server's model)."""
    model = TinyMLA()
    engine = Engine(model, model.cache_config(num_pages=32), SchedulerConfig(max_batch_size=4))
    return list(engine.generate([prompt], SamplingParams(max_new_tokens=n))[0].token_ids)


def test_logprobs_streaming_and_not_match_the_engine(client):
    prompt, n = [3, 1, 4, 1, 5], 6
    model = TinyMLA()
    engine = Engine(model, model.cache_config(num_pages=32), SchedulerConfig(max_batch_size=4))
    want = engine.generate([prompt], SamplingParams(max_new_tokens=n, logprobs=2))[0]
    r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [f" {t}" for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for top, want_top, tok in zip(lp.top_logprobs, want.top_logprobs, want.token_ids):
        assert top == pytest.approx({f" {t}": v for t, v in want_top.items()}, abs=1e-4)
        assert f" {tok}" in top  # greedy: the sampled token is the most likely
    streamed, offsets = [], []
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0,
                                           logprobs=2, stream=True):
        part = chunk.choices[0].logprobs
        streamed += part.token_logprobs
        offsets += part.text_offset
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6) and offsets == lp.text_offset
    plain = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def gauge(server: str, name: str) -> float:
    text = get(f"{server}/metrics")
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_concurrent_streaming_and_plain_requests_match_runs_alone(client):
    prompts = [[(7 * i + j) % 128 for j in range(3 + 5 * i)] for i in range(8)]

    def plain(prompt):
        r = client.completions.create(model="kvpager-tiny", prompt=prompt, max_tokens=12,
                                      temperature=0)
        return r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason, r.usage

    def streamed(prompt):
        ids, reason = [], None
        for chunk in client.completions.create(model="kvpager-tiny", prompt=prompt, max_tokens=12,
                                               temperature=0, stream=True):
            ids += chunk.choices[0].model_extra["token_ids"]
            reason = chunk.choices[0].finish_reason or reason
        return ids, reason, None

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(plain if i % 2 else streamed, p) for i, p in enumerate(prompts)]
        results = [f.result(timeout=120) for f in futures]
    for prompt, (ids, reason, usage) in zip(prompts, results):
        assert ids == expected(prompt, 12)
        assert reason == "length"
        if usage is not None:
            assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 12


def test_text_of_a_token_id_model_is_its_ids(client):
    r = client.completions.create(model="m", prompt=[1, 2, 3], max_tokens=4, temperature=0)
    assert r.choices[0].text.split() == [str(i) for i in r.choices[0].model_extra["token_ids"]]


def test_cancelled_stream_gives_its_pages_back(server, client):
    stream = client.completions.create(model="m", prompt=list(range(1, 100)), max_tokens=400,
                                       temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += len(chunk.choices[0].model_extra["token_ids"])
        if got >= 2:
            break
    assert gauge(server, "kvpager_kv_pages_used") > 0 or gauge(server, "kvpager_requests_running") >= 0
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if gauge(server, "kvpager_requests_running") == 0 and gauge(server, "kvpager_kv_pages_used") == 0:
            break
        time.sleep(0.1)
    assert gauge(server, "kvpager_requests_running") == 0
    assert gauge(server, "kvpager_kv_pages_used") == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt=[1, 500], max_tokens=4), "[0, 128)"),
    (dict(prompt=[1, 2], max_tokens=0), "max_tokens"),
    (dict(prompt=[1, 2], max_tokens=4, n=2), "n"),
    (dict(prompt="hello", max_tokens=4), "tokenizer"),
    (dict(prompt=[], max_tokens=4), "empty"),
    (dict(prompt=[1, 2], max_tokens=4, logprobs=6), "logprobs"),
])
def test_bad_requests_get_400_with_a_clear_message(client, kwargs, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", temperature=0, **kwargs)
    assert err.value.status_code == 400
    assert needle in str(err.value.body["message"])


def test_metrics_count_finished_requests_and_latencies(server, client):
    client.completions.create(model="m", prompt=[5, 6], max_tokens=3, temperature=0)
    text = get(f"{server}/metrics")
    assert re.search(r'^kvpager_requests_total\{finish_reason="length"\} [1-9]', text, re.M)
    assert re.search(r"^kvpager_ttft_seconds_count [1-9]", text, re.M)
    assert "kvpager_kv_pages_total" in text
