"""The combine kernels: the default (one block per unit, KVPAGER_COMBINE_GRID=unit) and the s26
trial that walks the units (KVPAGER_COMBINE_GRID=wave: one wave of blocks; KVPAGER_COMBINE_LOADS=8
or 16: that many partials in flight, the first ones loaded before the lse, weights by shuffle; with
either grid) do the same arithmetic in the same
order, so every mode's output is bit-identical to the default's, and right against the reference. The batches mix split, unsplit and
empty sequences, and are large enough that a wave's blocks each walk several units; one sequence
has more than 32 splits (the 8- and 16-deep paths' lane-per-split chunks), others fewer splits than
a group (the masked tail of the first, prefetched group)."""
from __future__ import annotations

import zlib

import pytest
import torch

from kvpager import kernels
from kvpager.errors import InvalidArgument
from test_kernel import DTYPES, DV, _skip_reason, assert_matches_reference, make_batch, metadata, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ready")]

MODES = [("unit", "4"), ("wave", "4"), ("wave", "8"), ("unit", "8"), ("wave", "16")]
CASES = [  # b, s_q, h_q, h_kv, lengths (None: random in [0, 3000]), dtype
    (64, 1, 128, 1, None, "bf16"),      # 4,096 units: a wave's blocks walk several
    (96, 1, 16, 1, None, "fp16"),       # 16-row blocks
    (40, 2, 64, 2, None, "bf16"),       # two kv heads
    (1, 1, 128, 1, [16384 + 65], "bf16"),  # one sequence over every part: > 32 splits
    (5, 1, 16, 1, [0, 20000, 1, 64, 9000], "bf16"),
    (8, 1, 16, 1, [2048] * 8, "bf16"),   # 11-12 splits: between the 8- and the 16-deep group
    (2, 1, 128, 1, [3000, 1500], "bf16"),  # ~20-45 splits
]


def case_id(c) -> str:
    return f"b{c[0]}-sq{c[1]}-hq{c[2]}-hkv{c[3]}-{c[5]}"


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_combine_modes_agree_bit_for_bit(c, monkeypatch) -> None:
    b, s_q, h_q, h_kv, lens, dtype = c
    torch.manual_seed(zlib.crc32(case_id(c).encode()))
    lens = torch.tensor(lens, dtype=torch.int32) if lens else torch.randint(0, 3001, (b,), dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(b, s_q, h_q, h_kv, lens, DTYPES[dtype])
    meta, splits = metadata(q, k_cache, seqlens)
    counts = (splits[1:] - splits[:-1]).cpu()
    assert (counts > 1).any(), "the case must give the combine kernel work"
    results = {}
    for grid, loads in MODES:
        monkeypatch.setenv("KVPAGER_COMBINE_GRID", grid)
        monkeypatch.setenv("KVPAGER_COMBINE_LOADS", loads)
        results[grid, loads] = kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    out, lse = results[MODES[0]]
    assert_matches_reference(out, lse, *reference(q, k_cache, block_table, seqlens, False), seqlens)
    for mode, (o, l) in results.items():
        assert torch.equal(o, out) and torch.equal(l, lse), f"mode {mode} differs from {MODES[0]}"


@pytest.mark.parametrize("name, value", [("KVPAGER_COMBINE_GRID", "all"), ("KVPAGER_COMBINE_LOADS", "32")])
def test_bad_combine_switch_is_an_error(name, value, monkeypatch) -> None:
    monkeypatch.setenv(name, value)
    lens = torch.tensor([100], dtype=torch.int32)
    q, k_cache, block_table, seqlens = make_batch(1, 1, 16, 1, lens, torch.bfloat16)
    meta, splits = metadata(q, k_cache, seqlens)
    with pytest.raises(InvalidArgument, match=f"{name} must be"):
        kernels.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, meta, splits)
    torch.cuda.synchronize()
