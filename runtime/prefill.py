"""Batched prefill: which prefill chunks of a step share a model call, and the PrefillBatch of a
call (runtime/models/protocol.py describes the layout: left padding to the longest chunk).

Padding costs compute (a padding column goes through every projection and MLP like a real
token) but no correctness, so the chunks are grouped to bound it: sorted longest first, a chunk
joins the current call while the call's padding stays within `max_padding` of its B x s_q
slots, else it opens the next call. A burst of similar prompts is one call; a 2000-token chunk
and thirty 20-token ones are two. The engine runs these calls and the simulator prices them
(CostModel.step_time's model_calls), from this one function.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence as Seq

import numpy as np
import torch

from kvpager import PAD_PAGE, slot_mapping
from kvpager.runtime.models.protocol import PrefillBatch


def group_chunks(lengths: Seq[int], max_padding: float | None) -> list[list[int]]:
    """Model calls for chunks of these lengths: lists of indices into `lengths`, each list
    longest first, the calls longest first. max_padding: the largest fraction of a call's
    B x s_q slots that may be padding (0: only equal lengths share a call); None: one call per
    chunk, in the given order (per-request prefill). O(n log n)."""
    if max_padding is None:
        return [[i] for i in range(len(lengths))]
    groups: list[list[int]] = []
    longest = padding = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if groups and padding + longest - n <= max_padding * longest * (len(groups[-1]) + 1):
            groups[-1].append(i)
            padding += longest - n
        else:
            groups.append([i])
            longest, padding = n, 0
    return groups


def padded_slots(lengths: Seq[int], groups: list[list[int]]) -> int:
    """Padding columns the calls compute: sum over calls of B * s_q - real tokens."""
    return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)


def build_prefill_batch(request_ids: list[str], tokens: list[list[int]], logits_rows: list[int],
                        block_table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int,
                        metadata: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
                        ) -> PrefillBatch:
    """The PrefillBatch of one call. tokens[b]: row b's chunk (its n_b token ids);
    block_table / cache_seqlens: the rows' tables (cache_seqlens = start_b + n_b), on the
    device; metadata(cache_seqlens, s_q): the engine's MLA metadata. Host work O(tokens); one
    H2D copy of the ids, then a few small device ops for positions and slots."""
    device = block_table.device
    lens = [len(t) for t in tokens]
    b, s_q, total = len(tokens), max(lens), sum(lens)
    flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=total)
    if total == b * s_q:
        ids = flat.reshape(b, s_q)
    else:  # the real columns of each row, row-major: the chunks in order
        ids = np.zeros((b, s_q), dtype=np.int64)
        ids[np.arange(s_q) >= s_q - np.array(lens)[:, None]] = flat
    positions = (cache_seqlens.long() - s_q)[:, None] + torch.arange(s_q, device=device)
    if total == b * s_q:  # no padding
        slots = slot_mapping(block_table, positions, page_size).view(-1)
    else:
        pad = positions < (cache_seqlens.long() - torch.tensor(lens, device=device))[:, None]
        positions = positions.masked_fill(pad, 0)
        slots = slot_mapping(block_table, positions, page_size)
        slots = slots.masked_fill(pad, PAD_PAGE * page_size).view(-1)
    return PrefillBatch(
        request_ids=request_ids, input_ids=torch.from_numpy(ids).to(device), positions=positions,
        slot_mapping=slots, block_table=block_table, cache_seqlens=cache_seqlens,
        mla_metadata=metadata(cache_seqlens, s_q), query_lens=lens,
        logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=device))
