"""A compact DeepSeek-V3-architecture causal LM that runs on kvpager's paged latent cache.

It implements kvpager.runtime's model Protocol (runtime/models/protocol.py): `prefill(batch,
pool)` (several requests' chunks, left-padded) and `decode(batch, pool)` write each layer's latent KV through the slot mapping and
attend with kvpager.mla over the pages; the engine owns pages, tables, metadata and sampling.
Module and parameter names mirror transformers' DeepseekV3ForCausalLM, so a checkpoint's
state dict loads unchanged (weights.py).
"""
from __future__ import annotations

import torch
from torch import nn

from kvpager.mla import flash_mla_with_kvcache
from kvpager.pool import PagePool
from kvpager.runtime.models.protocol import DecodeBatch, PrefillBatch

from .attention import MLAttention
from .config import ModelConfig
from .layers import MLP, RMSNorm
from .moe import MoE
from .rope import Rope


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLAttention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """transformers' `model.`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    """The causal LM. Protocol attributes: num_layers, num_heads, vocab_size, device.

    mla_impl: the attention over the paged cache, with kvpager.mla.flash_mla_with_kvcache's
    signature (is_fp8_kvcache included: the model passes pool.is_fp8) — that function by
    default (the kernel on Hopper, else the reference); gpu_check swaps in the float32
    reference to isolate the kernel.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rope(cfg)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.mla_impl = flash_mla_with_kvcache

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch, pool: PagePool) -> torch.Tensor:
        """B sequences' chunks, left-padded to s_q columns: causal attention over the cache
        (runtime/models/protocol.py: why padding is exact). Returns float32 logits
        [batch.num_logits, vocab] of the last column of the rows in batch.logits_rows."""
        b, s_q = batch.input_ids.shape
        h = self._layers(batch.input_ids.reshape(-1), batch.positions.reshape(-1), batch.slot_mapping,
                         pool, batch.block_table, batch.cache_seqlens, batch.mla_metadata, batch=b)
        return self._logits(h.view(b, s_q, -1)[batch.logits_rows, -1])

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        """s_q new tokens for each of B sequences -> float32 logits [B, s_q, vocab]."""
        b, s_q = batch.input_ids.shape
        h = self._layers(batch.input_ids.reshape(-1), batch.positions.reshape(-1), batch.slot_mapping,
                         pool, batch.block_table, batch.cache_seqlens, batch.mla_metadata, batch=b)
        return self._logits(h).view(b, s_q, -1)

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                pool: PagePool, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                mla_metadata: tuple[torch.Tensor, torch.Tensor], batch: int) -> torch.Tensor:
        """Tokens [n] (row-major over batch x s_q) through every layer -> hidden [n, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        n, s_q = x.shape[0], x.shape[0] // batch
        # q and latents in the cache config's model dtype: pool.kv is uint8 when it holds FP8 rows
        dtype = pool.config.torch_dtype
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            query, latent = attn.query_and_latent(layer.input_layernorm(x), cos, sin, self.rope)
            pool.write(i, slot_mapping, latent.to(dtype))
            out, _ = self.mla_impl(query.view(batch, s_q, self.num_heads, -1).to(dtype), pool.layer(i),
                                   block_table, cache_seqlens, attn.kv_lora_rank, *mla_metadata,
                                   softmax_scale=attn.softmax_scale, causal=True,
                                   is_fp8_kvcache=pool.is_fp8)
            x = x + attn.output(out.view(n, self.num_heads, -1).to(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()
