import pytest
import torch

from kvpager import BlockAllocator, Sequence
from kvpager.errors import InvalidArgument, OutOfPages, SequenceTooLong


def snapshot(seq):
    a = seq.allocator
    return (list(seq.pages), seq.num_tokens, seq._room, list(seq._pending), list(a._free),
            list(a._refs))


def test_append_allocates_at_page_boundaries():
    a = BlockAllocator(8)
    s = Sequence("a", a, page_size=4)
    slots = s.append(3)
    assert s.num_pages == 1 and s.num_tokens == 3
    assert slots.dtype == torch.int64 and slots.tolist() == [s.pages[0] * 4 + i for i in range(3)]
    assert s.append(1).tolist() == [s.pages[0] * 4 + 3]
    assert s.num_pages == 1
    slots = s.append(6)
    assert s.num_pages == 3
    p = s.pages
    assert slots.tolist() == [p[1] * 4 + i for i in range(4)] + [p[2] * 4, p[2] * 4 + 1]
    assert s.append(0).numel() == 0
    assert s.pages_needed(2) == 0 and s.pages_needed(3) == 1 and s.pages_needed(0) == 0


def test_slot_mapping_matches_append():
    a = BlockAllocator(8)
    s = Sequence(0, a, page_size=4)
    first = s.append(9)
    assert torch.equal(s.slot_mapping(0, 9), first)
    with pytest.raises(InvalidArgument):
        s.slot_mapping(3, 10)


def test_out_of_pages_changes_nothing():
    a = BlockAllocator(2)
    s = Sequence(0, a, page_size=4)
    s.append(5)
    before = snapshot(s)
    with pytest.raises(OutOfPages) as info:
        s.append(4)
    assert (info.value.requested, info.value.free) == (1, 0)
    assert snapshot(s) == before


def test_too_long_changes_nothing():
    a = BlockAllocator(10)
    s = Sequence(0, a, page_size=4, max_pages=2)
    s.append(6)
    before = snapshot(s)
    with pytest.raises(SequenceTooLong, match="max_pages"):
        s.append(3)
    assert snapshot(s) == before
    s.append(2)
    assert s.num_tokens == 8


@pytest.mark.parametrize("n", [-1, 1.5, "3"])
def test_bad_counts(n):
    s = Sequence(0, BlockAllocator(2))
    with pytest.raises(InvalidArgument):
        s.append(n)
    with pytest.raises(InvalidArgument):
        s.pages_needed(n)


def test_fork_shares_pages_and_cow_copies_last_partial_page():
    a = BlockAllocator(8)
    parent = Sequence("p", a, page_size=4)
    parent.append(6)
    child = parent.fork("c")
    assert child.pages == parent.pages and child.num_tokens == 6
    assert all(a.refcount(p) == 2 for p in parent.pages)
    shared_full, shared_last = parent.pages
    assert child.pages_needed(1) == 1  # the copy of the shared partial page
    slots = child.append(1)
    assert child.pages[0] == shared_full and child.pages[1] != shared_last
    assert slots.tolist() == [child.pages[1] * 4 + 2]
    # The source stays referenced until the caller takes the copy list.
    assert a.refcount(shared_last) == 2
    assert child.take_pending_copies() == [(shared_last, child.pages[1])]
    assert a.refcount(shared_last) == 1 and child.take_pending_copies() == []
    # The parent now owns its last page alone: no copy.
    assert parent.pages_needed(1) == 0
    parent.append(1)
    assert parent.pages[1] == shared_last and parent.take_pending_copies() == []
    a.check_invariants({shared_full: 2, shared_last: 1, child.pages[1]: 1})


def test_fork_at_page_boundary_needs_no_copy():
    a = BlockAllocator(8)
    parent = Sequence(0, a, page_size=4)
    parent.append(4)
    child = parent.fork(1)
    assert child.pages_needed(1) == 1
    child.append(1)
    assert child.take_pending_copies() == [] and child.pages[0] == parent.pages[0]


def test_cow_out_of_pages_changes_nothing():
    a = BlockAllocator(1)
    parent = Sequence(0, a, page_size=4)
    parent.append(2)
    child = parent.fork(1)
    before = snapshot(child)
    with pytest.raises(OutOfPages):
        child.append(1)
    assert snapshot(child) == before


def test_release_returns_pages_and_pending_sources():
    a = BlockAllocator(4)
    s = Sequence(0, a, page_size=4)
    s.append(3)
    c = s.fork(1)
    c.append(1)  # pending copy holds the shared page
    s.release()
    assert a.num_used == 2  # c's new page + the pending source
    c.release()
    assert a.num_free == 4 and c.pages == [] and c.num_tokens == 0
    a.check_invariants({})
    c.append(1)  # a released sequence can start over
    assert c.num_tokens == 1


def test_reserve_reports_the_page_entries_it_changed():
    """reserve() returns k: pages[-k:] are new (the event BlockTables.append_pages takes)."""
    a = BlockAllocator(8)
    s = Sequence(0, a, page_size=4)
    assert s.reserve(3) == 1 and s.reserve(1) == 0  # within the page: the fast path
    assert s.reserve(5) == 2 and s.num_pages == 3 and s.num_tokens == 9
    c = s.fork(1)
    assert c.reserve(1) == 1 and c.pages[:2] == s.pages[:2] and c.pages[2] != s.pages[2]
    c.take_pending_copies()
    assert s.reserve(1) == 0  # the copy left the parent alone on its last page


def test_fast_path_never_writes_a_shared_page():
    """After fork() the parent's next token needs a copy, not the fast path."""
    a = BlockAllocator(8)
    s = Sequence(0, a, page_size=4)
    s.reserve(2)
    c = s.fork(1)
    last = s.pages[-1]
    assert s.reserve(1) == 1 and s.pages[-1] != last
    assert s.take_pending_copies() == [(last, s.pages[-1])]
    assert c.reserve(1) == 0 and c.pages[-1] == last  # c holds `last` alone now


@pytest.mark.parametrize("n", [-1, 1.5, "3", None])
def test_reserve_rejects_bad_counts_with_nothing_changed(n):
    s = Sequence(0, BlockAllocator(2), page_size=4)
    s.reserve(2)
    before = snapshot(s)
    with pytest.raises(InvalidArgument):
        s.reserve(n)
    assert snapshot(s) == before


def test_reserve_to_grows_to_a_total():
    s = Sequence(0, BlockAllocator(4), page_size=4)
    assert s.reserve_to(3) == 1 and s.reserve_to(3) == 0 and s.reserve_to(5) == 1
    before = snapshot(s)
    for bad in (4, 2.0, "6", None):  # shrinking, or not an int
        with pytest.raises(InvalidArgument):
            s.reserve_to(bad)
    assert snapshot(s) == before
