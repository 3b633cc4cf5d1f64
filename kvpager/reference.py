"""The PyTorch reference MLA decode over a paged latent cache: FlashMLA's semantics, float32
compute. Arguments are assumed valid (kvpager.mla checks them)."""
from __future__ import annotations

import math

import torch

from kvpager import fp8

SCORE_CHUNK_ELEMENTS = 1 << 23  # float32 scores per chunk of query rows (32 MiB)


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
    hold (NaN included) never reach the result. Loops over the batch and over chunks of query
    rows (memory O(SCORE_CHUNK_ELEMENTS + seqlen * d) per sequence), never over tokens.
    """
    b, s_q, h_q, d = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
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
        # Query rows in chunks whose scores stay within SCORE_CHUNK_ELEMENTS floats: a long
        # causal prefill (s_q = seqlen = 16k, 16 heads: 16 GiB of scores at once) costs time,
        # not memory. Decode (s_q of 1..a few) is one chunk.
        rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // (h_q * seqlen))
        for r0 in range(0, s_q, rows_per_chunk):
            r1 = min(s_q, r0 + rows_per_chunk)
            o, row_lse = _attend(query[:, :, r0:r1], keys, head_dim_v, scale,
                                 seqlen - s_q + r0 if causal and s_q > 1 else None)
            out[i, r0:r1] = o.reshape(h_q, r1 - r0, head_dim_v).transpose(0, 1)
            lse[i, :, r0:r1] = row_lse.reshape(h_q, r1 - r0)
    return out.to(q.dtype), lse


def _attend(query: torch.Tensor, keys: torch.Tensor, head_dim_v: int, scale: float,
            first_last_key: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """query [h_kv, g, r, d] over keys [h_kv, L, d] (float32). first_last_key: causal, query
    row j sees keys 0..first_last_key + j; None: every key. Returns o [h_kv, g, r, dv] and lse
    [h_kv, g, r, 1] (+inf, with o = 0, for a row that sees no key)."""
    scores = torch.matmul(query, keys.unsqueeze(1).transpose(-1, -2)) * scale  # [h_kv, g, r, L]
    if first_last_key is not None:
        r, length = query.shape[2], keys.shape[1]
        last_key = first_last_key + torch.arange(r, device=query.device)
        visible = torch.arange(length, device=query.device)[None, :] <= last_key[:, None]
        scores = scores.masked_fill(~visible, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = row_max == -math.inf  # rows that see no key
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores.sub_(row_max))
    denom = probs.sum(dim=-1, keepdim=True)
    values = keys[..., :head_dim_v].unsqueeze(1)  # [h_kv, 1, L, dv]
    o = torch.matmul(probs, values) / torch.where(empty, torch.ones_like(denom), denom)
    row_lse = torch.where(empty, torch.full_like(denom, math.inf), denom.log() + row_max)
    return o, row_lse
