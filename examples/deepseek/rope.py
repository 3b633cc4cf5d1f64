"""Rotary embedding of the 64-dim decoupled key/query, with DeepSeek-V3's YaRN scaling.

YaRN (arXiv 2309.00071) blends interpolated and original frequencies with a linear ramp over
the dimensions between the beta_fast / beta_slow correction points, and scales cos/sin by
mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for V3's config). The softmax
scale gets mscale(factor, mscale_all_dim)^2 on top of 1/sqrt(qk_head_dim): see softmax_scale.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """The attention's softmax scale: 1/sqrt(qk_nope + qk_rope) times YaRN's mscale^2 — the
    original head dim, not the 576 the absorbed query has."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


def inv_freq_and_attention_factor(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """float32 [rope_dim / 2] inverse frequencies and the cos/sin multiplier."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    original = rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    # (1 - extrapolate), not ramp: the same float32 rounding as transformers and DeepSeek's code
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attention_factor


class Rope(torch.nn.Module):
    """cos/sin for positions, and their application to [..., 64] rope dims."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [n] -> cos, sin [n, 32] in `dtype` (computed in float32)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.float()[None, :]
        return ((freqs.cos() * self.attention_factor).to(dtype),
                (freqs.sin() * self.attention_factor).to(dtype))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [n, ..., 64], cos/sin [n, 32] -> rotated x [n, ..., 64].

        Interleaved checkpoints (V3) pair dims (0,1), (2,3), …; the output puts the pairs'
        first members in the first half, second members in the second (as transformers does).
        Queries and keys are permuted alike, so their dot products are unchanged, and the cache
        simply holds the key in that order."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
