"""BlockTables' plain path (rebuild from sequences), its views and slot_mapping."""
import pytest
import torch

from kvpager import PAD_PAGE, BlockAllocator, BlockTables, Sequence, slot_mapping
from kvpager.errors import InvalidArgument, SequenceTooLong


def check(tables_out, seqs):
    block_table, cache_seqlens = tables_out
    assert block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert block_table.shape[0] == cache_seqlens.shape[0] == len(seqs)
    for row, seq in enumerate(seqs):
        assert cache_seqlens[row] == seq.num_tokens
        assert block_table[row, :seq.num_pages].tolist() == seq.pages
        assert (block_table[row, seq.num_pages:] == PAD_PAGE).all()


def test_rebuild_follows_growth_reorders_and_shrinking_batches():
    a = BlockAllocator(64)
    t = BlockTables(max_batch=6, max_pages=5, page_size=4)
    seqs = [Sequence(i, a, 4, 5) for i in range(4)]
    for i, s in enumerate(seqs):
        s.append(1 + 3 * i)
    check(t.rebuild(seqs), seqs)
    for s in seqs:
        s.append(2)
    check(t.rebuild(seqs), seqs)
    seqs[1].release()
    seqs = [seqs[0], seqs[2], seqs[3]]
    check(t.rebuild(seqs), seqs)  # a longer row's entries past the new one's pages are padded
    fork = seqs[2].fork(10)
    fork.append(1)
    seqs.append(fork)
    check(t.rebuild(seqs[::-1]), seqs[::-1])
    check(t.rebuild([]), [])


def test_views_share_persistent_buffers():
    a = BlockAllocator(8)
    t = BlockTables(4, 4, page_size=4)
    s = Sequence(0, a, 4)
    s.append(2)
    bt1, cs1 = t.rebuild([s])
    s.append(1)
    bt2, cs2 = t.rebuild([s])
    assert bt1.data_ptr() == bt2.data_ptr() and cs1.data_ptr() == cs2.data_ptr()
    assert cs1.tolist() == [3]


def test_rebuild_errors_change_nothing():
    a = BlockAllocator(64)
    t = BlockTables(2, 2, page_size=4)
    seqs = [Sequence(i, a, 4) for i in range(3)]
    for s in seqs:
        s.append(5)
    t.rebuild(seqs[:2])
    before = (t._table.copy(), t._lens.copy(), list(t.handles))
    with pytest.raises(InvalidArgument, match="max_batch"):
        t.rebuild(seqs)
    seqs[0].append(5)  # 10 tokens = 3 pages > max_pages
    with pytest.raises(SequenceTooLong, match="max_pages=2"):
        t.rebuild(seqs[:2])
    wrong = Sequence(7, a, page_size=8)
    wrong.append(1)
    with pytest.raises(InvalidArgument, match="page_size"):
        t.rebuild([seqs[1], wrong])
    with pytest.raises(InvalidArgument, match="distinct handles"):
        t.rebuild(seqs[1:], ["h", "h"])
    assert (t._table == before[0]).all() and (t._lens == before[1]).all()
    assert t.handles == before[2]
    for bad in (0, -1):
        with pytest.raises(InvalidArgument):
            BlockTables(bad, 4)
    with pytest.raises(InvalidArgument, match="int32"):
        BlockTables(1, 2**26, page_size=64)


def test_slot_mapping_from_the_table_equals_the_sequences():
    a = BlockAllocator(16)
    t = BlockTables(4, 4, page_size=4)
    seqs = [Sequence(i, a, 4) for i in range(3)]
    for i, s in enumerate(seqs):
        s.append(2 + 3 * i)
    block_table, cache_seqlens = t.rebuild(seqs)
    last = (cache_seqlens.long() - 1)[:, None]
    assert slot_mapping(block_table, last, 4).view(-1).tolist() == [
        int(s.slot_mapping(s.num_tokens - 1, s.num_tokens)) for s in seqs]
    positions = torch.arange(8)[None]
    assert torch.equal(slot_mapping(block_table[2:], positions, 4)[0], seqs[2].slot_mapping(0, 8))
