"""The combine kernels' units, checked on the host with the kernels' own index math.

tests/kernels/combine_twin.cpp includes kernels/csrc/combine_units.h and walks a grid's blocks the
way the walking combine kernel (the s26 trial, KVPAGER_COMBINE_GRID=wave) does. For grids of one
wave or smaller, of one block per unit and larger than that:
- every unit is looked at exactly once, by one lane of one round of one block;
- the units map one to one onto (sequence, kv head, row block, quarter), in the order of the default
  kernel's grid (x = row block * 4 + quarter, y = kv head, z = sequence), so both kernels write
  every output row of a split sequence once.
What this cannot see: the GPU's own ballot and loads (tests/gpu/test_combine_modes.py runs those).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from host_twin import build_twin, needs_cxx  # tests/kernels is on sys.path: pytest's rootdir-relative imports

pytestmark = needs_cxx

ROWS_PER_BLOCK, QUARTERS = 8, 4


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return build_twin("combine_twin", tmp_path_factory.mktemp("twin"))


def walk(exe: Path, batch: int, h_kv: int, rows: int, grid: int) -> tuple[int, list[tuple[int, ...]]]:
    out = subprocess.run([str(exe), str(batch), str(h_kv), str(rows), str(grid)], check=True, timeout=60,
                         capture_output=True, text=True).stdout.splitlines()
    units = int(out[0].split()[1])
    return units, [tuple(int(v) for v in line.split()) for line in out[1:]]


@pytest.mark.parametrize("batch, h_kv, rows", [(64, 1, 128), (8, 1, 16), (1, 1, 128), (5, 2, 40), (3, 4, 3)])
@pytest.mark.parametrize("grid", ["one", "wave", "unit", "more"])
def test_walk_covers_every_unit_once(twin: Path, batch: int, h_kv: int, rows: int, grid: str) -> None:
    row_blocks = -(-rows // ROWS_PER_BLOCK)
    units = batch * h_kv * row_blocks * QUARTERS
    blocks = {"one": 1, "wave": min(units, 660), "unit": units, "more": units + 7}[grid]
    got_units, seen = walk(twin, batch, h_kv, rows, blocks)
    assert got_units == units
    assert sorted(s[3] for s in seen) == list(range(units)), "a unit looked at twice or never"
    expected = {}
    for b in range(batch):
        for hk in range(h_kv):
            for x in range(row_blocks * QUARTERS):  # the default grid's blockIdx.x
                expected[len(expected)] = (b, hk, x // QUARTERS, x % QUARTERS)
    for block, round_, lane, unit, *coords in seen:
        assert unit == block + (round_ * 32 + lane) * blocks
        assert tuple(coords) == expected[unit]
