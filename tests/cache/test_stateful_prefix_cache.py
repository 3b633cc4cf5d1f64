"""hypothesis state machine over BlockAllocator + PrefixCache + Sequence.

Requests arrive with prompts that share, extend or abandon earlier ones (a 3-token alphabet and
4-token pages, so full and mid-page matches are common), take their hit, compute in chunks,
generate, fork, commit, finish or are abandoned mid-prefill, while "pressure" takes pages away
(evicting cached ones). The test keeps its own model of what every slot holds: the extra keys
and all token ids up to that slot (the KV of a token depends on every token before it). After
every step:
  - page states partition the pool and refcounts equal the references the test holds;
  - every cached page holds, slot by slot, exactly the tokens its key path spells;
  - every live request reads exactly its own tokens;
  - a hit is the longest cached prefix (brute force over the cache's entries);
and always: no referenced page is evicted, handed out again or written while shared."""
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvpager import BlockAllocator, Sequence
from kvpager.errors import InvalidArgument, OutOfPages, SequenceTooLong, StaleHit
from kvpager.prefix_cache import PrefixCache
from kvpager.prefix_keys import PrefixKeys

PS, NUM_PAGES, MAX_PAGES = 4, 12, 6
TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=9)
EXTRA = st.sampled_from([(), ("lora",)])


class Req:
    def __init__(self, seq, keys, tokens, written, extra):
        self.seq, self.keys, self.tokens, self.written, self.extra = seq, keys, tokens, written, extra


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(NUM_PAGES)
        self.cache = PrefixCache(self.allocator, PS)
        inner = self.allocator._on_evict

        def watched(page):
            assert page not in self.holders(), f"evicted page {page}, which is referenced"
            inner(page)

        self.allocator._on_evict = watched
        self.slots: dict[int, list] = {}  # page -> what each slot holds (None: never written)
        self.live: list[Req] = []
        self.history: list[tuple[tuple, list[int]]] = []  # (extra, tokens) of past requests
        self.hogs: list[int] = []  # pages taken by memory pressure
        self.next_id = 0

    # -- model helpers ----------------------------------------------------------------------
    def holders(self) -> Counter:
        refs = Counter(self.hogs)
        for req in self.live:
            refs.update(req.seq.pages)
        return refs

    def taken(self, before: Counter, pages) -> None:
        """pages were just allocated: none may have been referenced before."""
        for page in pages:
            assert page not in before, f"page {page} handed out while referenced"
            self.slots[page] = [None] * PS  # fresh: whatever it held is gone

    def apply_copies(self, seq) -> None:
        for src, dst in seq.take_pending_copies():
            self.slots[dst] = list(self.slots[src])

    def expected_match(self, extra, tokens) -> int:
        """The longest cached prefix, by brute force over every cached page's token path."""
        limit, best = len(tokens) - 1, 0
        for ex, path, _ in self.cache.entries():
            start = len(path) - PS  # tokens of the pages before this one
            if ex != extra or start > limit or list(path[:start]) != tokens[:start]:
                continue
            k = 0
            while k < PS and start + k < limit and path[start + k] == tokens[start + k]:
                k += 1
            best = max(best, start + k)
        return best

    # -- rules ------------------------------------------------------------------------------
    @rule(data=st.data(), fresh=TOKENS, extra=EXTRA, chunk=st.integers(0, 24),
          lookup=st.integers(0, 3))
    def admit(self, data, fresh, extra, chunk, lookup):
        """A new request: a cut of an earlier or running request's tokens (a shared prefix),
        extended; like the scheduler, it computes a first chunk at once. lookup == 0: it was
        admitted before the request it shares with committed anything (no hit), so both
        compute the same pages and the cache keeps one copy."""
        prefix = []
        others = self.history + [(r.extra, r.tokens) for r in self.live]
        if others and data.draw(st.integers(0, 3)):
            extra, old = data.draw(st.sampled_from(others))
            prefix = old[:data.draw(st.integers(len(old) // 2, len(old)))]
        tokens = (prefix + fresh)[:MAX_PAGES * PS]
        if not tokens:
            return
        keys = PrefixKeys(tokens, extra, PS)
        if not lookup:
            self.live.append(Req(Sequence(self.next_id, self.allocator, PS, MAX_PAGES), keys,
                                 tokens, 0, extra))
            self.next_id += 1
            self.write(self.live[-1], chunk, [], True)
            return
        hit = self.cache.match(keys)
        assert hit.num_tokens == self.expected_match(extra, tokens) < len(tokens)
        needed = hit.pages_needed(hit.num_tokens)
        free, before = self.allocator.num_free, self.holders()
        self.cache.acquire(keys, hit)
        try:
            seq = Sequence.from_prefix(self.next_id, self.allocator, hit, PS, MAX_PAGES)
        except OutOfPages:
            self.cache.release(hit)
            return
        assert free - self.allocator.num_free == needed
        self.next_id += 1
        self.taken(before, seq.pages[len(hit.pages):])
        self.apply_copies(seq)
        self.live.append(Req(seq, keys, tokens, hit.num_tokens, extra))
        if chunk:
            self.write(self.live[-1], chunk, [], True)

    @rule(data=st.data(), n=st.integers(1, 12), generated=TOKENS, commit=st.booleans())
    def compute(self, data, n, generated, commit):
        """Write the next n tokens of a request (prompt chunks first, then generated ones) and,
        like the engine, commit the pages they fill (or leave them for the commit rule)."""
        if self.live:
            self.write(data.draw(st.sampled_from(self.live)), n, generated, commit)

    def write(self, req, n, generated, commit):
        seq, n = req.seq, min(n, len(req.tokens) - req.written)
        if n == 0:  # prompt done: generate
            if not generated:
                return
            req.keys.append(generated)
            req.tokens += generated
            n = len(generated)
        old, before = list(seq.pages), self.holders()
        try:
            seq.append(n)
        except (OutOfPages, SequenceTooLong):
            assert seq.pages == old and seq.num_tokens == req.written
            return
        self.taken(before, [p for p in seq.pages if p not in old])
        self.apply_copies(seq)
        for pos in range(req.written, req.written + n):
            page = seq.pages[pos // PS]
            assert self.allocator.refcount(page) == 1 and not self.allocator.is_cached(page), \
                f"writing token {pos} into shared or cached page {page}"
            self.slots[page][pos % PS] = (req.extra, tuple(req.tokens[:pos + 1]))
        req.written += n
        if commit:
            self.cache.commit(seq, req.keys, req.written)

    @rule(data=st.data())
    def commit(self, data):
        if self.live:
            req = data.draw(st.sampled_from(self.live))
            self.cache.commit(req.seq, req.keys, req.written)

    @rule(data=st.data())
    def fork(self, data):
        if not self.live:
            return
        req = data.draw(st.sampled_from(self.live))
        child = req.seq.fork(self.next_id)
        self.next_id += 1
        self.live.append(Req(child, req.keys.copy(), list(req.tokens), req.written, req.extra))

    @rule(data=st.data())
    def finish(self, data):
        """Finish, or abandon mid-prefill: its cached pages stay at refcount 0."""
        if not self.live:
            return
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        req.seq.release()
        self.history.append((req.extra, req.tokens))

    @rule(n=st.integers(1, NUM_PAGES))
    def pressure(self, n):
        n = min(n, self.allocator.num_free)
        before = self.holders()
        pages = self.allocator.allocate(n)
        self.taken(before, pages)
        for page in pages:
            self.slots[page] = [("hog",)] * PS  # garbage: a stale key would now read this
        self.hogs += pages

    @rule()
    def relieve(self):
        self.allocator.free(self.hogs)
        self.hogs = []

    @rule(data=st.data(), n=st.integers(0, 3))
    def stale_hit(self, data, n):
        """A hit matched, then pages allocated (maybe evicting it): acquire refuses a stale one."""
        if not self.history:
            return
        extra, tokens = data.draw(st.sampled_from(self.history))
        keys = PrefixKeys(tokens, extra, PS)
        hit = self.cache.match(keys)
        evictions = self.cache.evictions
        self.pressure(max(n, 1)) if self.allocator.num_free else None
        if self.cache.evictions != evictions:
            try:
                self.cache.acquire(keys, hit)
            except StaleHit:
                return
            raise AssertionError("a hit matched before an eviction was acquired")
        self.cache.release(self.cache.acquire(keys, hit))

    @rule(bad=st.sampled_from([[1, -1], [0.5], "012", [[0]], None]), extra=EXTRA)
    def bad_lookup(self, bad, extra):
        state = (self.cache.stats(), self.allocator.evictable_pages(), self.allocator.num_free)
        try:
            self.cache.lookup(PrefixKeys(bad, extra, PS))
        except InvalidArgument:
            pass
        else:
            raise AssertionError(f"{bad!r} accepted")
        assert (self.cache.stats(), self.allocator.evictable_pages(),
                self.allocator.num_free) == state

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def states_and_refcounts(self):
        self.allocator.check_invariants(self.holders())
        self.cache.check_invariants()

    @invariant()
    def cached_pages_hold_their_keys(self):
        for extra, path, page in self.cache.entries():
            start = len(path) - PS
            want = [(extra, tuple(path[:start + j + 1])) for j in range(PS)]
            assert self.slots[page] == want, f"cached page {page} holds {self.slots[page]}"

    @invariant()
    def requests_read_their_own_tokens(self):
        for req in self.live:
            assert req.seq.num_tokens == req.written
            for pos in range(req.written):
                page = req.seq.pages[pos // PS]
                assert self.slots[page][pos % PS] == (req.extra, tuple(req.tokens[:pos + 1]))


PrefixCacheMachine.TestCase.settings = settings(stateful_step_count=50)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
