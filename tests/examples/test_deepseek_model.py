"""Pieces of the example model against transformers' definitions (when installed): YaRN
frequencies and softmax scale, the grouped noaux_tc router, and the absorbed MLA identity."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvpager.examples.deepseek.config import ModelConfig, to_hf_dict
from kvpager.examples.deepseek.moe import Router
from kvpager.examples.deepseek.rope import Rope, inv_freq_and_attention_factor, softmax_scale
from kvpager.examples.deepseek.weights import random_model

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


@pytest.fixture
def hf():
    """transformers' DeepseekV3 modeling module (these tests skip without transformers)."""
    pytest.importorskip("transformers", reason="the comparisons need transformers (optional test dependency)")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    return modeling_deepseek_v3


def _hf_config(cfg: ModelConfig):
    import transformers

    d = to_hf_dict(cfg)
    for key in ("architectures", "model_type", "torch_dtype"):
        d.pop(key)
    return transformers.DeepseekV3Config(**d)


@pytest.mark.parametrize("scaling", [None, YARN])
def test_rope_frequencies_match_transformers(hf, scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(rope_scaling=scaling, rope_theta=10000.0, max_position_embeddings=163840)
    hf_cfg = _hf_config(cfg)
    ours, factor = inv_freq_and_attention_factor(cfg)
    if scaling is None:
        want, want_factor = hf.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    assert factor == pytest.approx(want_factor)
    attn = hf.DeepseekV3Attention(hf_cfg, 0)
    assert softmax_scale(cfg) == pytest.approx(attn.scaling)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_rotation_matches_transformers(hf, interleave):
    cfg = ModelConfig(rope_interleave=interleave)
    rope = Rope(cfg)
    pos = torch.tensor([0, 1, 7, 900, 5000])
    cos, sin = rope.cos_sin(pos, torch.float32)
    q, k = torch.randn(5, 16, 64), torch.randn(5, 64)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    apply = hf.apply_rotary_pos_emb_interleave if interleave else hf.apply_rotary_pos_emb
    want_q, want_k = apply(q[None].transpose(1, 2), k[None, None], full_cos[None], full_sin[None])
    torch.testing.assert_close(rope.apply(q, cos, sin), want_q[0].transpose(0, 1))
    torch.testing.assert_close(rope.apply(k, cos, sin), want_k[0, 0])


def test_router_matches_transformers(hf):
    cfg = ModelConfig(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    ours = Router(cfg)
    theirs = hf.DeepseekV3TopkRouter(_hf_config(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        ours.weight.normal_()
        ours.e_score_correction_bias.normal_(0, 0.1)
        theirs.weight.copy_(ours.weight)
        theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    x = torch.randn(64, cfg.hidden_size)
    _, w, idx = theirs(x)
    want = torch.zeros(64, 16).scatter_(1, idx, w)
    torch.testing.assert_close(ours(x), want)
    # only experts of the top_k groups are chosen
    chosen_groups = (ours(x) > 0).view(64, 4, 4).any(-1).sum(-1)
    assert (chosen_groups <= cfg.topk_group).all()


def test_absorbed_scores_equal_expanded_attention_scores():
    """q_nope . (W_UK c) == (W_UK^T q_nope) . c: what lets the kernel attend over latents."""
    cfg = dataclasses.replace(ModelConfig(), num_hidden_layers=1, n_routed_experts=0)
    model = random_model(cfg, seed=0)
    attn = model.model.layers[0].self_attn
    x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope.cos_sin(torch.arange(6), torch.float32)
    with torch.no_grad():
        query, latent = attn.query_and_latent(x, cos, sin, model.rope)
        scores = torch.einsum("nhc,mc->hnm", query, latent)
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(6, 16, -1)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, 64], -1)
        kv = attn.kv_b_proj(latent[:, :512]).view(6, 16, -1)
        k_nope = kv[..., :cfg.qk_nope_head_dim]
        want = (torch.einsum("nhd,mhd->hnm", q_nope, k_nope)
                + torch.einsum("nhr,mr->hnm", model.rope.apply(q_pe, cos, sin), latent[:, 512:]))
    # Scores reach ~100 here: fp32 reassociation over ~190 terms leaves a few 1e-5 absolute.
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
