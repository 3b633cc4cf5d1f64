"""The contract between the engine and a model: what one step hands the model, what it returns.

The engine owns the page pool, the sequences and the sampling; a model owns its weights and does
the arithmetic. Each engine step calls the model once per prefill batch (the prefill chunks of
several requests; a step has one, or a few when the chunks' lengths differ widely: see
kvpager.runtime.prefill) and once for the whole decode batch:

    logits = model.prefill(batch, pool)   # float [batch.num_logits, vocab]
    logits = model.decode(batch, pool)    # float [B, s_q, vocab]

Both calls must, in every layer l:
  1. write the latent KV (576 = 512 compressed + 64 rope) of the new tokens into the cache with
     `pool.write(l, slot_mapping, latent)` — slot = page * page_size + offset, so the model never
     sees pages directly;
  2. attend over the cache with `kvpager.mla.flash_mla_with_kvcache(q, pool.layer(l),
     block_table, cache_seqlens, head_dim_v, *mla_metadata, causal=True)` — q [b, s_q, h_q, 576]
     in the absorbed-MLA form. The metadata is computed once by the engine and shared by all
     layers; a model must not recompute it.

`cache_seqlens` already counts the new tokens (FlashMLA's convention: with causal=True, query
row i of s_q attends to positions < cache_seqlens - s_q + i + 1).

Batched prefill is exact because of that rule: every chunk is left-padded to the call's s_q (its
longest chunk), so a chunk's real tokens are the last n columns of its row and column
s_q - n + k sees keys [0, start + k], what a batch of one would see. The padding columns see
fewer keys (or none: out = 0), write their latent to the null page (PAD_PAGE, never handed to a
request, never read as one's KV) and their outputs are dropped. A model needs no padding logic:
it runs the [B, s_q] batch like a decode batch and returns the last column's logits for the rows
in `logits_rows`. Sampling happens in the engine:
models return raw logits (float32 preferred) and never touch the allocator or the request
objects. A model must not keep per-request state between calls: after a preemption the engine
recomputes a request from its tokens, with new pages.

Implementations: `kvpager.runtime.models.tiny.TinyMLA` (CPU test model),
`kvpager.examples` (DeepSeek-V3 architecture). The simulator does not call a model at all; it
prices each step with `kvpager.runtime.models.cost.CostModel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kvpager import PagePool


@dataclass
class PrefillBatch:
    """Prefill chunks of B sequences in one call: row b is tokens [start_b, start_b + n_b) of its
    sequence, left-padded to s_q = max(n_b) columns. A batch of one (B = 1) has no padding.

    request_ids:   list[str] [B]
    input_ids:     int64 [B, s_q]       padding columns: 0
    positions:     int64 [B, s_q]       start_b .. start_b + n_b - 1 in the last n_b columns;
                                        padding columns: 0
    slot_mapping:  int64 [B * s_q]      row-major over (b, column): write the latent KV here;
                                        padding columns point into the null page (PAD_PAGE)
    block_table:   int32 [B, max_pages] each sequence's pages (row padding is never read)
    cache_seqlens: int32 [B]            start_b + n_b: tokens in the cache once the chunk is written
    mla_metadata:  (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [B + 1]) from
                   kvpager.mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv),
                   computed once per call and shared by every layer
    query_lens:    list[int] [B]        n_b, each chunk's real tokens (the rest is padding)
    logits_rows:   int64 [R]            rows whose chunk completes its sequence's prefill: the
                                        model returns the logits of their last column (always a
                                        real token), in this order
    """

    request_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    mla_metadata: tuple[torch.Tensor, torch.Tensor]
    query_lens: list[int]
    logits_rows: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def s_q(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens: sum of query_lens."""
        return sum(self.query_lens)

    @property
    def num_logits(self) -> int:
        return self.logits_rows.numel()


@dataclass
class DecodeBatch:
    """s_q new tokens for each of B running sequences (s_q = 1, or 1 + draft tokens in MTP mode).

    input_ids:     int64 [B, s_q]
    positions:     int64 [B, s_q]
    slot_mapping:  int64 [B * s_q]      row-major over (b, i): write the latent KV here
    block_table:   int32 [B, max_pages]
    cache_seqlens: int32 [B]            includes the s_q new tokens
    mla_metadata:  (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [B + 1]) from
                   kvpager.mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv),
                   computed once per step and shared by every layer
    """

    request_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    mla_metadata: tuple[torch.Tensor, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def s_q(self) -> int:
        return self.input_ids.shape[1]


@runtime_checkable
class Model(Protocol):
    """What the engine needs from a model. Attributes are read once, at engine construction.

    num_layers:  must equal the cache's CacheConfig.num_layers
    num_heads:   h_q, query heads per token in the absorbed form (the metadata needs it)
    vocab_size:  width of the logits
    device:      where input tensors are placed (the pool's device)
    """

    num_layers: int
    num_heads: int
    vocab_size: int
    device: torch.device

    def prefill(self, batch: PrefillBatch, pool: PagePool) -> torch.Tensor:
        """Write the batch's latent KV, attend causally; return the logits float
        [batch.num_logits, vocab] of the last column of each row in batch.logits_rows."""
        ...

    def decode(self, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        """Write the batch's latent KV, attend; return logits float [B, s_q, vocab]."""
        ...
