"""BatchTables / EventTables with CUDA buffers: after random churn, the device tensors equal the
host truth (only changed rows are copied, so a missed copy shows as a stale device row)."""
from __future__ import annotations

import random

import pytest
import torch

from kvpager import BatchTables, BlockAllocator, EventTables, Sequence
from kvpager import table_events

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PAGE, MAX_PAGES, MAX_BATCH = 64, 16, 48


def _truth(seqs):
    table = torch.zeros(len(seqs), MAX_PAGES, dtype=torch.int32)
    for row, seq in enumerate(seqs):
        table[row, :seq.num_pages] = torch.tensor(seq.pages, dtype=torch.int32)
    lens = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32)
    return table, lens


def _assert_matches(view, seqs):
    block_table, cache_seqlens = view
    assert block_table.is_cuda and cache_seqlens.is_cuda
    table, lens = _truth(seqs)
    assert torch.equal(cache_seqlens.cpu(), lens)
    for row, seq in enumerate(seqs):
        assert block_table[row, :seq.num_pages].cpu().tolist() == seq.pages, row


@pytest.mark.parametrize("max_batch", [MAX_BATCH, 7])  # odd: the packed int64 ids stay aligned
@pytest.mark.parametrize("native", [False, None] if table_events.NATIVE_AVAILABLE else [False])
def test_event_tables_on_cuda_follow_churn(native, max_batch):
    rng = random.Random(0)
    allocator = BlockAllocator(max_batch * MAX_PAGES + 8)
    tables = EventTables(max_batch, MAX_PAGES, "cuda", PAGE, native=native)
    seqs: list[Sequence] = []
    ids = iter(range(10**9))
    for step in range(400):
        for row in sorted((r for r in range(len(seqs)) if rng.random() < 0.05), reverse=True):
            seqs[row].release()
            tables.leave(row)
            last = seqs.pop()
            if row < len(seqs):
                seqs[row] = last
        while len(seqs) < max_batch and rng.random() < 0.5:
            seq = Sequence(next(ids), allocator, PAGE, MAX_PAGES)
            seq.append(rng.randint(1, 300))
            tables.join(seq)
            seqs.append(seq)
        long = [r for r, s in enumerate(seqs) if s.num_tokens + 4 > MAX_PAGES * PAGE]
        for row in reversed(long):  # finished: at the table's length limit
            seqs[row].release()
            tables.leave(row)
            last = seqs.pop()
            if row < len(seqs):
                seqs[row] = last
        n = rng.choice([1, 1, 1, 3])
        for seq in seqs:
            seq.reserve(n)
        tables.grow(n)
        if step % 7 == 0 or step > 390:
            _assert_matches(tables.view(), seqs)
        else:
            tables.view()
        if step % 50 == 0:  # the fallback in between keeps both copies of the tables in step
            _assert_matches(tables.update(seqs), seqs)
    rng.shuffle(seqs)
    _assert_matches(tables.update(seqs), seqs)


def test_batch_tables_on_cuda_follow_reorders():
    rng = random.Random(1)
    allocator = BlockAllocator(4096)
    tables = BatchTables(MAX_BATCH, MAX_PAGES, "cuda", PAGE)
    seqs = []
    for i in range(MAX_BATCH):
        seq = Sequence(i, allocator, PAGE, MAX_PAGES)
        seq.append(rng.randint(1, 500))
        seqs.append(seq)
    for _ in range(50):
        rng.shuffle(seqs)
        for seq in seqs:
            if seq.num_tokens + 7 <= MAX_PAGES * PAGE:
                seq.reserve(rng.choice([1, 7]))
        _assert_matches(tables.update(seqs), seqs)
