"""Prefix cache behaviour on real pages: full-page sharing, mid-page matches, fully cached
prompts, LRU eviction, extra keys, metrics and bad input."""
import numpy as np
import pytest
import torch

from kvpager import BlockAllocator, CacheConfig, PagePool, Sequence
from kvpager.errors import (ConfigError, InvalidArgument, KVPagerError, OutOfPages,
                            SequenceTooLong, StaleHit)
from kvpager.prefix_cache import PrefixCache
from kvpager.prefix_hit import check_pool_for_caching, kv_usage_tokens
from kvpager.prefix_keys import PrefixKeys

PS = 64


class Server:
    """A pool whose slot holds the value of the token written there, plus the cache: enough to
    see that a request reads exactly the KV of its own tokens."""

    def __init__(self, num_pages=16, page_size=PS):
        self.ps = page_size
        self.allocator = BlockAllocator(num_pages)
        self.cache = PrefixCache(self.allocator, page_size)
        self.pool = PagePool(CacheConfig(num_layers=1, num_pages=num_pages, page_size=page_size,
                                         allow_any_page_size=True, head_dim=1, head_dim_v=1,
                                         dtype="float32"))

    def run(self, tokens, extra_keys=(), name="r"):
        """Admit tokens like the engine would: lookup, build the sequence, copy the partial page,
        write the rest, commit full pages. Returns (seq, keys, hit)."""
        keys = PrefixKeys(tokens, extra_keys, self.ps)
        hit = self.cache.lookup(keys)
        seq = Sequence.from_prefix(name, self.allocator, hit, self.ps)
        start = seq.num_tokens
        slots = seq.append(len(tokens) - start)
        copies = seq.take_pending_copies()
        if copies:
            self.pool.copy_pages([s for s, _ in copies], [d for _, d in copies])
        self.pool.write(0, slots, torch.tensor(tokens[start:], dtype=torch.float32).view(-1, 1))
        self.cache.commit(seq, keys, len(tokens))
        return seq, keys, hit

    def read(self, seq):
        slots = seq.slot_mapping(0, seq.num_tokens)
        return self.pool.kv[0].view(-1)[slots].long().tolist()

    def check(self, *seqs):
        self.allocator.check_invariants()
        self.cache.check_invariants()
        for seq, tokens in seqs:
            assert self.read(seq) == tokens


def prompt(n, seed):
    return np.random.default_rng(seed).integers(1, 30000, n).tolist()


def test_full_pages_are_shared_by_reference():
    s = Server()
    a_tokens = prompt(200, 0)
    a, _, hit = s.run(a_tokens, name="a")
    assert hit.num_tokens == 0 and s.cache.num_cached_pages == 3  # 200 // 64 full pages
    b_tokens = a_tokens[:192] + prompt(20, 1)
    b, _, hit = s.run(b_tokens, name="b")
    assert hit.pages == a.pages[:3] and hit.partial_page is None and hit.num_tokens == 192
    assert b.pages[:3] == a.pages[:3] and all(s.allocator.refcount(p) == 2 for p in a.pages[:3])
    s.check((a, a_tokens), (b, b_tokens))


def test_mid_page_match_copies_the_page_and_keeps_its_matching_tokens():
    """A 100-token shared prefix on 64-token pages reuses 100 tokens, not 64."""
    s = Server()
    system = prompt(100, 0)
    a_tokens = system + prompt(60, 1)  # a's page 1 = 36 shared tokens + 28 of its own
    a, _, _ = s.run(a_tokens, name="a")
    b_tokens = system + prompt(50, 2)
    b, _, hit = s.run(b_tokens, name="b")
    assert hit.pages == [a.pages[0]] and hit.partial_page == a.pages[1]
    assert hit.partial_tokens == 36 and hit.num_tokens == 100
    assert b.pages[1] != a.pages[1] and s.allocator.refcount(a.pages[1]) == 1  # copy released
    s.check((a, a_tokens), (b, b_tokens))  # a's page was not written by b


def test_fully_cached_prompt_recomputes_its_last_token_in_a_copy():
    s = Server()
    tokens = prompt(128, 0)
    a, _, _ = s.run(tokens, name="a")
    b, _, hit = s.run(tokens, name="b")
    assert hit.pages == [a.pages[0]] and hit.partial_page == a.pages[1]
    assert hit.num_tokens == 127  # one token left to compute for the first output's logits
    assert b.pages[1] != a.pages[1]  # nothing writes into the shared page
    s.check((a, tokens), (b, tokens))
    one = Server()
    c, _, _ = one.run(tokens[:64], name="c")
    d, _, hit = one.run(tokens[:64], name="d")
    assert hit.pages == [] and (hit.partial_page, hit.partial_tokens) == (c.pages[0], 63)
    one.check((c, tokens[:64]), (d, tokens[:64]))
    single = PrefixKeys(tokens[:1], page_size=PS)
    assert one.cache.match(single).num_tokens == 0


def test_partial_match_picks_the_longest_child_by_bisection():
    s = Server(page_size=4, num_pages=20)
    root = [9, 9, 9, 9]
    runs = [s.run(root + tail + [0], name=str(i))
            for i, tail in enumerate(([1, 2, 3, 4], [1, 2, 7, 7], [1, 5, 5, 5], [0, 0, 0, 0]))]
    second = [seq.pages[1] for seq, _, _ in runs]
    want = {(1, 2, 3): ({second[0]}, 3), (1, 2, 7, 9): ({second[1]}, 3),
            (1, 9): (set(second[:3]), 1), (1, 5, 5): ({second[2]}, 3),
            (0, 0, 1): ({second[3]}, 2), (2,): ({None}, 0)}
    for tail, (pages, k) in want.items():
        hit = s.cache.match(PrefixKeys(root + list(tail) + [42], page_size=4))
        assert hit.pages == [runs[0][0].pages[0]], tail
        assert hit.partial_page in pages and hit.partial_tokens == k, tail


def test_released_pages_stay_cached_and_evict_least_recently_released_first():
    s = Server(num_pages=7, page_size=4)
    reqs = [s.run(prompt(8, i), name=str(i))[0] for i in range(3)]  # 2 full pages each
    pages = [seq.pages for seq in reqs]
    for seq in reqs:
        seq.release()
    assert s.allocator.num_used == 0 and s.allocator.num_evictable == 6
    # A hit revives request 0's pages (its 9th token takes the free page); released again, they
    # become the youngest.
    again, _, hit = s.run(prompt(8, 0) + [1], name="again")
    assert hit.pages == pages[0] and s.cache.evictions == 0
    again.release()
    order = s.allocator.evictable_pages()
    assert order == [pages[1][1], pages[1][0], pages[2][1], pages[2][0], pages[0][1], pages[0][0]]
    fresh = s.allocator.allocate(4)  # the free page, then the 3 oldest cached pages
    assert s.cache.evictions == 3 and set(order[:3]) < set(fresh)
    assert s.cache.match(PrefixKeys(prompt(8, 0) + [1], page_size=4)).num_tokens == 8
    assert s.cache.match(PrefixKeys(prompt(8, 2) + [1], page_size=4)).num_tokens == 4
    assert s.cache.match(PrefixKeys(prompt(8, 1) + [1], page_size=4)).num_tokens == 0
    s.check()


def test_evicting_a_prefix_drops_the_pages_that_extend_it():
    s = Server(num_pages=8, page_size=4)
    tokens = prompt(12, 0)
    c_keys = PrefixKeys(tokens[:4], page_size=4)
    c = Sequence.from_prefix("c", s.allocator, s.cache.lookup(c_keys), 4)
    d_keys = PrefixKeys(tokens, page_size=4)
    d = Sequence.from_prefix("d", s.allocator, s.cache.lookup(d_keys), 4)
    c.append(4)
    d.append(12)
    assert s.cache.commit(c, c_keys, 4) == 1
    assert s.cache.commit(d, d_keys, 8) == 1  # page 0 was cached by c: d keeps its own private
    c.release()  # c's page is now the only evictable one; d's page 1 extends it
    s.allocator.allocate(s.allocator.num_free)
    assert s.cache.evictions == 2 and s.cache.num_cached_pages == 0
    assert not s.allocator.is_cached(d.pages[1]) and s.allocator.refcount(d.pages[1]) == 1
    s.check()
    assert s.cache.commit(d, d_keys, 12) == 3  # the cursor died with the chain: redone from the root
    s.check()


def test_extra_keys_separate_the_caches():
    s = Server()
    tokens = prompt(130, 0)
    a, _, _ = s.run(tokens, ("lora-1",), name="a")
    assert s.cache.match(PrefixKeys(tokens, page_size=PS)).num_tokens == 0
    assert s.cache.match(PrefixKeys(tokens, ("lora-2",), PS)).num_tokens == 0
    assert s.cache.match(PrefixKeys(tokens, ("lora-1",), PS)).num_tokens == 128  # full pages only
    s.check((a, tokens))


@pytest.mark.parametrize("tokens", [[1, -2, 3], [1, 2.0, 3], [1, "2"], "123", [[1, 2]], None,
                                    torch.tensor([1, 2]), [True, False], np.array([1.5]),
                                    [1, 2**31], [2**64], [[1], [2, 3]]])
def test_bad_token_lists_are_typed_errors_and_change_nothing(tokens):
    s = Server()
    a, keys, _ = s.run(prompt(100, 0))
    before = (s.cache.stats(), s.allocator.evictable_pages(), keys.num_tokens)
    with pytest.raises(InvalidArgument, match="token") as info:
        PrefixKeys(tokens, page_size=PS)
    with pytest.raises(InvalidArgument):
        keys.append(tokens)
    assert isinstance(info.value, KVPagerError)
    assert (s.cache.stats(), s.allocator.evictable_pages(), keys.num_tokens) == before
    with pytest.raises(InvalidArgument, match="PrefixKeys"):
        s.cache.lookup(tokens)


@pytest.mark.parametrize("extra", [["lora"], "lora", (1.5,), ({},), ([1],), (None,)])
def test_bad_extra_keys_are_typed_errors(extra):
    with pytest.raises(InvalidArgument, match="extra"):
        PrefixKeys([1, 2, 3], extra)


def test_numpy_tokens_and_no_extra_keys_accepted():
    keys = PrefixKeys(np.arange(130, dtype=np.int32), None, PS)
    assert keys.num_full_pages == 2 and keys.token_ids(60, 66) == list(range(60, 66))
    keys.append([130])
    assert keys.num_tokens == 131 and keys.extra_keys == ()


def test_metrics_count_tokens():
    s = Server()
    tokens = prompt(160, 0)
    a, _, _ = s.run(tokens, name="a")
    b, _, _ = s.run(tokens[:100] + prompt(10, 1), name="b")
    stats = s.cache.stats([a, b])
    assert stats["prefix_query_tokens"] == 160 + 110 and stats["prefix_hit_tokens"] == 100
    assert stats["prefix_hit_rate"] == pytest.approx(100 / 270)
    # a: 160 tokens on 3 pages; b: 64 shared + its own 46 on 1 page (the copy): 206, not 4 pages
    assert stats["kv_usage_tokens"] == 160 + 46 == kv_usage_tokens(s.allocator, [a, b], PS)
    assert stats["cached_tokens"] == 2 * PS and stats["evictions"] == 0
    a.release()
    b.release()
    assert s.cache.stats([])["evictable_tokens"] == 2 * PS


def test_stale_hit_and_reused_hit_are_refused_with_nothing_changed():
    s = Server(num_pages=4, page_size=4)
    a, keys, _ = s.run(prompt(9, 0))
    a.release()
    hit = s.cache.match(keys)
    assert hit.num_tokens == 8 and hit.pages_needed(9) == 3 + 0  # 1 tail page + 2 revived
    s.allocator.allocate(4)  # evicts both cached pages
    with pytest.raises(StaleHit):
        s.cache.acquire(keys, hit)
    s.check()
    with pytest.raises(InvalidArgument, match="same keys"):
        s.cache.acquire(keys.copy(), s.cache.match(keys))
    hit = s.cache.lookup(keys)
    with pytest.raises(InvalidArgument):
        s.cache.acquire(keys, hit)
    seq = Sequence.from_prefix("x", s.allocator, hit, 4)
    with pytest.raises(InvalidArgument):
        Sequence.from_prefix("y", s.allocator, hit, 4)
    with pytest.raises(InvalidArgument):
        s.cache.release(hit)
    assert seq.num_tokens == 0


def test_from_prefix_failures_leave_the_hit_with_the_caller():
    s = Server(num_pages=4, page_size=4)
    tokens = prompt(8, 0)
    a, keys, _ = s.run(tokens)
    hog = s.allocator.allocate(s.allocator.num_free)
    hit = s.cache.lookup(PrefixKeys(tokens, page_size=4))  # 4 full + 3 of page 1: needs a copy
    state = (s.allocator.num_free, [s.allocator.refcount(p) for p in a.pages])
    with pytest.raises(OutOfPages):
        Sequence.from_prefix("b", s.allocator, hit, 4)
    with pytest.raises(SequenceTooLong):
        Sequence.from_prefix("b", s.allocator, hit, 4, max_pages=1)
    assert (s.allocator.num_free, [s.allocator.refcount(p) for p in a.pages]) == state
    s.cache.release(hit)
    s.allocator.free(hog)
    a.release()
    s.allocator.check_invariants({})


def test_concurrent_identical_prompts_cache_one_copy():
    s = Server(num_pages=8, page_size=4)
    tokens = prompt(9, 0)
    keys = [PrefixKeys(tokens, page_size=4) for _ in range(2)]
    seqs = [Sequence.from_prefix(i, s.allocator, s.cache.lookup(k), 4) for i, k in enumerate(keys)]
    for seq in seqs:
        seq.append(9)
    assert s.cache.commit(seqs[0], keys[0], 9) == 2 and s.cache.commit(seqs[1], keys[1], 9) == 0
    for seq in seqs:
        seq.release()
    assert s.allocator.num_evictable == 2 and s.allocator.num_free == 8
    s.check()


def test_commit_rejects_bad_counts():
    s = Server(page_size=4)
    keys = PrefixKeys([1, 2, 3, 4, 5], page_size=4)
    seq = Sequence(0, s.allocator, 4)
    seq.append(4)
    for bad in (5, -1, 2.0):
        with pytest.raises(InvalidArgument, match="num_written"):
            s.cache.commit(seq, keys, bad)
    with pytest.raises(InvalidArgument, match="page_size"):
        s.cache.commit(Sequence(1, s.allocator, 8), keys, 0)
    assert s.cache.num_cached_pages == 0


def test_pool_too_small_for_caching_is_a_config_error():
    check_pool_for_caching(num_pages=2, page_size=64, request_tokens=128)
    with pytest.raises(ConfigError, match="raise num_pages"):
        check_pool_for_caching(num_pages=2, page_size=64, request_tokens=129)
    with pytest.raises(InvalidArgument, match="one cache"):
        PrefixCache(Server().allocator)


def test_commit_never_caches_a_page_under_a_second_key():
    """Misuse (keys that are not the sequence's tokens) caches nothing rather than aliasing."""
    s = Server(page_size=4)
    tokens = [1, 2, 3, 4, 5]
    a, _, _ = s.run(tokens)
    assert s.cache.commit(a, PrefixKeys([7, 7, 7, 7, 7], page_size=4), 5) == 0
    assert s.cache.match(PrefixKeys([7, 7, 7, 7, 7], page_size=4)).num_tokens == 0
    s.check((a, tokens))
