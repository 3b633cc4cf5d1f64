import numpy as np
import pytest

from kvpager import BlockAllocator
from kvpager.errors import (DoubleFree, InvalidArgument, InvariantViolation, OutOfPages,
                            PageNotAllocated, RefcountUnderflow, UnknownPage)


def state(a):
    return list(a._free), list(a._refs)


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
    (lambda a, p: a.free([True]), UnknownPage),
    (lambda a, p: a.free(["0"]), UnknownPage),
    (lambda a, p: a.free([p, p]), RefcountUnderflow),
    (lambda a, p: a.free([1 - p]), DoubleFree),
    (lambda a, p: a.free([p, 1 - p]), DoubleFree),
    (lambda a, p: a.incref([p, 1 - p]), PageNotAllocated),
    (lambda a, p: a.incref([7]), UnknownPage),
    (lambda a, p: a.refcount(2), UnknownPage),
    (lambda a, p: a.allocate(-1), InvalidArgument),
])
def test_bad_calls_raise_typed_errors_and_change_nothing(call, error):
    a = BlockAllocator(2)
    (p,) = a.allocate(1)
    before = state(a)
    with pytest.raises(error):
        call(a, p)
    assert state(a) == before
    a.check_invariants({p: 1})


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
    b._refs[0] = 1
    with pytest.raises(InvariantViolation, match="free xor"):
        b.check_invariants()


def test_constructor_rejects_empty():
    with pytest.raises(InvalidArgument):
        BlockAllocator(0)
