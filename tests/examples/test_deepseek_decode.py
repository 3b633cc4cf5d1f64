"""`kvpager demo` / examples/deepseek_decode.py on the CPU: it creates the random demo model,
runs it through the engine and prints the MLA path, tokens/s and sample tokens."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpager.cli import main as kvpager_main
from kvpager.errors import ConfigError
from kvpager.examples.deepseek.config import ModelConfig
from kvpager.examples.deepseek.cuda_graph import GraphedDecode
from kvpager.examples.deepseek.runner import build_engine
from kvpager.examples.deepseek.weights import random_model

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
