"""Simulator: deterministic under a seed, traces load, outputs are written, the CLI runs."""
import json

import numpy as np
import pytest

from kvpager.cli import main
from kvpager.errors import InvalidArgument
from kvpager.benchmarks import scheduler as bench
from kvpager.runtime.models.cost import CostModel
from kvpager.runtime.scheduler import SchedulerConfig
from kvpager.runtime.simulator import Simulator
from kvpager.runtime.workload import load_trace, synthetic


def simulate(workload, num_pages=400, **kw):
    sim = Simulator(workload, num_pages, SchedulerConfig(max_batch_size=32, max_num_batched_tokens=512,
                                                         max_model_len=4096, **kw), seed=3)
    return sim, sim.run()


def test_deterministic_under_seed():
    a = simulate(synthetic(300, 50.0, seed=11, arrivals="bursty"))[1].summary()
    b = simulate(synthetic(300, 50.0, seed=11, arrivals="bursty"))[1].summary()
    c = simulate(synthetic(300, 50.0, seed=12, arrivals="bursty"))[1].summary()
    assert a == b and a != c


def test_every_request_finishes_and_pages_come_back_under_pressure():
    wl = synthetic(200, 100.0, seed=0, length_dist="uniform", prompt_mean=300, output_mean=200)
    sim, metrics = simulate(wl, num_pages=40, num_speculative_tokens=2)
    s = metrics.summary()
    assert s["requests_finished"] == 200 and s["preemptions"] > 0
    assert s["output_tokens"] == int(wl.output_len.sum())
    assert sim.allocator.num_used == 0
    sim.allocator.check_invariants({})


def test_step_time_follows_the_cost_model():
    cost = CostModel(per_step_s=1e-3, per_token_s=0.0, read_bandwidth=1e12, num_layers=1,
                     bytes_per_token_per_layer=1000)
    assert cost.step_time(kv_tokens_read=2_000_000, new_tokens=5) == pytest.approx(1e-3 + 2e-3)
    assert cost.step_time(2_000_000, 5, model_calls=3) == pytest.approx(3e-3 + 2e-3)


def test_batched_prefill_is_priced_per_model_call():
    """A burst of prompts: one call per chunk pays the per-call cost many times over, the batched
    form a few times plus its padding columns; the scheduling is the same."""
    wl = synthetic(64, 1e6, seed=1, length_dist="uniform", prompt_mean=100, output_mean=2)
    cost = CostModel(per_step_s=1e-3, per_token_s=1e-6)
    runs = {}
    for batched in (True, False):
        config = SchedulerConfig(max_batch_size=64, max_num_batched_tokens=8192, max_model_len=512,
                                 batched_prefill=batched)
        sim = Simulator(wl, 400, config, cost)
        runs[batched] = (sim.run().summary(), sim.clock)
    (fast, t_batched), (slow, t_per_request) = runs[True], runs[False]
    assert fast["output_tokens"] == slow["output_tokens"] == int(wl.output_len.sum())
    # the first step prefills all 64 prompts: 64 calls against a handful
    assert t_per_request - t_batched > 40e-3


def test_trace_loading(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("arrival,prompt_len,output_len,user\n0.5,10,3,x\n0.0,20,4,y\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"arrival": 0.0, "prompt_len": 20, "output_len": 4}\n'
                     '{"arrival": 0.5, "prompt_len": 10, "output_len": 3}\n')
    for path in (csv, jsonl):
        wl = load_trace(path)
        assert wl.arrival.tolist() == [0.0, 0.5] and wl.prompt_len.tolist() == [20, 10]
        assert simulate(wl)[1].summary()["output_tokens"] == 7
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,prompt\n0,1\n")
    with pytest.raises(InvalidArgument, match="output_len"):
        load_trace(bad)


def test_cli_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["simulate", "--requests", "300", "--rate", "30", "--seed", "5", "--no-progress",
            "--num-pages", "200", "--out", str(out)]
    assert main(argv) == 0
    assert "TTFT" in capsys.readouterr().out
    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"]["requests_finished"] == 300 and len(doc["requests"]["ttft_s"]) == 300
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = doc["summary"]
    assert main(argv) == 0  # same seed, same numbers (wall time aside)
    again = json.loads((out / "summary.json").read_text())["summary"]
    assert {k: v for k, v in first.items() if k != "wall_s"} == {k: v for k, v in again.items() if k != "wall_s"}


def test_scheduler_bench_runs():
    times = bench.measure(batch=64, steps=20, prompt_len=100)
    assert len(times["total"]) == 20 and np.all(np.asarray(times["total"]) > 0)


def test_timeline_shows_the_longest_queue_and_every_preemption():
    wl = synthetic(300, 200.0, seed=1, length_dist="uniform", prompt_mean=300, output_mean=200)
    sim, metrics = simulate(wl, num_pages=40)
    series = metrics.timeseries(bins=50)
    waiting = np.frombuffer(metrics.steps["waiting"])
    assert max(series["waiting_max"]) == waiting.max()  # the peak, not a bin's mean
    assert all(m >= a for m, a in zip(series["waiting_max"], series["waiting"]))
    assert sum(series["preemptions"]) == metrics.summary()["preemptions"] > 0


def test_png_title_names_the_configuration(tmp_path, monkeypatch, capsys):
    from kvpager.runtime import simulate_cli

    titles = []
    monkeypatch.setattr(simulate_cli, "_plot", lambda series, path, title: titles.append(title))
    assert main(["simulate", "--requests", "50", "--rate", "7", "--arrivals", "bursty",
                 "--num-pages", "300", "--max-batch-size", "16", "--mtp", "1", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    for part in ("50 requests", "bursty 7/s", "300 pages", "batch <= 16", "MTP 1 @ 0.7", "seed 0"):
        assert part in titles[0]
