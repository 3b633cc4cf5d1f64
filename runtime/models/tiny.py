"""TinyMLA: a few-layer, random-weight, absorbed-MLA language model for CPU tests.

It has the cache geometry of DeepSeek-V3 (one latent head of 576 = 512 compressed + 64 RoPE,
dv = 512) and everything else small, so it exercises the real pool, slot mapping, block tables,
metadata and MLA path (`kvpager.mla.flash_mla_with_kvcache`, the PyTorch reference on CPU) in
milliseconds. Per layer, for tokens x [n, hidden]:

    latent = [rmsnorm(x W_dkv) , rope(x W_kr)]          [n, 576]  -> written to the cache
    q      = [x W_q_latent     , rope(x W_q_rope)]      [n, h_q, 576]  (W_UK already absorbed)
    o      = MLA(q, cache)                              [n, h_q, 512]
    x     += (o W_uv) W_o ;  x += mlp(rmsnorm(x))

Weights come from `torch.manual_seed(seed)`, so two TinyMLA(seed=s) are the same model.
"""
from __future__ import annotations

import math

import torch

from kvpager import CacheConfig, PagePool, flash_mla_with_kvcache
from kvpager.runtime.models.protocol import DecodeBatch, PrefillBatch

D_LATENT, D_ROPE, D_V = 512, 64, 512
HEAD_DIM = D_LATENT + D_ROPE


class TinyMLA:
    def __init__(self, num_layers: int = 2, num_heads: int = 4, hidden: int = 64, vocab_size: int = 128,
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.num_layers, self.num_heads, self.hidden, self.vocab_size = num_layers, num_heads, hidden, vocab_size
        self.device = torch.device(device)
        self.softmax_scale = 1.0 / math.sqrt(D_ROPE + 128)  # DeepSeek's qk_nope 128 + rope 64
        gen = torch.Generator().manual_seed(seed)

        def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
            fan_in = shape[-2] if len(shape) > 1 else shape[-1]
            t = torch.randn(*shape, generator=gen) * (scale / math.sqrt(fan_in))
            return t.to(self.device)

        h, hq = hidden, num_heads
        self.embed = w(vocab_size, h, scale=math.sqrt(h))
        self.layers = [
            dict(w_dkv=w(h, D_LATENT), w_kr=w(h, D_ROPE), w_q=w(h, hq * D_LATENT),
                 w_qr=w(h, hq * D_ROPE), w_uv=w(hq, D_V, 16), w_o=w(hq * 16, h),
                 w_up=w(h, 4 * h), w_down=w(4 * h, h))
            for _ in range(num_layers)
        ]
        self.lm_head = w(h, vocab_size, scale=4.0)  # spread logits: greedy ties are rare
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D_ROPE, 2, dtype=torch.float32) / D_ROPE))
        self.inv_freq = inv_freq.to(self.device)

    def cache_config(self, num_pages: int, kv_cache_dtype: str = "auto") -> CacheConfig:
        """The CacheConfig this model's pool needs (float32 reference path); kv_cache_dtype
        'fp8' stores kvpager.fp8's 656-byte rows instead of float32 ones."""
        return CacheConfig(num_layers=self.num_layers, num_pages=num_pages, dtype="float32",
                           device=str(self.device), kv_cache_dtype=kv_cache_dtype)

    # --- Model protocol ---------------------------------------------------------------------
    def prefill(self, batch: PrefillBatch, pool: PagePool) -> torch.Tensor:
        """The padded [B, s_q] batch runs like a decode batch (protocol.py: why that is exact);
        logits of the last column of the rows that need them."""
        hidden = self._forward(batch.input_ids, batch.positions, batch.slot_mapping,
                               batch.block_table, batch.cache_seqlens, batch.mla_metadata, pool)
        return self._logits(hidden[batch.logits_rows, -1])

    def decode(self, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        hidden = self._forward(batch.input_ids, batch.positions, batch.slot_mapping,
                               batch.block_table, batch.cache_seqlens, batch.mla_metadata, pool)
        return self._logits(hidden)

    # --- the network ------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 metadata: tuple[torch.Tensor, torch.Tensor], pool: PagePool) -> torch.Tensor:
        """ids, positions int64 [b, s]; slots int64 [b * s] -> hidden float32 [b, s, hidden]."""
        b, s = ids.shape
        hq = self.num_heads
        x = self.embed[ids.reshape(-1)]  # [b*s, h]
        cos, sin = self._rope_tables(positions.reshape(-1))
        for i, p in enumerate(self.layers):
            xn = _rmsnorm(x)
            latent = torch.cat([_rmsnorm(xn @ p["w_dkv"]), _rope(xn @ p["w_kr"], cos, sin)], -1)
            pool.write(i, slots, latent)
            q_rope = _rope((xn @ p["w_qr"]).view(-1, hq, D_ROPE), cos[:, None], sin[:, None])
            q = torch.cat([(xn @ p["w_q"]).view(-1, hq, D_LATENT), q_rope], -1)
            # q in the model's dtype (the pool's unless it holds FP8 bytes)
            out, _ = flash_mla_with_kvcache(
                q.view(b, s, hq, HEAD_DIM).to(pool.config.torch_dtype), pool.layer(i), block_table,
                cache_seqlens, D_V, *metadata, softmax_scale=self.softmax_scale, causal=True,
                is_fp8_kvcache=pool.is_fp8)
            o = torch.einsum("nhv,hvo->nho", out.reshape(b * s, hq, D_V).float(), p["w_uv"])
            x = x + o.reshape(b * s, -1) @ p["w_o"]
            x = x + torch.nn.functional.silu(_rmsnorm(x) @ p["w_up"]) @ p["w_down"]
        return _rmsnorm(x).view(b, s, self.hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.lm_head

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq  # [n, 32]
        return angles.cos(), angles.sin()


def _rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angles; x [..., 64]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)
