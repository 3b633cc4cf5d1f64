"""`kvpager demo` / examples/deepseek_decode.py on the CPU: it creates the random demo model,
runs it through the engine and prints the MLA path, tokens/s and sample tokens."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpager.cli import main as kvpager_main
from kvpager.errors import ConfigError
from kvpager.examples.deepseek.config import ModelConfig
from kvpager.examples.deepseek.cuda_graph import GraphedDecode
from kvpager.examples.deepseek.runner import TOKEN_BUDGET, build_engine
from kvpager.examples.deepseek.weights import random_model
from kvpager.runtime.request import SamplingParams

ARGS = ["--batch", "3", "--max-new-tokens", "4", "--prompt-len", "20"]
TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                   num_hidden_layers=2, q_lora_rank=48, qk_nope_head_dim=16, v_head_dim=16)


@pytest.fixture(autouse=True, scope="module")
def cache_home(tmp_path_factory):
    """One demo model for the module, made in a temp cache home rather than ~/.cache."""
    home = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


def test_kvpager_demo_prints_path_speed_and_tokens(capsys):
    assert kvpager_main(["demo", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "using the PyTorch reference MLA" in out
    assert "tokens/s" in out
    assert out.count("  request ") == 3


def test_kvpager_demo_runs_on_an_fp8_cache(capsys):
    assert kvpager_main(["demo", *ARGS, "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: fp8, 656 bytes a token per layer" in out
    assert out.count("  request ") == 3


def test_kvpager_demo_with_prefix_caching_reports_the_shared_prompt_ttft(capsys):
    assert kvpager_main(["demo", *ARGS, "--prefix-caching"]) == 0
    out = capsys.readouterr().out
    assert "without prefix caching" in out and "same tokens" in out


def test_demo_model_generates_on_an_fp8_cache():
    """The random demo-architecture model: the engine with an FP8 cache against the float32
    cache, greedy. Random weights give flat logits, so near-ties may flip: the figure is
    reported, and the first token (after the prompt alone) must agree for most requests."""
    model = random_model(TINY)
    prompts = [[2 + (7 * i + 3 * j) % 250 for j in range(30 + 9 * i)] for i in range(4)]
    outputs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        engine = build_engine(model, len(prompts), 80, torch.float32, kv_cache_dtype=kv_cache_dtype)
        assert engine.pool.is_fp8 == (kv_cache_dtype == "fp8")
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=8))
        outputs[kv_cache_dtype] = [list(o.token_ids) for o in outs]
    same = [a == b for x, y in zip(outputs["auto"], outputs["fp8"]) for a, b in zip(x, y)]
    print(f"demo model, FP8 vs float32 cache: free-running agreement {sum(same) / len(same):.3f}")
    assert sum(x[0] == y[0] for x, y in zip(outputs["auto"], outputs["fp8"])) >= 3


def test_sampling_is_seeded_per_request(capsys):
    def outputs() -> list[str]:
        assert kvpager_main(["demo", *ARGS, "--temperature", "1.0", "--seed", "7"]) == 0
        return [line.split("->")[1] for line in capsys.readouterr().out.splitlines() if "->" in line]

    first = outputs()
    assert first == outputs()
    assert len(set(first)) == len(first), "requests sharing a seed would sample the same tokens"


def test_script_runs_standalone_and_reports_bad_options(tmp_path, cache_home):
    script = Path(__file__).resolve().parents[2] / "examples" / "deepseek_decode.py"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    ok = subprocess.run([sys.executable, str(script), "--batch", "2", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, str(script), "--batch", "0"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "--batch" in bad.stderr


def test_cuda_graphs_refuse_a_cpu_model():
    model = random_model(TINY)
    engine = build_engine(model, 2, 64, torch.float32)
    with pytest.raises(ConfigError, match="CUDA"):
        GraphedDecode(model, 2)


# (the command line as docs/bad-inputs.md shows it, a regex the error line matches); each is
# refused before any weight is loaded.
DEMO_MISTAKES = [
    ("kvpager demo --device cuda (CPU-only torch)", r"argument --device: 'cuda': this torch build has no CUDA; use 'cpu'"),
    ("kvpager demo --device gpu", r"argument --device: 'gpu' is not a torch device"),
    ("kvpager demo --temperature -1", r"argument --temperature: -1 must be >= 0"),
    ("kvpager demo --batch 0", r"argument --batch: 0 must be >= 1"),
    ("kvpager demo --prompt-len 17000",
     r"--prompt-len 17000 \+ --max-new-tokens 32 exceeds the model's max_position_embeddings \(16384\)"),
    ("kvpager demo --prompt-len 100000", r"max_position_embeddings"),
    ("kvpager demo --cuda-graphs (on the CPU)", r"--cuda-graphs needs a CUDA device"),
    ("kvpager demo --kv-cache-dtype fp8 --dtype float16",
     r"--kv-cache-dtype fp8 serves bfloat16 queries .* not --dtype float16; use --dtype bfloat16"),
    ("kvpager demo --kv-cache-dtype int8", r"argument --kv-cache-dtype: invalid choice: 'int8'"),
]


@pytest.mark.parametrize("line, match", DEMO_MISTAKES, ids=[m[0] for m in DEMO_MISTAKES])
def test_demo_mistakes_are_refused_before_the_model_loads(line, match, monkeypatch, capsys):
    if torch.cuda.is_available() and "cuda" in line:
        pytest.skip("a GPU is present")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("kvpager.examples.deepseek.weights.load_model", no_loading)
    try:
        code = kvpager_main(line.split(" (")[0].split()[1:])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(rf"^kvpager demo: error: .*{match}", err, re.M), err


def test_every_demo_mistake_is_in_the_docs_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md").read_text()
    missing = [line for line, _ in DEMO_MISTAKES if f"| `{line}` |" not in doc]
    assert not missing, f"add these to docs/bad-inputs.md: {missing}"


def test_long_prompts_are_prefilled_in_chunks_of_the_token_budget():
    model = random_model(TINY)
    engine = build_engine(model, 1, 5000, torch.float32)
    assert engine.config.max_num_batched_tokens == TOKEN_BUDGET < 5000
    engine.submit([2 + i % 200 for i in range(4000)], SamplingParams(max_new_tokens=1))
    chunks = []
    for _ in range(2):  # plan only: no model call needed
        for req, _, n in engine.scheduler.schedule().prefill:
            chunks.append(n)
            req.num_computed += n
    assert chunks == [TOKEN_BUDGET, 4000 - TOKEN_BUDGET]


def test_build_engine_refuses_lengths_beyond_the_models_positions():
    model = random_model(TINY)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_engine(model, 1, TINY.max_position_embeddings + 1, torch.float32)


def test_a_config_that_is_not_json_is_a_config_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert kvpager_main(["demo", "--model-dir", str(tmp_path)]) == 2
    assert re.search(r"^kvpager demo: error: .*config.json is not a JSON config", capsys.readouterr().err, re.M)
