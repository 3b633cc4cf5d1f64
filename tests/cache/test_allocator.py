import numpy as np
import pytest

from kvpager import BlockAllocator
from kvpager.allocator import NULL_PAGE
from kvpager.errors import (DoubleFree, InvalidArgument, InvariantViolation, OutOfPages,
                            PageNotAllocated, RefcountUnderflow, UnknownPage)
from kvpager.block_table import PAD_PAGE


def state(a):
    return list(a._free), list(a._refs), bytes(a._cached), list(a._evictable)


def test_null_page_is_never_handed_out_and_num_pages_excludes_it():
    a = BlockAllocator(3)
    assert PAD_PAGE == NULL_PAGE == 0  # padded table entries point at the null page
    assert a.num_pages == a.num_free == 3
    assert sorted(a.allocate(3)) == [1, 2, 3]
    assert a.num_free == 0 and a.num_used == 3
    for call in (lambda: a.free([0]), lambda: a.incref([0]), lambda: a.refcount(0),
                 lambda: a.mark_cached(0)):
        with pytest.raises(UnknownPage, match="null page"):
            call()
    a.check_invariants({1: 1, 2: 1, 3: 1})


def test_allocate_free_roundtrip():
    a = BlockAllocator(4)
    pages = a.allocate(3)
    assert len(set(pages)) == 3 and a.num_free == 1 and a.num_used == 3
    assert all(a.refcount(p) == 1 for p in pages)
    a.check_invariants({p: 1 for p in pages})
    a.free(pages)
    assert a.num_free == 4
    a.check_invariants({})
    assert a.allocate(0) == []


def test_out_of_pages_changes_nothing():
    a = BlockAllocator(3)
    a.allocate(2)
    before = state(a)
    with pytest.raises(OutOfPages) as info:
        a.allocate(2)
    assert (info.value.requested, info.value.free) == (2, 1)
    assert "2 pages" in str(info.value) and state(a) == before
    assert a.can_allocate(1) and not a.can_allocate(2)


def test_refcounts_and_sharing():
    a = BlockAllocator(2)
    (p,) = a.allocate(1)
    a.incref([p, p])
    assert a.refcount(p) == 3
    a.free([p])
    a.free([p, p])
    assert a.refcount(p) == 0 and a.num_free == 2


@pytest.mark.parametrize("call,error", [
    (lambda a, p: a.free([p, 9]), UnknownPage),
    (lambda a, p: a.free([-1]), UnknownPage),
    (lambda a, p: a.free([0]), UnknownPage),
    (lambda a, p: a.free([True]), UnknownPage),
    (lambda a, p: a.free(["1"]), UnknownPage),
    (lambda a, p: a.free([p, p]), RefcountUnderflow),
    (lambda a, p: a.free([3 - p]), DoubleFree),
    (lambda a, p: a.free([p, 3 - p]), DoubleFree),
    (lambda a, p: a.incref([p, 3 - p]), PageNotAllocated),
    (lambda a, p: a.incref([7]), UnknownPage),
    (lambda a, p: a.refcount(3), UnknownPage),
    (lambda a, p: a.allocate(-1), InvalidArgument),
    (lambda a, p: a.mark_cached(3 - p), InvalidArgument),
])
def test_bad_calls_raise_typed_errors_and_change_nothing(call, error):
    a = BlockAllocator(2)
    (p,) = a.allocate(1)
    before = state(a)
    with pytest.raises(error):
        call(a, p)
    assert state(a) == before
    a.check_invariants({p: 1})


def evicted_log(a):
    log = []
    a.set_evict_callback(log.append)
    return log


def test_cached_pages_wait_at_refcount_zero_and_are_evicted_oldest_first_when_free_runs_out():
    a = BlockAllocator(4)
    log = evicted_log(a)
    p1, p2, p3 = a.allocate(3)
    for p in (p1, p2, p3):
        a.mark_cached(p)
    a.free([p1, p2])  # one sequence's pages, root first: the deeper p2 is queued first
    a.free([p3])
    assert a.evictable_pages() == [p2, p1, p3]
    assert a.num_free == 4 and a.num_used == 0 and a.num_evictable == 3
    a.check_invariants({})
    (fresh,) = a.allocate(1)  # the free page goes first: nothing evicted
    assert log == [] and fresh not in (p1, p2, p3)
    assert sorted(a.allocate(2)) == sorted([p1, p2]) and log == [p2, p1]
    assert not a.is_cached(p2) and a.evictable_pages() == [p3]
    a.check_invariants({fresh: 1, p2: 1, p1: 1})


def test_incref_revives_a_cached_page_and_double_free_leaves_the_queue_alone():
    a = BlockAllocator(3)
    evicted_log(a)
    p1, p2 = a.allocate(2)
    a.mark_cached(p1)
    a.mark_cached(p2)
    a.free([p1, p2])
    a.incref([p1])  # a prefix hit takes it back: out of the eviction queue
    assert a.refcount(p1) == 1 and a.evictable_pages() == [p2]
    before = state(a)
    for bad in ([p2], [p1, p1], [p1, p2]):
        with pytest.raises((DoubleFree, RefcountUnderflow)):
            a.free(bad)
        assert state(a) == before
    a.free([p1])  # released again: now the youngest
    assert a.evictable_pages() == [p2, p1]
    a.uncache(p2)  # the cache dropped its key: straight to the free stack
    assert a.evictable_pages() == [p1] and a.num_free == 3
    a.check_invariants({})


def test_out_of_pages_counts_evictable_pages_and_evicts_nothing():
    a = BlockAllocator(3)
    log = evicted_log(a)
    pages = a.allocate(2)
    a.mark_cached(pages[0])
    a.free(pages[:1])
    before = state(a)
    with pytest.raises(OutOfPages) as info:
        a.allocate(3)
    assert (info.value.requested, info.value.free) == (3, 2)
    assert state(a) == before and log == []


def test_one_cache_per_allocator():
    a = BlockAllocator(2)
    a.set_evict_callback(print)
    with pytest.raises(InvalidArgument, match="one cache"):
        a.set_evict_callback(print)


def test_numpy_ints_accepted():
    a = BlockAllocator(3)
    pages = a.allocate(2)
    a.free(np.array(pages))
    assert a.num_free == 3


def test_check_invariants_catches_corruption():
    a = BlockAllocator(3)
    pages = a.allocate(1)
    with pytest.raises(InvariantViolation):
        a.check_invariants({pages[0]: 2})
    a._free.append(a._free[0])
    with pytest.raises(InvariantViolation, match="more than once"):
        a.check_invariants()
    b = BlockAllocator(2)
    b._refs[1] = 1
    with pytest.raises(InvariantViolation, match="exactly one state"):
        b.check_invariants()
    c = BlockAllocator(2)
    c._refs[0] = 1
    with pytest.raises(InvariantViolation, match="null page"):
        c.check_invariants()
    d = BlockAllocator(2)
    d._cached[2] = 1
    with pytest.raises(InvariantViolation, match="contradicts"):
        d.check_invariants()


def test_constructor_rejects_empty():
    with pytest.raises(InvalidArgument):
        BlockAllocator(0)
