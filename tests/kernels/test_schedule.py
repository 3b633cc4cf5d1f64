"""kernels/schedule.plan: the split-KV tile scheduler (the oracle of the GPU metadata kernel).

Walks the table exactly as the decode kernel does and checks what the kernel relies on: every page
of every sequence is processed by exactly one part, each sequence's splits are numbered 0, 1, ...
in part order and counted by num_splits, empty sequences have exactly one owner, and no part gets
much more than its share of the work."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpager.kernels import schedule

PAGE = schedule.PAGE_SIZE
OVERHEAD = schedule.FIXED_OVERHEAD_PAGES


def walk(meta: torch.Tensor, lens: list[int]):
    """Yield (part, b, split, first_page, end_page) for every segment, in the kernel's order."""
    pages = [-(-n // PAGE) for n in lens]
    for part, row in enumerate(meta.tolist()):
        begin_b, begin_page, begin_split, end_b, end_page = row[:5]
        assert row[5:] == [0, 0, 0]
        for b in range(begin_b, end_b + 1):
            lo = begin_page if b == begin_b else 0
            hi = end_page if b == end_b else pages[b]
            yield part, b, (begin_split if b == begin_b else 0), lo, hi


seqlens = st.lists(
    st.one_of(st.just(0), st.integers(1, 130), st.integers(1, 20_000)), min_size=1, max_size=300
)
parts_st = st.one_of(st.integers(1, 8), st.sampled_from([66, 132, 264]))


@given(lens=seqlens, num_parts=parts_st)
def test_plan_covers_every_page_once_with_consecutive_splits(lens: list[int], num_parts: int) -> None:
    meta, num_splits = schedule.plan(torch.tensor(lens, dtype=torch.int32), num_parts)
    assert meta.dtype == torch.int32 and meta.shape == (num_parts, schedule.METADATA_FIELDS)
    assert num_splits.dtype == torch.int32 and num_splits.shape == (len(lens) + 1,)
    pages = [-(-n // PAGE) for n in lens]
    seen = [[0] * p for p in pages]
    splits: list[list[int]] = [[] for _ in lens]
    for _, b, split, lo, hi in walk(meta, lens):
        assert 0 <= lo <= hi <= pages[b]
        if pages[b]:
            assert lo < hi, f"sequence {b} visited with no pages"
        for p in range(lo, hi):
            seen[b][p] += 1
        splits[b].append(split)
    for b, counts in enumerate(seen):
        assert all(c == 1 for c in counts), f"sequence {b}: pages processed {counts} times"
    ns = num_splits.tolist()
    assert ns[0] == 0
    for b, got in enumerate(splits):
        assert got == list(range(len(got))), f"sequence {b}: split indices {got}"
        assert ns[b + 1] - ns[b] == len(got)
        if pages[b] == 0:
            assert len(got) == 1, f"empty sequence {b} owned by {len(got)} parts"


@given(lens=seqlens, num_parts=parts_st)
def test_plan_balances_parts(lens: list[int], num_parts: int) -> None:
    meta, _ = schedule.plan(torch.tensor(lens, dtype=torch.int32), num_parts)
    total = sum(-(-n // PAGE) + OVERHEAD for n in lens)
    width = -(-total // num_parts)
    cost = [0] * num_parts
    for part, _, _, lo, hi in walk(meta, lens):
        cost[part] += hi - lo + OVERHEAD
    # A part holds `width` units of the cost line; it may also pay the start-up of a split it
    # continues (whose overhead sits in an earlier part) and of an empty sequence whose overhead
    # runs past its end.
    assert max(cost) <= width + 2 * OVERHEAD, (cost, width)


def test_plan_empty_batch_and_all_empty() -> None:
    meta, num_splits = schedule.plan(torch.zeros(0, dtype=torch.int32), 4)
    assert num_splits.tolist() == [0]
    assert list(walk(meta, [])) == []
    meta, num_splits = schedule.plan(torch.zeros(3, dtype=torch.int32), 132)
    assert num_splits.tolist() == [0, 1, 2, 3]


def test_plan_splits_one_long_sequence_over_every_part() -> None:
    meta, num_splits = schedule.plan(torch.tensor([64 * 1000], dtype=torch.int32), 132)
    # width = ceil(1005 / 132) = 8 units, so 126 parts get work and the last 6 none.
    assert num_splits.tolist() == [0, 126]
    pages = [hi - lo for _, _, _, lo, hi in walk(meta, [64 * 1000])]
    assert max(pages) - min(pages) <= OVERHEAD + 1


def test_num_sm_parts() -> None:
    assert schedule.num_sm_parts(132, 16, 1) == 132
    assert schedule.num_sm_parts(132, 128, 1) == 66  # two 64-row blocks share the SMs
    assert schedule.num_sm_parts(132, 256, 2) == 16
    assert schedule.num_sm_parts(4, 512, 8) == 1
