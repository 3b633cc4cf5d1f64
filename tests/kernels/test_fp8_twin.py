"""The fused FP8 decode's arithmetic, checked on the host with the kernel's own code.

tests/kernels/fp8_twin.cpp includes kernels/csrc/fp8_dequant.cuh and fp8_lane.h (host-compilable:
the device instructions have host twins there) and is built here with the C++ compiler:
- its dequantization of every e4m3 byte under every power-of-two scale (and 0, inf, NaN, and scales
  that are bf16 numbers), in both forms (two bf16 multiplies, or one when the scale is <= 2^7),
  equals kvpager.fp8.dequantize bit for bit, except the documented one: NaN codes read as
  +-480 * scale (NaN only when the scale is);
- one page through every warp's and lane's fragments (emulated mma.m16n8k16 / movmatrix) gives
  S = Q K^T and P V exactly (double sums), so the kernel's index math is right by construction.
- one page through the seesaw kernel's in-place converter (seesaw_fp8_layout.h's index math, the
  default of two rounds an iteration, and one or four) fills the wgmma tiles with the
  dequantized page, bit for bit: the round order's in-place hazards and the lane / row / scale mapping.
What this cannot see: the GPU's own instructions (tests/gpu/test_fp8_gpu.py runs those).
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from kvpager import fp8

from host_twin import build_twin, needs_cxx  # tests/kernels is on sys.path: pytest's rootdir-relative imports

pytestmark = needs_cxx


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return build_twin("fp8_twin", tmp_path_factory.mktemp("twin"))


def twin_dequantize(exe: Path, packed: torch.Tensor, tmp_path: Path, mode: str) -> torch.Tensor:
    src, dst = tmp_path / "rows.bin", tmp_path / "out.bin"
    src.write_bytes(packed.contiguous().numpy().tobytes())
    subprocess.run([str(exe), mode, str(src), str(dst), str(packed.shape[0])], check=True, timeout=60)
    raw = torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.int16)
    return raw.view(torch.bfloat16).view(packed.shape[0], fp8.HEAD_DIM)


def rows_for(scales: list[float], seed: int) -> torch.Tensor:
    """One row per (scale, shift): latent bytes (i + shift) % 256, so every byte value appears in
    every group position class, the same scale in all 4 groups; random bf16 RoPE."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for scale in scales:
        for shift in (0, 1, 77):
            row = torch.empty(fp8.TOKEN_BYTES, dtype=torch.uint8)
            row[:fp8.SCALES_OFFSET] = ((torch.arange(fp8.LATENT_DIM) + shift) % 256).to(torch.uint8)
            row[fp8.SCALES_OFFSET:fp8.ROPE_OFFSET] = torch.full((fp8.NUM_GROUPS,), scale).view(torch.uint8)
            rope = (torch.randn(fp8.ROPE_DIM, generator=gen) * 10).bfloat16()
            row[fp8.ROPE_OFFSET:] = rope.view(torch.uint8)
            rows.append(row)
    return torch.stack(rows)


POWERS = [2.0**k for k in range(-20, 128)]


PAGE_ROWS = 64  # tokens a page (the kernel's kPageSize)
MODES = ["dequant", "dequant-folded"]  # two bf16 multiplies; one where the scale is <= 2^7


@pytest.mark.parametrize("mode", MODES)
def test_dequant_equals_kvpager_fp8_bit_for_bit(twin, tmp_path, mode):
    packed = rows_for(POWERS + [0.0, -0.0, math.inf, math.nan, 100.0, 0.75], seed=0)
    got = twin_dequantize(twin, packed, tmp_path, mode)
    want = fp8.dequantize(packed, torch.bfloat16)
    nan_code = (packed[:, :fp8.SCALES_OFFSET] & 0x7F) == 0x7F
    scale = packed[:, fp8.SCALES_OFFSET:fp8.ROPE_OFFSET].contiguous().view(torch.float32)
    exception = nan_code & ~scale.isnan().repeat_interleave(fp8.GROUP_SIZE, dim=1)
    rule = torch.cat([~exception, torch.ones(len(packed), fp8.ROPE_DIM, dtype=torch.bool)], dim=1)
    both_nan = got.isnan() & want.isnan()
    same_bits = got.view(torch.int16) == want.view(torch.int16)
    assert bool((both_nan | same_bits)[rule].all()), "twin differs from kvpager.fp8.dequantize"
    # The documented exception: e4m3 NaN codes beside a scale that is not NaN read as +-480 * scale.
    sign = torch.where(packed[:, :fp8.SCALES_OFFSET] >= 0x80, -1.0, 1.0)
    expected = (sign * 480.0 * scale.repeat_interleave(fp8.GROUP_SIZE, dim=1)).bfloat16()
    assert torch.equal(got[:, :fp8.SCALES_OFFSET][exception], expected[exception])
    assert bool(want[:, :fp8.SCALES_OFFSET][exception].isnan().all())


@pytest.mark.parametrize("mode", MODES)
def test_dequant_of_quantized_latents_is_exact(twin, tmp_path, mode):
    """What a pool holds (kvpager.fp8.quantize of bf16 latents over many magnitudes, zero groups,
    zero-filled rows) reads back identically."""
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(512, fp8.HEAD_DIM, generator=gen)
    kv = kv * torch.exp2(torch.randint(-30, 30, (512, 1), generator=gen).float())
    kv[::5, :fp8.GROUP_SIZE] = 0.0
    packed = fp8.quantize(kv.bfloat16())
    packed[::9] = 0  # a zero-filled row (past a sequence's end) reads as zeros
    got = twin_dequantize(twin, packed, tmp_path, mode)
    want = fp8.dequantize(packed, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert bool((got[::9] == 0).all())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fragments_compute_s_and_pv(twin, seed):
    res = subprocess.run([str(twin), "fragments", str(seed)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.parametrize("schedule", ["rounds", "rounds2", "rounds4"])
def test_seesaw_converter_fills_the_wgmma_tiles(twin, tmp_path, schedule):
    """The seesaw kernel's in-place converter, 1, 2 (the default) or 4 rounds an iteration, on one page as
    TMA lands it: every latent value ends up in its 128-byte-swizzled bf16 tile, equal bit for bit to
    kvpager.fp8.dequantize. The page mixes scales that fold into one multiply with ones that do not
    (> 2^7), zero groups and a zero-filled row, so both of a warp's paths are exercised."""
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(PAGE_ROWS, fp8.HEAD_DIM, generator=gen)
    kv = kv * torch.exp2(torch.randint(-12, 16, (kv.shape[0], 1), generator=gen).float())
    kv[3, fp8.GROUP_SIZE:2 * fp8.GROUP_SIZE] = 0.0
    packed = fp8.quantize(kv.bfloat16())
    packed[40] = 0
    src, dst = tmp_path / "page.bin", tmp_path / "tiles.bin"
    src.write_bytes(packed.contiguous().numpy().tobytes())
    subprocess.run([str(twin), "seesaw-slots", str(src), str(dst), schedule], check=True, timeout=60)
    got = torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.int16).view(PAGE_ROWS, fp8.LATENT_DIM)
    want = fp8.dequantize(packed, torch.bfloat16)[:, :fp8.LATENT_DIM].contiguous().view(torch.int16)
    scales = packed[:, fp8.SCALES_OFFSET:fp8.ROPE_OFFSET].contiguous().view(torch.float32)
    assert bool((scales > 2.0**7).any()) and bool((scales <= 2.0**7).any()), "both multiply forms covered"
    assert torch.equal(got, want)
