"""BlockTables with CUDA buffers: after random churn, the device tensors equal the host truth
(only changed rows are copied, so a missed copy shows as a stale device row)."""
from __future__ import annotations

import random

import pytest
import torch

from kvpager import BlockAllocator, BlockTables, Sequence, block_table

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PAGE, MAX_PAGES, MAX_BATCH = 64, 16, 48


def _assert_matches(view, seqs):
    block_table_, cache_seqlens = view
    assert block_table_.is_cuda and cache_seqlens.is_cuda
    assert block_table_.shape[0] == cache_seqlens.shape[0] == len(seqs)
    assert cache_seqlens.cpu().tolist() == [s.num_tokens for s in seqs]
    for row, seq in enumerate(seqs):
        assert block_table_[row, :seq.num_pages].cpu().tolist() == seq.pages, row


def _leave(tables, seqs, row):
    """Release seqs[row] and mirror BlockTables' rule: the last row moves into the gap."""
    seqs[row].release()
    tables.leave(seqs[row])
    last = seqs.pop()
    if row < len(seqs):
        seqs[row] = last


@pytest.mark.parametrize("max_batch", [MAX_BATCH, 7])  # odd: the packed int64 ids stay aligned
@pytest.mark.parametrize("native", [False, None] if block_table.NATIVE_AVAILABLE else [False])
def test_block_tables_on_cuda_follow_churn(native, max_batch):
    rng = random.Random(0)
    allocator = BlockAllocator(max_batch * MAX_PAGES + 8)
    tables = BlockTables(max_batch, MAX_PAGES, "cuda", PAGE, native=native)
    seqs: list[Sequence] = []
    ids = iter(range(10**9))
    for step in range(400):
        for row in sorted((r for r in range(len(seqs)) if rng.random() < 0.05), reverse=True):
            _leave(tables, seqs, row)
        while len(seqs) < max_batch and rng.random() < 0.5:
            seq = Sequence(next(ids), allocator, PAGE, MAX_PAGES)
            seq.reserve(rng.randint(1, 300))
            tables.join(seq, seq.pages, seq.num_tokens)
            seqs.append(seq)
        for row in reversed([r for r, s in enumerate(seqs) if s.num_tokens + 4 > MAX_PAGES * PAGE]):
            _leave(tables, seqs, row)  # finished: at the table's length limit
        n = rng.choice([1, 1, 1, 3])
        for seq in seqs:
            seq.reserve(n)
        if step % 2:
            new_pages = [(s, s.pages[held:]) for s, held in tables.crossing(n)]
        else:  # the same pages, one append_pages event each
            for seq, held in tables.crossing(n):
                tables.append_pages(seq, seq.pages[held:])
            new_pages = []
        tables.grow(n, sum(s.num_tokens for s in seqs), new_pages)
        if step % 7 == 0 or step > 390:
            _assert_matches(tables.view(), seqs)
        else:
            tables.view()
        if step % 50 == 0:  # a rebuild in between keeps both copies of the tables in step
            _assert_matches(tables.rebuild(seqs), seqs)
    rng.shuffle(seqs)
    _assert_matches(tables.rebuild(seqs), seqs)


def test_rebuild_on_cuda_follows_reorders():
    rng = random.Random(1)
    allocator = BlockAllocator(4096)
    tables = BlockTables(MAX_BATCH, MAX_PAGES, "cuda", PAGE)
    seqs = []
    for i in range(MAX_BATCH):
        seq = Sequence(i, allocator, PAGE, MAX_PAGES)
        seq.reserve(rng.randint(1, 500))
        seqs.append(seq)
    for _ in range(50):
        rng.shuffle(seqs)
        for seq in seqs:
            if seq.num_tokens + 7 <= MAX_PAGES * PAGE:
                seq.reserve(rng.choice([1, 7]))
        _assert_matches(tables.rebuild(seqs), seqs)
