"""BlockTables' events (join, append_pages, grow, leave) on both row paths, the C++ twin and the
Python one, and a hypothesis machine that drives one table of each with every event (bad ones
included) and compares their buffers bit for bit after every step."""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpager import BlockAllocator, BlockTables, Sequence, block_table
from kvpager.errors import (BatchFull, InvalidArgument, KVPagerError, NoSuchRow, OutOfPages,
                            SequenceTooLong, TablesOutOfSync)

PATHS = [pytest.param(False, id="python"),
         pytest.param(True, id="native", marks=pytest.mark.skipif(
             not block_table.NATIVE_AVAILABLE, reason="kvpager._block_table not built"))]


@pytest.fixture(params=PATHS)
def native(request):
    return request.param


def make(native, tokens=(1, 4, 9), max_batch=4, max_pages=5):
    a = BlockAllocator(64)
    t = BlockTables(max_batch, max_pages, page_size=4, native=native)
    assert t.native == native
    seqs = []
    for i, n in enumerate(tokens):
        s = Sequence(i, a, 4, max_pages)
        s.reserve(n)
        assert t.join(s, s.pages, s.num_tokens) == i
        seqs.append(s)
    return a, t, seqs


def step(t, seqs, n=1, one_by_one=False):
    """What a serving loop does each step: reserve, report new pages, grow."""
    for s in seqs:
        k = s.reserve(n)
        if k and s.take_pending_copies():  # copy-on-write: the last old entry changed too
            t.append_pages(s, s.pages[-k:], start=s.num_pages - k)
    new_pages = [(s, s.pages[held:]) for s, held in t.crossing(n)]
    if one_by_one:
        for s, ids in new_pages:
            t.append_pages(s, ids)
        new_pages = []
    t.grow(n, sum(s.num_tokens for s in seqs), new_pages)


def state(t):
    return (t._table.copy(), t._lens.copy(), t._pages.copy(), list(t.handles), t._total)


def same(x, y):
    return all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(x, y))


def test_join_grow_leave_follow_the_sequences(native):
    a, t, seqs = make(native)
    t.check(seqs)
    for i in range(6):  # rows cross page boundaries at different steps
        step(t, seqs, one_by_one=i % 2)
        t.check(seqs)
    block_table_, cache_seqlens = t.view()
    assert cache_seqlens.tolist() == [7, 10, 15]
    t.leave(seqs[0])  # the last row moves into the gap
    seqs[0] = seqs.pop()
    assert t.row(seqs[0]) == 0
    t.check(seqs)
    t.leave(seqs[1])
    seqs.pop()
    t.check(seqs)
    fork = seqs[0].fork(7)  # shares a partly filled last page: copy-on-write on growth
    t.join(fork, fork.pages, fork.num_tokens)
    seqs.append(fork)
    step(t, seqs, 2)
    t.check(seqs)


def test_grow_writes_only_rows_that_gained_pages(native):
    _, t, seqs = make(native, tokens=(3, 4, 2))
    t._table[:, 1:] = -7
    assert [(s.seq_id, held) for s, held in t.crossing(1)] == [(1, 1)]
    step(t, seqs)
    assert t._table[1, 1] == seqs[1].pages[1]
    assert (t._table[[0, 2], 1] == -7).all()


def test_grow_before_reserve_is_refused(native):
    """issue 12: growing the tables for tokens the sequences never reserved would desync
    cache_seqlens from them; the total a grow carries catches it, within a page too."""
    _, t, seqs = make(native, tokens=(1, 2, 3))
    before = state(t)
    with pytest.raises(TablesOutOfSync, match="reserve"):
        t.grow(1, sum(s.num_tokens for s in seqs))  # nobody reserved: the sum did not move
    assert same(before, state(t))
    seqs[0].reserve(3)  # crosses into a page the tables were not told about
    for s in seqs[1:]:
        s.reserve(3)
    with pytest.raises(InvalidArgument, match="new pages"):
        t.grow(3, sum(s.num_tokens for s in seqs))
    assert same(before, state(t))


def test_bad_events_change_nothing(native):
    a, t, seqs = make(native)
    before = state(t)
    stranger = Sequence(9, a, 4)
    stranger.reserve(21)  # 6 pages > max_pages=5
    for call, error in [
        (lambda: t.leave(stranger), NoSuchRow),
        (lambda: t.append_pages(stranger, [1]), NoSuchRow),
        (lambda: t.join(seqs[0], [1], 1), InvalidArgument),  # already in
        (lambda: t.join(stranger, stranger.pages, stranger.num_tokens), SequenceTooLong),
        (lambda: t.join(8, [1, 2], 9), InvalidArgument),  # 9 tokens > 2 pages
        (lambda: t.join(8, [1], -1), InvalidArgument),
        (lambda: t.join(8, [2**40], 1), InvalidArgument),
        (lambda: t.join(8, [-1], 1), InvalidArgument),
        (lambda: t.join(8, [1.5], 1), InvalidArgument),
        (lambda: t.append_pages(seqs[2], [5], start=4), InvalidArgument),  # past the pages held
        (lambda: t.append_pages(seqs[2], [5], start=0), InvalidArgument),  # 9 tokens > 1 page
        (lambda: t.append_pages(seqs[0], [1] * 5), SequenceTooLong),
        (lambda: t.grow(-1, 0), InvalidArgument),
        (lambda: t.grow(21, 0), InvalidArgument),
        (lambda: t.grow([1, 1], 0), InvalidArgument),  # per row: 3 rows
        (lambda: t.grow([1, -1, 1], 0), InvalidArgument),
        (lambda: t.grow(0, 14, [(seqs[0], [2**31])]), InvalidArgument),
        (lambda: t.grow(0, 14, [(seqs[0], [7]), (seqs[0], [8])]), InvalidArgument),
        (lambda: t.grow(0, 14, [(stranger, [7])]), NoSuchRow),
        (lambda: t.grow(0, 14, [(seqs[0], [7] * 5)]), SequenceTooLong),
        (lambda: t.grow([0, 0, 0], 14, [(seqs[0], [-7])]), InvalidArgument),
        (lambda: t.grow([9, 0, 0], 23, [(seqs[0], [7])]), InvalidArgument),  # 10 > 2 pages
        (lambda: t.grow(0, 14, [(seqs[0],)]), InvalidArgument),
        (lambda: t.grow(0, 14, [([], [7])]), NoSuchRow),  # unhashable: no row
        (lambda: t.grow(0, 14, [(seqs[0], 7)]), InvalidArgument),
    ]:
        with pytest.raises(error):
            call()
        assert same(before, state(t))
    t.join(10, [], 0)
    with pytest.raises(BatchFull, match="max_batch=4"):
        t.join(11, [], 0)


def test_per_row_growth(native):
    """MTP rows grow by different amounts: one call with n[r] per row."""
    _, t, seqs = make(native, tokens=(3, 4, 2))
    amounts = [2, 3, 0]
    for s, n in zip(seqs, amounts):
        s.reserve(n)
    assert [s.seq_id for s, _ in t.crossing(amounts)] == [0, 1]
    new_pages = [(s, s.pages[held:]) for s, held in t.crossing(amounts)]
    t.grow(amounts, sum(s.num_tokens for s in seqs), new_pages)
    t.check(seqs)


def test_rebuild_then_events(native):
    a, t, seqs = make(native)
    seqs.reverse()
    t.rebuild(seqs)
    t.check(seqs)
    step(t, seqs, 3)
    t.check(seqs)
    handles = ["x", "y", "z"]
    t.rebuild(seqs, handles)
    t.check(seqs, handles)
    assert t.row("y") == 1 and "x" in t and seqs[0] not in t


def test_native_true_without_the_module(monkeypatch):
    monkeypatch.setattr(block_table, "NATIVE_AVAILABLE", False)
    with pytest.raises(InvalidArgument, match="_block_table was not built"):
        BlockTables(2, 2, page_size=4, native=True)
    assert not BlockTables(2, 2, page_size=4).native  # native=None: the Python path


PAGE, MAX_PAGES, MAX_BATCH = 4, 6, 6


class TwinMachine(RuleBasedStateMachine):
    """Random joins (new or forked sequences), leaves, batch-wide and per-row growth (page
    crossings, copy-on-write), rebuilds and bad events. After every step the rows equal the
    sequences, and the C++ table (when built) and the Python one hold identical buffers."""

    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(64)
        self.tables = BlockTables(MAX_BATCH, MAX_PAGES, page_size=PAGE)
        self.twin = BlockTables(MAX_BATCH, MAX_PAGES, page_size=PAGE, native=False)
        self.batch: list[Sequence] = []
        self.next_id = 0

    def both(self, event, *args, **kwargs):
        """One event on both tables: the same result, or the same error type."""
        outcomes = []
        for tables in (self.tables, self.twin):
            try:
                result = getattr(tables, event)(*args, **kwargs)
                if event == "rebuild":  # (block_table, cache_seqlens) views
                    result = tuple(t.tolist() for t in result)
                outcomes.append(("ok", result))
            except Exception as exc:  # noqa: BLE001 - compared below
                outcomes.append(("error", type(exc)))
        assert outcomes[0] == outcomes[1], (event, args, outcomes)
        if outcomes[0][0] == "error":
            raise outcomes[0][1]("raised by both tables")
        return outcomes[0][1]

    def report(self, seq, k):
        """The pages reserve() said changed (copy-on-write included)."""
        self.both("append_pages", seq, seq.pages[-k:], start=seq.num_pages - k)

    @precondition(lambda self: len(self.batch) < MAX_BATCH)
    @rule(n=st.integers(0, 9), fork=st.booleans(), data=st.data())
    def join(self, n, fork, data):
        if fork and self.batch:
            seq = data.draw(st.sampled_from(self.batch)).fork(self.next_id)
        else:
            seq = Sequence(self.next_id, self.allocator, PAGE, MAX_PAGES)
            seq.reserve(n)
        self.next_id += 1
        assert self.both("join", seq, seq.pages, seq.num_tokens) == len(self.batch)
        self.batch.append(seq)

    @precondition(lambda self: self.batch)
    @rule(data=st.data())
    def leave(self, data):
        seq = data.draw(st.sampled_from(self.batch))
        seq.release()
        self.both("leave", seq)
        row = self.batch.index(seq)
        last = self.batch.pop()
        if row < len(self.batch):
            self.batch[row] = last

    @rule(data=st.data(), per_row=st.booleans())
    def grow(self, data, per_row):
        size = len(self.batch)
        amounts = data.draw(st.lists(st.integers(0, 5), min_size=size, max_size=size)
                            if per_row else st.integers(1, 5).map(lambda n: [n] * size))
        if any(s.num_tokens + n > MAX_PAGES * PAGE for s, n in zip(self.batch, amounts)) or sum(
                s.pages_needed(n) for s, n in zip(self.batch, amounts)) > self.allocator.num_free:
            return
        new_pages = []
        for s, n in zip(self.batch, amounts):
            k = s.reserve(n)
            if k and (s.take_pending_copies() or data.draw(st.booleans())):
                self.report(s, k)  # copy-on-write, or one append_pages event
            elif k:
                new_pages.append((s, s.pages[-k:]))  # with the grow
        n = amounts if per_row else (amounts[0] if amounts else 1)
        assert sorted(h.seq_id for h, _ in self.both("crossing", n)) == sorted(
            h.seq_id for h, _ in new_pages)
        self.both("grow", n, sum(s.num_tokens for s in self.batch), new_pages)

    @rule(data=st.data())
    def rebuild(self, data):
        self.batch = data.draw(st.permutations(self.batch))
        self.both("rebuild", self.batch)

    @rule(data=st.data(), event=st.sampled_from(["leave", "grow", "grow_total", "join_long",
                                                 "grow_unreported", "bad_ids"]))
    def bad_event(self, data, event):
        """Events that must fail: both tables raise the same KVPagerError, nothing changes."""
        before = self.buffers(self.tables)
        total = sum(s.num_tokens for s in self.batch)
        if event == "leave":
            event, args = "leave", (Sequence(-1, self.allocator),)
        elif event == "grow":
            args = (data.draw(st.sampled_from([-1, MAX_PAGES * PAGE + 1])), total)
        elif event == "grow_total":  # growth no sequence reserved
            if not self.batch:
                return
            event, args = "grow", (1, total)
        elif event == "join_long":
            if len(self.batch) == MAX_BATCH:
                return
            event, args = "join", (-2, list(range(MAX_PAGES + 1)), 1)
        elif event == "bad_ids":
            bad = [data.draw(st.sampled_from([-1, 2**31, 2**64, 0.5]))]
            if self.batch and data.draw(st.booleans()):  # new pages of a grow
                seq = data.draw(st.sampled_from(self.batch))
                event, args = "grow", (0, total, [(seq, bad)])
            elif len(self.batch) == MAX_BATCH:
                return
            else:
                event, args = "join", (-3, bad, 1)
        else:  # grow without reporting the pages: a row at a page boundary lacks its next one
            if not self.batch or not any(s.num_tokens % PAGE == 0 for s in self.batch):
                return
            event, args = "grow", (1, total + len(self.batch))
        with pytest.raises(KVPagerError):
            self.both(event, *args)
        assert all(np.array_equal(x, y) for x, y in zip(before, self.buffers(self.tables)))

    @staticmethod
    def buffers(tables):
        return (tables._table.copy(), tables._lens.copy(), tables._pages.copy(),
                tables._dirty.copy(), list(tables.handles), tables._total)

    @invariant()
    def tables_match_sequences(self):
        block_table_, cache_seqlens = self.tables.view()
        assert block_table_.shape[0] == cache_seqlens.shape[0] == len(self.batch)
        for row, seq in enumerate(self.batch):
            assert int(cache_seqlens[row]) == seq.num_tokens
            assert block_table_[row, :seq.num_pages].tolist() == seq.pages
        self.tables.check(self.batch)
        for mine, twin in zip(self.buffers(self.tables), self.buffers(self.twin)):
            assert np.array_equal(mine, twin)


TwinMachine.TestCase.settings = settings(stateful_step_count=40)
TestTwinMachine = TwinMachine.TestCase


def test_out_of_pages_is_the_sequences_business():
    """The tables never allocate: a sequence that cannot reserve raises, the tables unchanged."""
    a = BlockAllocator(1)
    t = BlockTables(2, 2, page_size=4)
    s = Sequence(0, a, 4)
    s.reserve(4)
    t.join(s, s.pages, s.num_tokens)
    with pytest.raises(OutOfPages):
        s.reserve(1)
    assert t.crossing(1) == [(s, 1)]
