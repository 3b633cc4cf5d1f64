"""The DeepSeek example on an FP8 latent cache on the GPU: the engine's decode steps (and, with the
64-row FP8 blocks on, its prefills) run the fused FP8 decode, and the CUDA-graph decode
(examples/deepseek/cuda_graph.py) replays it with the same tokens as eager decoding. (The
trained-model agreement figure is run_device.sh's fp8check stage.)"""
from __future__ import annotations

import pytest
import torch

import kvpager.kernels as kernels
from kvpager.examples.deepseek.config import ModelConfig
from kvpager.examples.deepseek.cuda_graph import GraphedDecode
from kvpager.examples.deepseek.runner import build_engine
from kvpager.examples.deepseek.weights import cast_parameters, random_model
from kvpager.runtime.request import SamplingParams


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not kernels.supports_device("cuda"):
        return f"{torch.cuda.get_device_name()} is not sm_90"
    return kernels.fp8_unavailable_reason()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ready")]

# std 0.02 weights: a calm random network, so eager and graphed runs see the same logits
TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                   num_hidden_layers=2, q_lora_rank=48, qk_nope_head_dim=16, v_head_dim=16)
PROMPTS = [[2 + (7 * i + 3 * j) % 250 for j in range(40 + 37 * i)] for i in range(4)]  # 4: no padding rows
STEPS = 40


def engine(kv_cache_dtype: str = "fp8"):
    model = random_model(TINY, seed=0, std=0.02).to("cuda")
    cast_parameters(model, torch.bfloat16)  # buffers (rope tables) stay float32
    return build_engine(model, len(PROMPTS), 256, torch.bfloat16, kv_cache_dtype=kv_cache_dtype)


def tokens(eng) -> list[list[int]]:
    """Greedy token ids of PROMPTS, STEPS each."""
    return [list(o.token_ids) for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=STEPS))]


def test_engine_decode_steps_run_the_fused_fp8_decode(fused_calls):
    eng = engine()
    assert eng.pool.is_fp8 and eng.pool.kv.dtype == torch.uint8
    outputs = tokens(eng)
    assert all(len(o) == STEPS for o in outputs)
    # every decode step (s_q = 1, 16 heads: 16 rows a kv head) of every layer
    decode_calls = [shape for shape in fused_calls if shape[1] == 1]
    assert len(decode_calls) == (STEPS - 1) * TINY.num_hidden_layers
    # each prompt's prefill (>= 40 * 16 rows a kv head) in every layer: on the fused FP8 decode's
    # 64-row blocks when they are on (FP8_SEESAW_DEFAULT), else on the reference
    prefill_lengths = sorted(shape[1] for shape in fused_calls if shape[1] > 1)
    if kernels.supports_fp8_kvcache(len(PROMPTS[0]) * 16):
        assert prefill_lengths == sorted(len(p) for p in PROMPTS for _ in range(TINY.num_hidden_layers))
    else:
        assert prefill_lengths == []


def test_graphed_fp8_decode_matches_eager():
    eager = tokens(engine())
    graphed_engine = engine()
    graphed_engine.model = GraphedDecode(graphed_engine.model, len(PROMPTS))
    graphed = tokens(graphed_engine)
    assert graphed == eager
    assert graphed_engine.model.graphs  # the decode really replayed a graph


def test_fp8_cache_agrees_with_the_bf16_cache_on_most_tokens():
    """Random weights: a floor well below the trained model's 0.99 (near-ties flip)."""
    fp8_tokens = tokens(engine("fp8"))
    bf16_tokens = tokens(engine("auto"))
    firsts = sum(a[0] == b[0] for a, b in zip(fp8_tokens, bf16_tokens))
    assert firsts >= 3, (fp8_tokens, bf16_tokens)
