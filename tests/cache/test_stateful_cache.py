"""hypothesis state machine over allocator + sequences + pool + block tables.

Every token written gets a distinct value; after every step the allocator's invariants hold and
every live sequence reads its tokens back exactly, both through Sequence.pages and through the
rows BlockTables.rebuild wrote for it. (The table events' machine: test_table_events.py.)"""
from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvpager import BlockAllocator, BlockTables, CacheConfig, PagePool, Sequence
from kvpager.errors import OutOfPages, SequenceTooLong

PAGE, NUM_PAGES, MAX_PAGES, MAX_BATCH, LAYERS = 4, 24, 6, 6, 2


class CacheMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        config = CacheConfig(num_layers=LAYERS, num_pages=NUM_PAGES, page_size=PAGE,
                             allow_any_page_size=True, head_dim=2, head_dim_v=1, dtype="float32")
        self.pool = PagePool(config)
        self.allocator = BlockAllocator(NUM_PAGES)
        self.tables = BlockTables(MAX_BATCH, MAX_PAGES, page_size=PAGE)
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
        block_table, cache_seqlens = self.tables.rebuild(batch)
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
