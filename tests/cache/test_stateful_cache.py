"""hypothesis state machine over allocator + sequences + pool + batch tables.

Every token written gets a distinct value; after every step the allocator's invariants hold and
every live sequence reads its tokens back exactly, both through Sequence.pages and through the
rows BatchTables built for it."""
from collections import Counter

import numpy as np

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvpager import BatchTables, BlockAllocator, CacheConfig, EventTables, PagePool, Sequence
from kvpager.errors import KVPagerError, OutOfPages, SequenceTooLong

PAGE, NUM_PAGES, MAX_PAGES, MAX_BATCH, LAYERS = 4, 24, 6, 6, 2


class CacheMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        config = CacheConfig(num_layers=LAYERS, num_pages=NUM_PAGES, page_size=PAGE,
                             allow_any_page_size=True, head_dim=2, head_dim_v=1, dtype="float32")
        self.pool = PagePool(config)
        self.allocator = BlockAllocator(NUM_PAGES)
        self.tables = BatchTables(MAX_BATCH, MAX_PAGES, page_size=PAGE)
        self.tables.FEW_ROWS = 1  # one stale row: per-row path; more: the vectorised one
        self.live: dict[int, Sequence] = {}
        self.values: dict[int, list[float]] = {}  # seq id -> value of each token
        self.next_id = 0
        self.next_value = 1.0

    def _grow(self, seq: Sequence, n: int) -> None:
        before = (list(seq.pages), seq.num_tokens, self.allocator.num_free)
        needed = seq.pages_needed(n)
        try:
            slots = seq.append(n)
        except (OutOfPages, SequenceTooLong) as exc:
            assert (list(seq.pages), seq.num_tokens, self.allocator.num_free) == before
            if isinstance(exc, OutOfPages):
                assert exc.requested == needed > self.allocator.num_free
            return
        assert self.allocator.num_free == before[2] - needed
        copies = seq.take_pending_copies()
        if copies:
            self.pool.copy_pages([s for s, _ in copies], [d for _, d in copies])
        values = torch.arange(self.next_value, self.next_value + n)
        self.next_value += n
        for layer in range(LAYERS):
            latent = torch.stack([values + 1000 * layer, -values], dim=1)
            self.pool.write(layer, slots, latent)
        self.values[seq.seq_id] += values.tolist()

    @rule(target=seqs, n=st.integers(0, 10))
    def create(self, n):
        seq = Sequence(self.next_id, self.allocator, PAGE, MAX_PAGES)
        self.next_id += 1
        self.live[seq.seq_id], self.values[seq.seq_id] = seq, []
        self._grow(seq, n)
        return seq

    @rule(seq=seqs, n=st.integers(0, 6))
    def grow(self, seq, n):
        if seq.seq_id in self.live:
            self._grow(seq, n)

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq.seq_id not in self.live:
            return seq
        child = seq.fork(self.next_id)
        self.next_id += 1
        self.live[child.seq_id] = child
        self.values[child.seq_id] = list(self.values[seq.seq_id])
        return child

    @rule(seq=consumes(seqs))
    def release(self, seq):
        if seq.seq_id in self.live:
            seq.release()
            del self.live[seq.seq_id]
            assert seq.pages == [] and seq.num_tokens == 0

    @rule(data=st.data())
    def rebuild_tables(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True,
                                 max_size=MAX_BATCH) if self.live else st.just([]))
        batch = [self.live[i] for i in ids]
        block_table, cache_seqlens = self.tables.update(batch)
        for row, seq in enumerate(batch):
            n = int(cache_seqlens[row])
            assert n == seq.num_tokens
            pages = block_table[row, :seq.num_pages].long()
            pos = torch.arange(n)
            slots = pages[pos // PAGE] * PAGE + pos % PAGE
            got = self.pool.kv[0].view(-1, 2)[slots, 0]
            assert got.tolist() == self.values[seq.seq_id]

    @invariant()
    def allocator_consistent(self):
        refs = Counter(p for seq in self.live.values() for p in seq.pages)
        self.allocator.check_invariants(refs)
        assert self.allocator.num_used == len(refs)

    @invariant()
    def tokens_read_back(self):
        for seq in self.live.values():
            slots = seq.slot_mapping(0, seq.num_tokens) if seq.num_tokens else torch.empty(
                0, dtype=torch.int64)
            for layer in range(LAYERS):
                got = self.pool.kv[layer].view(-1, 2)[slots]
                want = torch.tensor(self.values[seq.seq_id])
                assert torch.equal(got[:, 0], want + 1000 * layer)
                assert torch.equal(got[:, 1], -want)


CacheMachine.TestCase.settings = settings(stateful_step_count=40)
TestCacheMachine = CacheMachine.TestCase


class EventTablesMachine(RuleBasedStateMachine):
    """EventTables driven by random joins (new or forked sequences), leaves, batch-wide grows
    (page crossings, copy-on-write), single-row growth, update() fallbacks and bad events; after
    every step the rows equal the ground truth from the sequences. Two tables take every event:
    the C++ path (when built) and the Python path; their buffers must stay identical, bit for
    bit, and they must fail alike."""

    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(64)
        self.tables = EventTables(MAX_BATCH, MAX_PAGES, page_size=PAGE)
        self.twin = EventTables(MAX_BATCH, MAX_PAGES, page_size=PAGE, native=False)
        self.batch: list[Sequence] = []
        self.next_id = 0

    def both(self, event, *args):
        """Apply one event to both tables: the same result, or the same error type."""
        outcomes = []
        for tables in (self.tables, self.twin):
            try:
                result = getattr(tables, event)(*args)
                if event == "update":  # (block_table, cache_seqlens) views
                    result = tuple(t.tolist() for t in result)
                outcomes.append(("ok", result))
            except Exception as exc:  # noqa: BLE001 - compared below
                outcomes.append(("error", type(exc)))
        assert outcomes[0] == outcomes[1], (event, args, outcomes)
        if outcomes[0][0] == "error":
            raise outcomes[0][1]("raised by both tables")
        return outcomes[0][1]

    @rule(n=st.integers(0, 9), fork=st.booleans(), data=st.data())
    def join(self, n, fork, data):
        if len(self.batch) == MAX_BATCH:
            return
        if fork and self.batch:
            seq = data.draw(st.sampled_from(self.batch)).fork(self.next_id)
        else:
            seq = Sequence(self.next_id, self.allocator, PAGE, MAX_PAGES)
            seq.append(n)
        self.next_id += 1
        assert self.both("join", seq) == len(self.batch)
        self.batch.append(seq)

    @rule(data=st.data())
    def leave(self, data):
        if not self.batch:
            return
        row = data.draw(st.integers(0, len(self.batch) - 1))
        self.batch[row].release()
        moved = self.both("leave", row)
        last = self.batch.pop()
        assert moved == (len(self.batch) if row < len(self.batch) else None)
        if row < len(self.batch):
            self.batch[row] = last

    @rule(n=st.integers(1, 5))
    def grow_all(self, n):
        if any(s.num_tokens + n > MAX_PAGES * PAGE for s in self.batch) or sum(
                s.pages_needed(n) for s in self.batch) > self.allocator.num_free:
            return
        for s in self.batch:
            s.reserve(n)
        self.both("grow", n)
        for row, s in enumerate(self.batch):
            if s.take_pending_copies():
                self.both("refresh", row)

    @rule(data=st.data(), n=st.integers(1, 6))
    def grow_one(self, data, n):
        if not self.batch:
            return
        row = data.draw(st.integers(0, len(self.batch) - 1))
        seq = self.batch[row]
        try:
            seq.reserve(n)
        except (OutOfPages, SequenceTooLong):
            return
        seq.take_pending_copies()
        self.both("refresh", row)

    @rule(data=st.data())
    def update_fallback(self, data):
        self.batch = data.draw(st.permutations(self.batch))
        self.both("update", self.batch)

    @rule(data=st.data(), event=st.sampled_from(["leave", "refresh", "grow", "join_long",
                                                 "grow_unreserved"]))
    def bad_event(self, data, event):
        """Events that must fail: both tables raise the same KVPagerError, nothing changes."""
        before = self.buffers(self.tables)
        if event in ("leave", "refresh"):
            args = (data.draw(st.sampled_from([-1, len(self.batch), MAX_BATCH + 3])),)
        elif event == "grow":
            args = (data.draw(st.sampled_from([-1, MAX_PAGES * PAGE + 1])),)
        elif event == "join_long":
            if len(self.batch) == MAX_BATCH:
                return
            seq = Sequence(self.next_id, self.allocator)  # no max_pages: the tables catch it
            self.next_id += 1
            try:
                seq.append(MAX_PAGES * PAGE + 1)
            except OutOfPages:
                return
            event, args = "join", (seq,)
        else:  # grow without reserve: a row at a page boundary lacks its next page
            if not any(s.num_tokens % PAGE == 0 for s in self.batch):
                return
            event, args = "grow", (1,)
        try:
            self.both(event, *args)
        except KVPagerError:
            pass
        else:
            raise AssertionError(f"{event}{args} should have failed")
        finally:
            if event == "join":
                args[0].release()
        after = self.buffers(self.tables)
        assert all(np.array_equal(x, y) for x, y in zip(before, after)), event

    @staticmethod
    def buffers(tables):
        return (tables._table.copy(), tables._lens.copy(), tables._cap.copy(),
                tables._pages.copy(), tables._layouts.copy(), len(tables._seqs))

    @invariant()
    def tables_match_sequences(self):
        block_table, cache_seqlens = self.tables.view()
        assert block_table.shape[0] == cache_seqlens.shape[0] == len(self.batch)
        for row, seq in enumerate(self.batch):
            assert int(cache_seqlens[row]) == seq.num_tokens
            assert block_table[row, :seq.num_pages].tolist() == seq.pages
        self.tables.check(self.batch)
        for mine, twin in zip(self.buffers(self.tables), self.buffers(self.twin)):
            assert np.array_equal(mine, twin)
        assert np.array_equal(self.tables._dirty, self.twin._dirty)


EventTablesMachine.TestCase.settings = settings(stateful_step_count=40)
TestEventTablesMachine = EventTablesMachine.TestCase
