"""The simulator with prefix caching: shared-content workloads (system prompts, chats, Mooncake
traces), synthetic tokens, hits that shorten prefill, and the CLI's figures."""
import json

import numpy as np
import pytest

from kvpager.cli import main
from kvpager.errors import ConfigError, InvalidArgument
from kvpager.runtime.scheduler import SchedulerConfig
from kvpager.runtime.shared_prefix import Content, chats, system_prompts
from kvpager.runtime.simulator import Simulator
from kvpager.runtime.workload import Workload, load_trace, synthetic


def simulate(workload, caching, num_pages=400):
    config = SchedulerConfig(max_batch_size=32, max_num_batched_tokens=512, max_model_len=4096,
                             enable_prefix_caching=caching)
    sim = Simulator(workload, num_pages, config, seed=3)
    return sim, sim.run().summary()


def test_content_tokens_are_equal_exactly_where_segments_are():
    a, b = Content.of([(7, 100), (8, 50)]), Content.of([(7, 60), (9, 90)])
    ta, tb = a.tokens(0, 150), b.tokens(0, 150)
    assert (ta[:60] == tb[:60]).all() and (ta[60:] != tb[60:]).all()
    assert (a.tokens(90, 120) == ta[90:120]).all() and ta.dtype == np.int32 and ta.min() >= 0


def test_system_prompts_hit_and_finish_faster():
    wl = synthetic(300, 20.0, seed=1, prompt_mean=100, output_mean=20)
    wl.prompt_len, wl.content = system_prompts(wl.arrival, wl.prompt_len, wl.output_len, 4, 600.0,
                                               1.1, 1, 2048)
    (off_sim, off), (on_sim, on) = simulate(wl, False), simulate(wl, True)
    assert off["prefix_hit_rate"] == 0 and on["prefix_hit_rate"] > 0.5
    assert on["requests_finished"] == off["requests_finished"] == 300
    assert on["output_tokens"] == off["output_tokens"]
    assert on["ttft"]["mean"] < off["ttft"]["mean"]
    assert on_sim.allocator.num_used == 0
    on_sim.allocator.check_invariants({})
    on_sim.scheduler.prefix.cache.check_invariants()


def test_chats_extend_their_previous_turn():
    arrival, prompt, output, content = chats(200, 10.0, 0, 4.0, 2.0, 50.0, 30.0, 200.0, 0.5, 2048)
    assert len(arrival) == 200 and (np.diff(arrival) >= 0).all()
    _, s = simulate(Workload(arrival, prompt, output, content), True)
    assert s["prefix_hit_rate"] > 0.3 and s["requests_finished"] == 200


def test_mooncake_trace(tmp_path):
    lines = [{"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [1, 2, 3]},
             {"timestamp": 500, "input_length": 1030, "output_length": 5, "hash_ids": [1, 2, 4]},
             {"timestamp": 250, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]}]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    wl = load_trace(path)
    assert wl.arrival.tolist() == [0.0, 0.25, 0.5] and wl.prompt_len.tolist() == [1100, 700, 1030]
    first, second = wl.content[0].tokens(0, 1100), wl.content[1].tokens(0, 700)
    assert (first[:700] == second).all()  # block 2 of the shorter prompt is a prefix of block 2
    _, s = simulate(wl, True)
    # request 2 hits blocks 1 and part of 2 (699 of 700: one token is computed); request 3 hits
    # the full pages of blocks 1 and 2 (1024 tokens)
    assert s["prefix_hit_tokens"] >= 640 + 1024
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1,
                               "hash_ids": "x"}))
    with pytest.raises(InvalidArgument, match="hash_ids"):
        load_trace(bad)


def test_cli_writes_hit_rate_and_kv_usage(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--requests", "200", "--rate", "20", "--workload", "system-prompts",
                 "--system-prompts", "4", "--system-prompt-len", "300", "--prefix-caching",
                 "--num-pages", "400", "--no-progress", "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"]["prefix_hit_rate"] > 0.3 and doc["config"]["prefix_caching"]
    timeline = doc["timeline"]
    assert max(timeline["kv_usage_tokens"]) > 0
    assert any(r is not None and r > 0 for r in timeline["prefix_hit_rate"])
    assert (out / "timeline.png").stat().st_size > 0
    assert "prefix hit rate" in capsys.readouterr().out
    assert main(["simulate", "--requests", "10", "--prefix-caching", "--num-pages", "10",
                 "--no-progress"]) == 2
    assert "--max-model-len" in capsys.readouterr().err


def test_bad_workload_parameters():
    with pytest.raises(ConfigError, match="num_prompts"):
        system_prompts(np.zeros(1), np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64), 0,
                       10.0, 1.0, 0, None)
