"""The FP8 latent cache row: 656 bytes a token, DeepSeek's layout (the field's, byte for byte).

One token's 576-wide latent row [512 latent | 64 RoPE] is stored as

    bytes   0..511   512 float8_e4m3fn values: latent[j] / scale[j // 128]
    bytes 512..527   4 float32 scales, one per 128-value group, little-endian
    bytes 528..655   the 64 RoPE values as bfloat16, unquantized

Each scale is a power of two, scale = 2^ceil(log2(max(amax / 448, 1e-4))) with amax the group's
largest |value|, so dequantization (value * scale) is exact in bfloat16 and a cache written by
the field's quantizer reads the same here. The smallest scale is 2^-13 (1e-4 lies in
(2^-14, 2^-13]); a group of zeros is stored exactly.

This module is the one home of the layout constants in Python.
"""
from __future__ import annotations

import torch

from kvpager.errors import InvalidArgument

LATENT_DIM = 512  # quantized part of a row (also V's width)
ROPE_DIM = 64  # bf16 tail of a row
HEAD_DIM = LATENT_DIM + ROPE_DIM  # 576: the unpacked row width
GROUP_SIZE = 128  # latent values per scale
NUM_GROUPS = LATENT_DIM // GROUP_SIZE  # 4
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-4  # lower bound of amax / FP8_MAX before rounding up to a power of two
MIN_SCALE_EXP = -13  # ceil(log2(SCALE_FLOOR)): the exponent of the smallest scale
SCALES_OFFSET = LATENT_DIM  # 512: byte offset of the scales
ROPE_OFFSET = SCALES_OFFSET + 4 * NUM_GROUPS  # 528: byte offset of the RoPE values
TOKEN_BYTES = ROPE_OFFSET + 2 * ROPE_DIM  # 656 bytes a token
ALIGN_BYTES = 16  # strides and base address of a packed cache (TMA / 16-byte vector loads)
PACKED_DTYPES = (torch.uint8, torch.float8_e4m3fn)  # dtypes a packed cache may come in
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

_FLOAT32_BIAS, _FLOAT32_MANTISSA_BITS = 127, 23


def quantize(kv: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
    """Pack latent rows into FP8 cache rows.

    kv: [..., 576] bfloat16 | float16 | float32 (512 latent + 64 RoPE), any device; float64 is
    rounded to float32 first.
    Returns uint8 [..., 656] on kv's device, contiguous (layout in the module docstring).
    Vectorised: a few elementwise kernels over kv, no loop over tokens.

    check_finite: reject ±inf / NaN with InvalidArgument naming the token and group. The check
    reads one flag back to the host (a device sync on a GPU). With check_finite=False a
    non-finite latent value makes its whole 128-value group NaN (scale included) and a
    non-finite RoPE value is stored as it is.
    """
    _check_rows(kv, "kv", INPUT_DTYPES, HEAD_DIM, "the latent row (512 latent + 64 RoPE)")
    if check_finite:
        _check_finite(kv)
    latent = kv[..., :LATENT_DIM].float().unflatten(-1, (NUM_GROUPS, GROUP_SIZE))
    scales = _power_of_two_scales(latent.abs().amax(dim=-1))  # [..., 4]
    values = (latent / scales.unsqueeze(-1)).to(torch.float8_e4m3fn)  # exact division: 2^k
    out = torch.empty(*kv.shape[:-1], TOKEN_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :SCALES_OFFSET] = values.flatten(-2).view(torch.uint8)
    out[..., SCALES_OFFSET:ROPE_OFFSET] = scales.view(torch.uint8)
    out[..., ROPE_OFFSET:] = kv[..., LATENT_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Unpack FP8 cache rows.

    packed: [..., 656] uint8 (or float8_e4m3fn holding the same bytes), last dim contiguous.
    Returns [..., 576] in `dtype` on packed's device: value * scale for the latent part (exact in
    bfloat16 and float32), the stored bfloat16 RoPE values. Reads strided views of `packed`
    (a padded page stride is fine); copies it first only if its strides are not 4-byte multiples.
    """
    _check_rows(packed, "packed", PACKED_DTYPES, TOKEN_BYTES, "an FP8 cache row")
    raw = packed.view(torch.uint8)
    if raw.storage_offset() % 4 or any(s % 4 for s in raw.stride()[:-1]):
        raw = raw.clone(memory_format=torch.contiguous_format)  # float32 views need 4-byte rows
    values = raw[..., :SCALES_OFFSET].view(torch.float8_e4m3fn).float()
    scales = raw[..., SCALES_OFFSET:ROPE_OFFSET].view(torch.float32)
    rope = raw[..., ROPE_OFFSET:].view(torch.bfloat16)
    out = torch.empty(*packed.shape[:-1], HEAD_DIM, dtype=dtype, device=packed.device)
    latent = values.unflatten(-1, (NUM_GROUPS, GROUP_SIZE)) * scales.unsqueeze(-1)
    out[..., :LATENT_DIM] = latent.flatten(-2)
    out[..., LATENT_DIM:] = rope
    return out


def _power_of_two_scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales 2^ceil(log2(max(amax / 448, 1e-4))) for group maxima `amax` (float32, >= 0).

    Computed exactly: the exponent comes from frexp (no log2 rounding), and the scale is built
    from its float32 bit pattern, so every device gives the same bits. amax / 448 rounded to
    float32 never crosses a power of two, so the rounding of that division cannot move the scale.
    """
    ratio = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)  # max(amax / 448, 1e-4); NaN stays NaN
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)  # exact powers of two stay put
    bits = (ceil_log2.to(torch.int32) + _FLOAT32_BIAS) << _FLOAT32_MANTISSA_BITS
    return torch.where(torch.isfinite(amax), bits.view(torch.float32), torch.nan)


def _check_rows(t: object, name: str, dtypes: tuple, width: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " | ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InvalidArgument(f"{name} has dtype {t.dtype}; use {names}")
    if t.dim() < 1 or t.shape[-1] != width:
        raise InvalidArgument(f"{name} has shape {tuple(t.shape)}; its last dim must be {width} "
                              f"({what})")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise InvalidArgument(f"{name}'s last dim must be contiguous (stride 1, got "
                              f"{t.stride(-1)}); call .contiguous()")


def _check_finite(kv: torch.Tensor) -> None:
    bad = ~torch.isfinite(kv)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    token, column = index[:-1], index[-1]
    value = kv[index].item()
    part = (f"latent group {column // GROUP_SIZE} (columns {column // GROUP_SIZE * GROUP_SIZE}.."
            f"{column // GROUP_SIZE * GROUP_SIZE + GROUP_SIZE - 1})" if column < LATENT_DIM
            else "the RoPE part")
    raise InvalidArgument(f"kv{list(token)} holds {value} at column {column}, in {part}; an FP8 "
                          f"cache stores finite values only: fix the producer of this row")
