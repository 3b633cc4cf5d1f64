"""Order 19's producer warpgroup (kernels/csrc/decode_seesaw_kernel.cuh) against its consumers, on
the host: for every segment of up to 40 pages, the refills each producer warp waits for and issues
(kernels/csrc/seesaw_refills.h, compiled into tests/kernels/seesaw_refills_twin.cpp) are exactly
the releases its warpgroup makes, in the same order. Invariant (stated in seesaw_refills.h): a
producer wait with no matching release would hang the kernel; a refill ahead of its release would
overwrite a tile still being read.

The consumers' releases are restated here from run_pairs / wg0_pair / wg1_pair: pairs (j0, j0 + 1)
from the segment's first page, shapes <has1, next0, next1> = <1,1,1> while j0 + 3 < end, then the
tail <1,1,0> + <0,0,0>, <1,0,0> or <0,0,0>; WG0 frees buffer 0 (page j0 + 2) if next0, then buffer 1
(j0 + 3) if next1; WG1 frees buffer 1 first, then buffer 0.
"""
from __future__ import annotations

import subprocess
from collections import defaultdict

import pytest

from host_twin import build_twin, needs_cxx  # tests/kernels is on sys.path: pytest's rootdir-relative imports

pytestmark = needs_cxx
MAX_PAGES = 40


def consumer_releases(first: int, end: int, wg: int) -> list[tuple[int, int]]:
    """(buffer, page refilled) in the order warpgroup `wg` frees its tile group of each buffer."""
    out: list[tuple[int, int]] = []

    def pair(has1: bool, next0: bool, next1: bool, j0: int) -> None:
        frees = [(0, j0 + 2, next0), (1, j0 + 3, has1 and next1)]
        for buf, page, frees_it in (frees if wg == 0 else frees[::-1]):
            if frees_it:
                out.append((buf, page))

    j0 = first
    while j0 + 3 < end:
        pair(True, True, True, j0)
        j0 += 2
    if j0 + 2 < end:
        pair(True, True, False, j0)
        pair(False, False, False, j0 + 2)
    elif j0 + 1 < end:
        pair(True, False, False, j0)
    elif j0 < end:
        pair(False, False, False, j0)
    return out


@pytest.fixture(scope="module")
def producer_refills(tmp_path_factory) -> dict[tuple[int, int, int], list[tuple[int, int]]]:
    exe = build_twin("seesaw_refills_twin", tmp_path_factory.mktemp("refills"))
    res = subprocess.run([str(exe), str(MAX_PAGES)], check=True, capture_output=True, text=True, timeout=60)
    refills: dict[tuple[int, int, int], list[tuple[int, int]]] = defaultdict(list)
    for line in res.stdout.splitlines():
        first, end, warp, buf, page = map(int, line.split())
        refills[first, end, warp].append((buf, page))
    return refills


@pytest.mark.parametrize("warp", [0, 1])
def test_producer_waits_for_exactly_the_consumers_releases(producer_refills, warp: int) -> None:
    for first in range(MAX_PAGES + 1):
        for end in range(first, MAX_PAGES + 1):
            assert producer_refills[first, end, warp] == consumer_releases(first, end, warp), (first, end, warp)


def test_each_later_page_is_refilled_once_into_its_own_buffer(producer_refills) -> None:
    """Pages first + 2 .. end - 1 each come once per warp's tile group, into the buffer of the page
    two before them (pages alternate buffers from the segment's first page)."""
    for first in range(MAX_PAGES + 1):
        for end in range(first, MAX_PAGES + 1):
            for warp in (0, 1):
                got = producer_refills[first, end, warp]
                assert sorted(page for _, page in got) == list(range(first + 2, end))
                assert all(buf == (page - first) % 2 for buf, page in got)


def test_a_wrong_order_is_caught() -> None:
    """The check has teeth: WG1 freeing buffer 0 first (WG0's order) differs on every segment with
    both buffers refilled."""
    assert consumer_releases(0, 4, 1) == [(1, 3), (0, 2)]
    assert consumer_releases(0, 4, 0) == [(0, 2), (1, 3)]
