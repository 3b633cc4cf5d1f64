"""The kernels' schedule walk (kernels/csrc/tile_scheduler.cuh, compiled for the host by
tests/kernels/scheduler_twin.cpp) over schedules from kernels/schedule.py, the metadata kernel's
oracle. Invariants, for any batch and part count:
- LeanTileScheduler (the FP8 seesaw's consumers, s18: two registers instead of six) yields exactly
  TileScheduler's segments, part by part;
- every page of every sequence lies in exactly one segment of one part, and a sequence without
  pages appears once (its part writes out = 0, lse = +inf);
- a sequence's segments use its split slots num_splits[b] .. num_splits[b + 1] - 1, each once, and
  that count is its number of segments.
"""
from __future__ import annotations

import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager.kernels.schedule import PAGE_SIZE, plan

from host_twin import build_twin, needs_cxx  # tests/kernels is on sys.path: pytest's rootdir-relative imports

pytestmark = needs_cxx


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return build_twin("scheduler_twin", tmp_path_factory.mktemp("scheduler"))


def walk(exe: Path, lens: list[int], parts: int) -> dict[str, list[tuple[int, ...]]]:
    seqlens = torch.tensor(lens, dtype=torch.int32)
    meta, splits = plan(seqlens, parts)
    blob = torch.cat([torch.tensor([len(lens), parts], dtype=torch.int32), seqlens, meta.flatten(), splits])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "schedule.bin"
        path.write_bytes(blob.numpy().tobytes())
        res = subprocess.run([str(exe), str(path)], check=True, capture_output=True, text=True, timeout=60)
    out: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for line in res.stdout.splitlines():
        name, *fields = line.split()
        out[name].append(tuple(map(int, fields)))
    out["num_splits"] = [tuple(splits.tolist())]
    return out


@settings(max_examples=80, deadline=None)
@given(lens=st.lists(st.integers(0, 2500), min_size=1, max_size=20), parts=st.integers(1, 48))
def test_lean_scheduler_walks_the_same_segments(twin, lens: list[int], parts: int) -> None:
    got = walk(twin, lens, parts)
    assert got["lean"] == got["full"]


@settings(max_examples=80, deadline=None)
@given(lens=st.lists(st.integers(0, 2500), min_size=1, max_size=20), parts=st.integers(1, 48))
def test_segments_cover_every_page_once(twin, lens: list[int], parts: int) -> None:
    got = walk(twin, lens, parts)
    num_splits = got["num_splits"][0]
    pages_seen: dict[int, list[int]] = defaultdict(list)
    slots: dict[int, list[int]] = defaultdict(list)
    for _part, b, seqlen, first, end, slot, n in got["full"]:
        assert seqlen == lens[b]
        assert n == num_splits[b + 1] - num_splits[b]
        pages_seen[b].extend(range(first, end))
        slots[b].append(slot)
    for b, length in enumerate(lens):
        assert sorted(pages_seen[b]) == list(range(-(-length // PAGE_SIZE))), b
        assert sorted(slots[b]) == list(range(num_splits[b], num_splits[b + 1])), b


def test_a_split_sequence_is_seen_by_several_parts(twin) -> None:
    """The walk is exercised where it matters: one long sequence over many parts."""
    got = walk(twin, [64 * 100], 8)
    parts = {row[0] for row in got["full"]}
    assert len(parts) > 1 and got["lean"] == got["full"]
