"""`kvpager bench kernel`'s kernel names -> the KVPAGER_* switches each timed variant runs under
(benchmarks/kernel.py; the switches are read by the binding on every call)."""
from __future__ import annotations

import os

import pytest
import torch

from kvpager.benchmarks import kernel as bench


@pytest.mark.parametrize("name, expected", [
    ("seesaw", {"KVPAGER_MLA_KERNEL": "seesaw", "KVPAGER_SEESAW_ORDER": None}),
    ("seesaw-o11", {"KVPAGER_MLA_KERNEL": "seesaw", "KVPAGER_SEESAW_ORDER": "11"}),
    ("lockstep", {"KVPAGER_MLA_KERNEL": "lockstep", "KVPAGER_SEESAW_ORDER": None}),
])
def test_kernel_name_sets_its_switches_and_restores_them(name, expected, monkeypatch) -> None:
    monkeypatch.setenv("KVPAGER_SEESAW_ORDER", "15")  # a caller's own setting: overridden, then restored
    with bench.kernel_env({"kernel": name, "pdl": False, "hint": "normal"}):
        for var, value in expected.items():
            assert os.environ.get(var) == value, var
        assert os.environ["KVPAGER_PDL"] == "0" and os.environ["KVPAGER_TMA_HINT"] == "normal"
    assert os.environ["KVPAGER_SEESAW_ORDER"] == "15"


def test_l2_traffic_counts_every_row_block_of_a_kv_head() -> None:
    """h_q 128 s_q 2 = 256 rows a kv head = four 64-row blocks, each reading every page; h_q 16 is
    one 16-row block: its L2 traffic equals the bytes the read ceiling is compared against."""
    compute = bench.Case(128, 2, 128, 8192, False)
    cache = 2 * 128 * 8192 * bench.D
    q_out = 2 * 128 * 2 * 128 * (bench.D + bench.DV)
    assert bench.l2_traffic_bytes(compute, 8192) == 4 * cache + q_out
    memory = bench.Case(128, 1, 16, 8192, False)
    assert bench.l2_traffic_bytes(memory, 8192) == bench.work(memory, torch.full((128,), 8192))[2]
