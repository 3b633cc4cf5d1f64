"""kvpager.fp8 against an independent scalar model of the 656-byte row.

The expected bytes are built here in plain Python (exact rationals, struct), sharing no code with
kvpager.fp8: the scale by the issue's formula, e4m3 by round-half-to-even on the exact quotient,
bfloat16 by round-half-to-even on the float32 bits.
"""
import math
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpager import fp8
from kvpager.errors import InvalidArgument, KVPagerError

GROUP, GROUPS, LATENT, ROW = 128, 4, 512, 576
E4M3_MAX, E4M3_MIN_NORMAL_EXP, E4M3_SUBNORMAL_STEP = 448, -6, Fraction(1, 2**9)


# ---- the scalar model ---------------------------------------------------------------------------


def formula_scale(group: list[float]) -> float:
    """The issue's formula, literally (float64 log2 is exact enough for float32 maxima)."""
    amax = max(abs(v) for v in group)
    return 2.0 ** math.ceil(math.log2(max(amax / 448, 1e-4)))


def round_half_even(x: Fraction) -> int:
    floor = math.floor(x)
    rest = x - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        return floor + 1
    return floor


def e4m3_byte(y: Fraction, negative: bool) -> int:
    """float8_e4m3fn encoding of y (|y| <= 448), round half to even; the sign kept for zeros."""
    m = abs(y)
    assert m <= E4M3_MAX
    if m < Fraction(2) ** E4M3_MIN_NORMAL_EXP:  # subnormals: fixed spacing 2^-9; code 8 = 2^-6
        code = round_half_even(m / E4M3_SUBNORMAL_STEP)
    else:
        e = math.floor(math.log2(m))
        while Fraction(2) ** e > m:
            e -= 1
        while Fraction(2) ** (e + 1) <= m:
            e += 1
        q = round_half_even((m / Fraction(2) ** e - 1) * 8)
        code = ((e + 7) << 3) + q  # q == 8 carries into the exponent, as it should
    assert code <= 0x7E
    return code | (0x80 if negative else 0)


def bf16_bytes(x: float) -> bytes:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return struct.pack("<H", bits)


def expected_row(row: list[float]) -> bytes:
    out = bytearray()
    scales = [formula_scale(row[g * GROUP:(g + 1) * GROUP]) for g in range(GROUPS)]
    for j, v in enumerate(row[:LATENT]):
        out.append(e4m3_byte(Fraction(v) / Fraction(scales[j // GROUP]), math.copysign(1, v) < 0))
    out += struct.pack("<4f", *scales)
    for v in row[LATENT:]:
        out += bf16_bytes(v)
    return bytes(out)


def exact_values(packed: torch.Tensor) -> torch.Tensor:
    """float64 [n, 576] read straight from the bytes: e4m3 value * scale (exact in float64)."""
    scales = packed[:, 512:528].contiguous().view(torch.float32).double()
    latent = packed[:, :LATENT].contiguous().view(torch.float8_e4m3fn).double()
    rope = packed[:, 528:].contiguous().view(torch.bfloat16).double()
    return torch.cat([latent * scales.repeat_interleave(GROUP, dim=1), rope], dim=1)


def half_ulp_bound(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |y| (y = value / scale, |y| <= 448), float64: 2^-10 among the
    subnormals (|y| < 2^-6, spacing 2^-9); 2^(floor(log2|y|) - 4) above (3 mantissa bits)."""
    exponent = torch.frexp(y.abs())[1] - 1  # floor(log2|y|), exact
    return torch.where(y.abs() < 2.0**-6, 2.0**-10, torch.exp2(exponent.double() - 4))


# ---- inputs -------------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def groups(draw) -> torch.Tensor:
    """One 128-value group of a kind chosen to hit the edges: gaussian at any magnitude, all
    zeros, tiny (scale floor), amax pinned to 448 * 2^e with values on e4m3 ties, raw floats."""
    kind = draw(st.sampled_from(["gauss", "zeros", "tiny", "ties", "floats"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if kind == "zeros":
        return torch.zeros(GROUP).copysign(torch.randn(GROUP, generator=gen))  # signed zeros
    if kind == "gauss":
        return torch.randn(GROUP, generator=gen) * 2.0 ** draw(st.integers(-60, 100))
    if kind == "tiny":
        return torch.randn(GROUP, generator=gen) * 2.0 ** draw(st.integers(-149, -15))
    if kind == "ties":  # scale 2^e exactly; values at midpoints between e4m3 neighbours
        e = draw(st.integers(-13, 100))
        grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        mids = (grid[:-1] + grid[1:]) / 2
        pick = torch.randint(0, mids.numel(), (GROUP,), generator=gen)
        signs = torch.randint(0, 2, (GROUP,), generator=gen) * 2 - 1
        values = mids[pick] * signs
        values[torch.randint(0, GROUP, (1,), generator=gen)] = 448.0
        return values * 2.0**e
    return with_raw_floats(draw, torch.randn(GROUP, generator=gen))


def with_raw_floats(draw, values: torch.Tensor) -> torch.Tensor:
    """`values` with a few entries replaced by arbitrary finite float32 (subnormals, -0.0,
    near the maximum...): whole lists of raw floats would exhaust hypothesis' buffer."""
    for index, value in draw(st.lists(st.tuples(st.integers(0, values.numel() - 1), finite32),
                                      max_size=6)):
        values[index] = value
    return values


@st.composite
def rows(draw, max_tokens: int = 3) -> torch.Tensor:
    """[n, 576] float32 or bfloat16: 4 drawn groups + RoPE values per token."""
    n = draw(st.integers(1, max_tokens))
    out = []
    for _ in range(n):
        latent = [draw(groups()) for _ in range(GROUPS)]
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        rope = with_raw_floats(draw, torch.randn(64, generator=gen) * 2.0 ** draw(st.integers(-30, 30)))
        out.append(torch.cat(latent + [rope]))
    kv = torch.stack(out).float()
    if draw(st.booleans()):
        kv = kv.clamp(-3e38, 3e38).bfloat16()  # stays finite in bf16
    return kv


# ---- properties ---------------------------------------------------------------------------------


@given(rows())
def test_layout_byte_for_byte(kv):
    packed = fp8.quantize(kv)
    assert packed.dtype == torch.uint8 and packed.shape == (kv.shape[0], 656)
    for token in range(kv.shape[0]):
        want = expected_row(kv[token].float().tolist())
        assert bytes(packed[token].tolist()) == want, f"token {token}"


@given(rows())
def test_scales_are_powers_of_two_from_the_formula(kv):
    scales = fp8.quantize(kv)[:, 512:528].contiguous().view(torch.float32)  # [n, 4]
    for token in range(kv.shape[0]):
        for g in range(GROUPS):
            s = scales[token, g].item()
            assert math.frexp(s)[0] == 0.5, f"scale {s} is not a power of two"
            assert s == formula_scale(kv[token, g * GROUP:(g + 1) * GROUP].float().tolist())


@given(rows())
def test_error_within_half_ulp_after_scaling(kv):
    packed = fp8.quantize(kv)
    got = exact_values(packed)
    x = kv.double()
    scales = packed[:, 512:528].contiguous().view(torch.float32).double()
    scale = scales.repeat_interleave(GROUP, dim=1)
    y = x[:, :LATENT] / scale
    assert (y.abs() <= 448).all()
    err = (got[:, :LATENT] - x[:, :LATENT]).abs()
    bound = scale * half_ulp_bound(y)
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (worst, x[:, :LATENT].flatten()[worst].item(), err.flatten()[worst])
    # RoPE: the bf16 rounding of the input, nothing else
    assert torch.equal(got[:, LATENT:], kv[:, LATENT:].bfloat16().double())


@given(rows(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_dequantize_gives_the_stored_values(kv, dtype):
    packed = fp8.quantize(kv)
    exact = exact_values(packed)
    out = fp8.dequantize(packed, dtype)
    assert out.dtype == dtype and out.shape == kv.shape
    # value * scale is exact in both dtypes; only a group within 1/32 of the float32 maximum can
    # round up past it (e.g. 3.3e38 -> e4m3 256 * 2^120 = 2^128), and then reads back as inf.
    big = exact.abs() > torch.finfo(dtype).max
    assert torch.equal(out.double()[~big], exact[~big])
    assert out[big].isinf().all()


@given(rows())
def test_round_trip_is_a_projection(kv):
    once = fp8.dequantize(fp8.quantize(kv), torch.float32)
    finite = torch.isfinite(once).all(dim=-1)
    twice = fp8.dequantize(fp8.quantize(once[finite]), torch.float32)
    assert torch.equal(twice, once[finite])


@given(st.integers(0, 2), st.integers(0, ROW - 1), st.sampled_from([math.inf, -math.inf, math.nan]))
def test_non_finite_values_are_rejected(token, column, value):
    kv = torch.randn(3, ROW)
    kv[token, column] = value
    with pytest.raises(InvalidArgument) as info:
        fp8.quantize(kv)
    message = str(info.value)
    assert f"kv[{token}]" in message and f"column {column}" in message
    if column < LATENT:
        assert f"latent group {column // GROUP}" in message
    else:
        assert "RoPE" in message


def test_zero_groups_are_exact_and_take_the_smallest_scale():
    kv = torch.randn(2, ROW)
    kv[0, :GROUP] = 0
    kv[1, 3 * GROUP:LATENT] = -0.0
    packed = fp8.quantize(kv)
    back = fp8.dequantize(packed, torch.float32)
    assert (back[0, :GROUP] == 0).all() and (back[1, 3 * GROUP:LATENT] == 0).all()
    scales = packed[:, 512:528].contiguous().view(torch.float32)
    assert scales[0, 0] == 2.0**-13 and scales[1, 3] == 2.0**-13
    assert (fp8.dequantize(torch.zeros(5, 656, dtype=torch.uint8)) == 0).all()  # a fresh pool row


def test_unchecked_non_finite_poisons_only_its_group():
    kv = torch.randn(1, ROW)
    kv[0, 5] = math.inf
    back = fp8.dequantize(fp8.quantize(kv, check_finite=False), torch.float32)
    assert back[0, :GROUP].isnan().all() and torch.isfinite(back[0, GROUP:]).all()


def test_any_leading_shape_and_float8_view():
    kv = torch.randn(2, 3, 4, ROW, dtype=torch.bfloat16)
    packed = fp8.quantize(kv)
    assert packed.shape == (2, 3, 4, 656) and packed.is_contiguous()
    assert torch.equal(packed.view(-1, 656), fp8.quantize(kv.view(-1, ROW)))
    assert torch.equal(fp8.dequantize(packed.view(torch.float8_e4m3fn)), fp8.dequantize(packed))
    assert fp8.dequantize(packed).shape == kv.shape
    assert fp8.quantize(torch.empty(0, ROW)).shape == (0, 656)


def test_dequantize_reads_padded_and_unaligned_views():
    packed = fp8.quantize(torch.randn(3, 65, 1, ROW))  # 65-row pages
    view = packed[:, :64]
    assert not view.is_contiguous()
    assert torch.equal(fp8.dequantize(view), fp8.dequantize(view.contiguous()))
    raw = torch.zeros(1 + 2 * 656, dtype=torch.uint8)
    raw[1:] = packed[0, :2].reshape(-1)
    odd = raw[1:].view(2, 1, 656)  # starts at an odd byte: float32 views impossible, copied
    assert torch.equal(fp8.dequantize(odd), fp8.dequantize(packed[0, :2]))


def test_constants_describe_one_layout():
    assert (fp8.SCALES_OFFSET, fp8.ROPE_OFFSET, fp8.TOKEN_BYTES) == (512, 528, 656)
    assert fp8.HEAD_DIM == 576 and fp8.GROUP_SIZE * fp8.NUM_GROUPS == fp8.LATENT_DIM
    assert 2.0**fp8.MIN_SCALE_EXP >= fp8.SCALE_FLOOR > 2.0 ** (fp8.MIN_SCALE_EXP - 1)
    assert fp8.TOKEN_BYTES % fp8.ALIGN_BYTES == 0


@pytest.mark.parametrize("call,needle", [
    (lambda: fp8.quantize(torch.randn(2, 575)), "last dim must be 576"),
    (lambda: fp8.quantize(torch.zeros(2, 576, dtype=torch.int32)), "dtype"),
    (lambda: fp8.quantize([0.0] * 576), "torch.Tensor"),
    (lambda: fp8.quantize(torch.randn(576, 2).t()), "last dim"),
    (lambda: fp8.dequantize(torch.zeros(2, 576, dtype=torch.uint8)), "last dim must be 656"),
    (lambda: fp8.dequantize(torch.zeros(2, 656, dtype=torch.bfloat16)), "dtype"),
    (lambda: fp8.dequantize(torch.zeros(656, 2, dtype=torch.uint8).t()), "contiguous"),
])
def test_bad_input_is_a_typed_error(call, needle):
    with pytest.raises(KVPagerError, match=needle):
        call()
