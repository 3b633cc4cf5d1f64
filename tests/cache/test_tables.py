import random

import pytest
import torch

from kvpager import PAD_PAGE, BatchTables, BlockAllocator, Sequence
from kvpager.errors import InvalidArgument, SequenceTooLong


def check(tables_out, seqs, page_size=4):
    block_table, cache_seqlens = tables_out
    assert block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert block_table.shape[0] == cache_seqlens.shape[0] == len(seqs)
    for row, seq in enumerate(seqs):
        assert cache_seqlens[row] == seq.num_tokens
        assert block_table[row, :seq.num_pages].tolist() == seq.pages
        assert (block_table[row, seq.num_pages:] == PAD_PAGE).all()


@pytest.mark.parametrize("few_rows", [0, 10**6], ids=["vectorised", "per-row"])
def test_rows_follow_growth_join_leave_move(few_rows, monkeypatch):
    monkeypatch.setattr(BatchTables, "FEW_ROWS", few_rows)
    a = BlockAllocator(64)
    t = BatchTables(max_batch=6, max_pages=5, page_size=4)
    seqs = [Sequence(i, a, 4, 5) for i in range(4)]
    for i, s in enumerate(seqs):
        s.append(1 + 3 * i)
    check(t.update(seqs), seqs)
    for s in seqs:
        s.append(2)
    check(t.update(seqs), seqs)
    seqs[1].release()
    seqs = [seqs[0], seqs[2], seqs[3]]  # leave: rows move up
    check(t.update(seqs), seqs)
    seqs.insert(0, Sequence(9, a, 4, 5))  # join at the front
    seqs[0].append(17)
    check(t.update(seqs), seqs)
    fork = seqs[2].fork(10)
    fork.append(1)
    seqs.append(fork)
    check(t.update(seqs), seqs)
    check(t.update(seqs[::-1]), seqs[::-1])
    check(t.update([]), [])
    check(t.update(seqs[:2]), seqs[:2])


def test_returns_views_of_persistent_buffers():
    a = BlockAllocator(8)
    t = BatchTables(4, 4, page_size=4)
    s = Sequence(0, a, 4)
    s.append(2)
    bt1, cs1 = t.update([s])
    s.append(1)
    bt2, cs2 = t.update([s])
    assert bt1.data_ptr() == bt2.data_ptr() and cs1.data_ptr() == cs2.data_ptr()
    assert cs1.tolist() == [3]


def test_only_changed_rows_are_rewritten():
    a = BlockAllocator(64)
    t = BatchTables(8, 4, page_size=4)
    seqs = [Sequence(i, a, 4) for i in range(8)]
    for s in seqs:
        s.append(2)
    t.update(seqs)
    t._table[:, 1:] = -7  # sentinel in entries no sequence uses yet
    seqs[3].append(4)  # row 3 crosses a page boundary
    for s in seqs[:3] + seqs[4:]:
        s.append(1)
    bt, _ = t.update(seqs)
    assert bt[3, 1] == seqs[3].pages[1]
    assert (bt[[0, 1, 2, 4, 5, 6, 7], 1] == -7).all()


@pytest.mark.parametrize("few_rows", [0, 10**6], ids=["vectorised", "per-row"])
def test_errors_change_nothing(few_rows, monkeypatch):
    monkeypatch.setattr(BatchTables, "FEW_ROWS", few_rows)
    a = BlockAllocator(64)
    t = BatchTables(2, 2, page_size=4)
    seqs = [Sequence(i, a, 4) for i in range(3)]
    for s in seqs:
        s.append(5)
    t.update(seqs[:2])
    before = (t._table.copy(), t._lens.copy(), t._row_layout.copy())
    with pytest.raises(InvalidArgument, match="max_batch"):
        t.update(seqs)
    seqs[0].append(5)  # 10 tokens = 3 pages > max_pages
    with pytest.raises(SequenceTooLong, match="max_pages=2"):
        t.update(seqs[:2])
    wrong = Sequence(7, a, page_size=8)
    wrong.append(1)
    with pytest.raises(InvalidArgument, match="page_size"):
        t.update([seqs[1], wrong])
    after = (t._table, t._lens, t._row_layout)
    assert all((x == y).all() for x, y in zip(before, after))
    with pytest.raises(InvalidArgument):
        BatchTables(0, 4)


def test_last_token_slots():
    a = BlockAllocator(16)
    t = BatchTables(4, 4, page_size=4)
    seqs = [Sequence(i, a, 4) for i in range(3)]
    expected = []
    for i, s in enumerate(seqs):
        s.append(2 + 3 * i)
    for s in seqs:
        s.reserve(1)
        expected.append(int(s.slot_mapping(s.num_tokens - 1, s.num_tokens)))
    empty = Sequence(9, a, 4)
    t.update(seqs + [empty])
    assert t.last_token_slots().tolist() == expected + [-1]


@pytest.mark.parametrize("few_rows", [0, 4, 10**6], ids=["vectorised", "mixed", "per-row"])
def test_random_churn_matches_full_rebuild(few_rows, monkeypatch):
    monkeypatch.setattr(BatchTables, "FEW_ROWS", few_rows)
    rng = random.Random(1)
    a = BlockAllocator(4000)
    t = BatchTables(32, 16, page_size=4)
    seqs, next_id = [], 0
    for step in range(300):
        for s in list(seqs):
            if rng.random() < 0.05:
                seqs.remove(s)
                if rng.random() < 0.7:
                    s.release()
        while len(seqs) < 32 and rng.random() < 0.5:
            s = Sequence(next_id, a, 4, 16)
            next_id += 1
            s.append(rng.randint(0, 20))
            seqs.insert(rng.randint(0, len(seqs)), s)
        if seqs and rng.random() < 0.2:
            j = rng.randrange(len(seqs))
            if len(seqs) < 32:
                seqs.append(seqs[j].fork(next_id))
                next_id += 1
        if rng.random() < 0.1:
            rng.shuffle(seqs)
        for s in seqs:
            if s.num_tokens < 60:
                s.append(1)
            s.take_pending_copies()
        check(t.update(seqs), seqs)


# --- EventTables: the event path ------------------------------------------------------------
from kvpager import EventTables  # noqa: E402
from kvpager import table_events  # noqa: E402
from kvpager.errors import BatchFull, RowOutOfRange, TablesOutOfSync  # noqa: E402

# Every EventTables test runs on both paths: the C++ row events and the Python one.
PATHS = [pytest.param(False, id="python"),
         pytest.param(True, id="native", marks=pytest.mark.skipif(
             not table_events.NATIVE_AVAILABLE, reason="kvpager._row_events not built"))]


@pytest.fixture(params=PATHS)
def native(request):
    return request.param


def _events(native, n_seqs=3, tokens=(1, 4, 9)):
    a = BlockAllocator(64)
    t = EventTables(4, 5, page_size=4, native=native)
    assert t.native == native
    seqs = []
    for i, n in zip(range(n_seqs), tokens):
        s = Sequence(i, a, 4, 5)
        s.append(n)
        assert t.join(s) == i
        seqs.append(s)
    return a, t, seqs


def test_event_join_grow_leave_refresh(native):
    a, t, seqs = _events(native)
    check(t.view(), seqs)
    t.check(seqs)
    for _ in range(6):  # rows cross page boundaries at different steps
        for s in seqs:
            s.reserve(1)
        t.grow(1)
        check(t.view(), seqs)
    assert t.leave(0) == 2  # the last row moves into the gap
    seqs[0] = seqs.pop()
    check(t.view(), seqs)
    assert t.leave(1) is None
    seqs.pop()
    t.check(seqs)
    fork = seqs[0].fork(7)
    t.join(fork)
    seqs.append(fork)
    for s in seqs:
        s.reserve(1)  # seqs[0]'s partly filled last page is shared: copy-on-write
    t.grow(1)
    with pytest.raises(TablesOutOfSync):
        t.check(seqs)
    for row, s in enumerate(seqs):
        if s.take_pending_copies():
            t.refresh(row)
    t.check(seqs)
    seqs[1].reserve(2)  # one row grows by another amount than the batch
    t.refresh(1)
    t.check(seqs)
    check(t.update(seqs[::-1]), seqs[::-1])  # the fallback, then events again
    seqs.reverse()
    for s in seqs:
        s.reserve(2)
    t.grow(2)
    t.check(seqs)


def test_event_grow_writes_only_crossing_rows(native):
    _, t, seqs = _events(native, tokens=(3, 4, 2))
    t._table[:, 1:] = -7
    for s in seqs:
        s.reserve(1)
    t.grow(1)
    assert t._table[1, 1] == seqs[1].pages[1]
    assert (t._table[[0, 2], 1] == -7).all()


def test_event_errors_change_nothing(native):
    a, t, seqs = _events(native)
    state = lambda: (t._table.copy(), t._lens.copy(), t._pages.copy(), t._layouts.copy(),  # noqa
                     t._cap.copy(), [s.seq_id for s in t._seqs])
    before = state()
    for row in (3, -1, 10, 2**70):
        with pytest.raises(RowOutOfRange, match=f"row {row}"):
            t.leave(row)
        with pytest.raises(RowOutOfRange):
            t.refresh(row)
    wrong = Sequence(8, a, page_size=8)
    with pytest.raises(InvalidArgument, match="page_size"):
        t.join(wrong)
    big = Sequence(9, a, 4)
    big.append(21)  # 6 pages > max_pages=5
    with pytest.raises(SequenceTooLong, match="max_pages=5"):
        t.join(big)
    seqs[0].reserve(3)  # seqs[0] will cross with grow(4); seqs[2] has not reserved
    with pytest.raises(InvalidArgument, match="reserve"):
        t.grow(4)
    for n in (-1, 21, 2**70):  # beyond max_pages * page_size = 20
        with pytest.raises(InvalidArgument, match="max_pages"):
            t.grow(n)
    with pytest.raises(TypeError):
        t.leave(1.5)
    assert all(np_equal(x, y) for x, y in zip(before, state()))
    t.join(Sequence(10, a, 4))
    with pytest.raises(BatchFull, match="max_batch=4"):
        t.join(Sequence(11, a, 4))
    with pytest.raises(TablesOutOfSync):
        t.check(seqs)


def np_equal(x, y):
    return (x == y).all() if hasattr(x, "all") else x == y


def test_event_grow_too_long_changes_nothing(native):
    a = BlockAllocator(64)
    t = EventTables(2, 2, page_size=4, native=native)
    s = Sequence(0, a, 4)  # no max_pages of its own: the tables catch it
    s.append(8)
    t.join(s)
    lens = t._lens.copy()
    s.reserve(1)
    with pytest.raises(SequenceTooLong, match="max_pages=2"):
        t.grow(1)
    assert (t._lens == lens).all()


def test_event_native_true_without_the_module(monkeypatch):
    monkeypatch.setattr(table_events, "NATIVE_AVAILABLE", False)
    with pytest.raises(InvalidArgument, match="_row_events was not built"):
        EventTables(2, 2, page_size=4, native=True)
    assert not EventTables(2, 2, page_size=4).native  # native=None: the Python path


def test_event_page_ids_beyond_int32_go_to_the_python_path(native):
    """The C++ path takes only ids it can store; anything else is the Python path's to judge
    (here numpy raises on the overflow) and nothing changes."""
    a = BlockAllocator(8)
    t = EventTables(2, 2, page_size=4, native=native)
    s = Sequence(0, a, 4)
    s.append(2)
    s.pages[0] = 2**40
    with pytest.raises(OverflowError):
        t.join(s)
    assert t.batch_size == 0 and t._pages[0] == 0
