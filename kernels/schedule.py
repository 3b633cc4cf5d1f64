"""The split-KV tile scheduler, in PyTorch: the exact algorithm the CUDA metadata kernel
(kernels/csrc/metadata.cu) runs, used on CPU and as its test oracle.

Every sequence b costs `pages(b) + FIXED_OVERHEAD_PAGES` units (a segment's start-up and epilogue
cost about as much as a few pages). Sequences are laid end to end on one cost line, overhead
first; the line is cut into `num_parts` equal pieces of width W, one per CTA. Part q processes
every page whose position falls in [q*W, (q+1)*W). A sequence whose pages land in several parts
is split; its partial results are merged by the combine kernel. A sequence with no pages belongs
to the part holding its start, which writes out = 0, lse = +inf.

tile_scheduler_metadata: int32 [num_parts, METADATA_FIELDS], per part:
    [begin_b, begin_page, begin_split, end_b, end_page, 0, 0, 0]
  the part walks b = begin_b .. end_b (inclusive; empty when begin_b > end_b), pages
  [begin_page if b == begin_b else 0, end_page if b == end_b else pages(b)); begin_split is the
  index among b's splits of the first one (every later b starts at split 0).
num_splits: int32 [batch + 1], prefix sums of splits per sequence: b has
  num_splits[b+1] - num_splits[b] splits, stored at rows num_splits[b] + i of the workspace.
"""
from __future__ import annotations

import torch

PAGE_SIZE = 64
FIXED_OVERHEAD_PAGES = 5
METADATA_FIELDS = 8


def block_m_for(rows: int) -> int:
    """Query rows per CTA for `rows` = s_q * h_q // h_kv rows per (sequence, kv head)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def num_m_blocks(rows: int) -> int:
    block = block_m_for(rows)
    return (rows + block - 1) // block


def num_sm_parts(num_sms: int, rows: int, num_heads_k: int) -> int:
    """How many parts the batch's work is cut into so that parts x kv heads x row blocks ~ SMs."""
    return max(1, num_sms // (num_heads_k * num_m_blocks(rows)))


def plan(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised scheduler. cache_seqlens: int [batch] (any device). Returns
    (tile_scheduler_metadata int32 [num_parts, 8], num_splits int32 [batch + 1]) on that device."""
    device = cache_seqlens.device
    lens = cache_seqlens.to(torch.int64)
    batch = lens.numel()
    meta = torch.zeros(num_parts, METADATA_FIELDS, dtype=torch.int64, device=device)
    if batch == 0:
        meta[:, 3] = -1
        return meta.to(torch.int32), torch.zeros(1, dtype=torch.int32, device=device)
    pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    cost = pages + FIXED_OVERHEAD_PAGES
    start = torch.cumsum(cost, 0) - cost
    total = int(cost.sum())
    width = max(1, -(-total // num_parts))
    first_page_pos = start + FIXED_OVERHEAD_PAGES
    has_pages = pages > 0
    first = torch.where(has_pages, first_page_pos // width, start // width)
    last = torch.where(has_pages, (first_page_pos + pages - 1) // width, first)
    splits = last - first + 1
    num_splits = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(splits, 0)])

    q = torch.arange(num_parts, device=device)
    begin_b = torch.searchsorted(last.contiguous(), q, right=False)
    end_b = torch.searchsorted(first.contiguous(), q, right=True) - 1
    bb = begin_b.clamp(max=batch - 1)
    eb = end_b.clamp(min=0)
    begin_page = torch.where(has_pages[bb], (q * width - first_page_pos[bb]).clamp(min=0), 0)
    end_page = torch.where(
        has_pages[eb], torch.minimum(pages[eb], (q + 1) * width - first_page_pos[eb]), 0
    )
    meta[:, 0] = begin_b
    meta[:, 1] = begin_page
    meta[:, 2] = q - first[bb]
    meta[:, 3] = end_b
    meta[:, 4] = end_page
    empty = begin_b > end_b
    meta[empty, 1:3] = 0
    meta[empty, 4] = 0
    return meta.to(torch.int32), num_splits.to(torch.int32)
