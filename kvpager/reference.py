"""The PyTorch reference MLA decode over a paged latent cache: FlashMLA's semantics, float32
compute. Arguments are assumed valid (kvpager.mla checks them)."""
from __future__ import annotations

import math

import torch

from kvpager import fp8


def mla_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, head_dim_v: int,
                         softmax_scale: float | None = None,
                         causal: bool = False,
                         is_fp8_kvcache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over each sequence's cached tokens, V = the first head_dim_v columns of K.

    q: [b, s_q, h_q, d]; k_cache: [num_pages, page_size, h_kv, d]; block_table: int32
    [b, max_pages]; cache_seqlens: int32 [b]. Returns out [b, s_q, h_q, head_dim_v] in q's dtype
    and lse float32 [b, h_q, s_q] (natural log of the sum of exp(scale * q.k)).
    Query head h uses kv head h // (h_q // h_kv). With causal and s_q > 1, query row i sees keys
    [0, seqlen - s_q + i]. A row that sees no key gets out = 0 and lse = +inf.
    is_fp8_kvcache: k_cache holds kvpager.fp8's 656-byte rows [num_pages, page_size, h_kv, 656]
    (any page stride); each sequence's pages are dequantized after the gather, so the result
    equals this function on the dequantized cache.

    Only the first ceil(seqlen / page_size) table entries of a row are read and only the first
    seqlen gathered tokens enter the matmuls, so padding entries and whatever the unused slots
    hold (NaN included) never reach the result. Loops over the batch, never over tokens.
    """
    b, s_q, h_q, d = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    rows = torch.arange(s_q, device=q.device)
    for i, seqlen in enumerate(cache_seqlens.tolist()):
        if seqlen == 0:
            continue
        num_pages = -(-seqlen // page_size)
        pages = block_table[i, :num_pages].to(torch.int64)
        keys = k_cache.index_select(0, pages)
        if is_fp8_kvcache:
            keys = fp8.dequantize(keys, torch.float32)
        keys = keys.reshape(num_pages * page_size, h_kv, d)[:seqlen]
        keys = keys.float().transpose(0, 1)  # [h_kv, seqlen, d]
        query = q[i].float().reshape(s_q, h_kv, group, d).permute(1, 2, 0, 3)  # [h_kv, g, s_q, d]
        scores = torch.matmul(query, keys.unsqueeze(1).transpose(-1, -2)) * scale  # [h_kv,g,s_q,L]
        if causal and s_q > 1:
            last_key = seqlen - s_q + rows  # row i sees keys 0..last_key[i]
            visible = torch.arange(seqlen, device=q.device)[None, :] <= last_key[:, None]
            scores = scores.masked_fill(~visible, -math.inf)
        row_max = scores.amax(dim=-1, keepdim=True)
        empty = row_max == -math.inf  # rows that see no key
        row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        values = keys[..., :head_dim_v].unsqueeze(1)  # [h_kv, 1, L, dv]
        o = torch.matmul(probs, values) / torch.where(empty, torch.ones_like(denom), denom)
        row_lse = torch.where(empty, torch.full_like(denom, math.inf), denom.log() + row_max)
        out[i] = o.reshape(h_q, s_q, head_dim_v).transpose(0, 1)
        lse[i] = row_lse.reshape(h_q, s_q)
    return out.to(q.dtype), lse
