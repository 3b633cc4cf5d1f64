"""argparse `type=` checks shared by the `kvpager` subcommands: a bad flag value ends in
`kvpager <command>: error: argument --flag: <why>` and exit status 2, before any work starts.

No torch here: `kvpager --help` imports this module's parent package only.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

# --kv-cache-dtype's values (kvpager demo, kvpager simulate): CacheConfig.kv_cache_dtype's
# canonical names. "fp8" is kvpager.fp8's 656-byte row and needs a bfloat16 (or float32) model.
KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPE_HELP = ("latent cache rows: auto (the model's dtype, 1,152 bytes a bf16 token) or "
                       "fp8 (656 bytes: e4m3 latents, a power-of-two scale per 128, bf16 RoPE)")


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def at_least(low: float, kind: type = float):
    """A `kind` (float or int) >= low, e.g. a mean length, which must be >= 1 token."""

    def check(text: str) -> int | float:
        value = _number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value:g} must be >= {low:g}")
        return value

    check.__name__ = f"{kind.__name__} >= {low:g}"
    return check


positive_int = at_least(1, int)
nonneg_int = at_least(0, int)
nonneg_float = at_least(0, float)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def probability(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a probability; use a value in [0, 1]")
    return value


def input_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {why}; give a file")
    return path


def output_dir(text: str) -> Path:
    """A directory to write into: new, or an existing directory (its files are replaced); in a
    place this process can write, so that a long run does not fail at its very end."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory; give a new or "
                                         f"an existing directory")
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {parent} is not a writable "
                                         f"directory")
    return path
