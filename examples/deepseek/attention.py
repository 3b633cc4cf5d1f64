"""Multi-head latent attention in the absorbed form, over kvpager's paged 576-wide latent cache.

Per token the cache holds c = [RMSNorm(c_kv) (512) | rope(k_pe) (64)], shared by every head.
kv_b_proj maps c_kv to each head's nope key and value: W_UK [h, nope, 512], W_UV [h, v, 512].
Since q_nope . (W_UK c_kv) = (W_UK^T q_nope) . c_kv, folding W_UK into the query lets the
kernel attend straight over the latents (MQA with one 576-wide kv head); the 512-wide output
is mapped to each head's value space by W_UV, then o_proj. The attention call itself is the
model's (model.py), between query_and_latent and output.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .rope import Rope, softmax_scale


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        q_out = self.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj.weight (no copy): W_UK [h, nope, 512], W_UV [h, v, 512]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def query_and_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden], cos/sin [n, 32] -> (absorbed query [n, h, 576], latent [n, 576])."""
        n = x.shape[0]
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, self.num_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        w_uk, _ = self._w_uk_uv()
        q_latent = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)
        query = torch.cat([q_latent, rope.apply(q_pe, cos, sin)], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), rope.apply(k_pe, cos, sin)], dim=-1)
        return query, latent

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [n, h, 512] (softmax-weighted latents) -> [n, hidden]."""
        _, w_uv = self._w_uk_uv()
        v = torch.einsum("nhc,hvc->nhv", attn, w_uv)
        return self.o_proj(v.reshape(attn.shape[0], self.num_heads * self.v_dim))
