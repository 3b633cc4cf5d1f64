"""Workloads for the simulator: arrays of (arrival s, prompt_len, output_len), sorted by arrival.

Synthetic: Poisson arrivals (exponential gaps) or bursty ones (gamma gaps with the same mean and
coefficient of variation `burstiness` > 1: clumps of arrivals, then lulls); lengths lognormal
(given mean, shape sigma) or uniform on [mean/2, 3*mean/2]. Traces: CSV with a header naming
arrival, prompt_len, output_len, or JSONL with those keys, or the Mooncake format (JSONL with
timestamp in ms, input_length, output_length, hash_ids). Workloads with shared content (chat,
system prompts, Mooncake traces) carry each request's synthetic tokens (runtime/shared_prefix.py).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvpager.errors import ConfigError, InvalidArgument
from kvpager.runtime.shared_prefix import Content, mooncake_rows

FIELDS = ("arrival", "prompt_len", "output_len")


@dataclass
class Workload:
    arrival: np.ndarray     # float64 [n], seconds, non-decreasing
    prompt_len: np.ndarray  # int64 [n], >= 1
    output_len: np.ndarray  # int64 [n], >= 1
    content: list[Content] | None = None  # per request (prefix caching); None: all unique

    def __len__(self) -> int:
        return len(self.arrival)


def synthetic(num_requests: int, rate: float, seed: int = 0, arrivals: str = "poisson",
              burstiness: float = 4.0, length_dist: str = "lognormal", prompt_mean: float = 512,
              output_mean: float = 128, sigma: float = 1.0, max_len: int | None = None) -> Workload:
    """num_requests at `rate` per second on average. Lengths are clipped to [1, max_len]."""
    if num_requests <= 0 or rate <= 0:
        raise ConfigError(f"num_requests={num_requests} and rate={rate} must be > 0")
    rng = np.random.default_rng(seed)
    if arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate, num_requests)
    elif arrivals == "bursty":
        if not 0.01 <= burstiness <= 100:
            raise ConfigError(f"burstiness={burstiness} must be in [0.01, 100] (the coefficient "
                              f"of variation of the gaps: 1 = Poisson, > 1 = bursty)")
        shape = 1.0 / burstiness**2  # gamma CV = 1/sqrt(shape)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), num_requests)
    else:
        raise ConfigError(f"arrivals={arrivals!r}: use 'poisson' or 'bursty'")
    prompt = _lengths(rng, length_dist, prompt_mean, sigma, num_requests, max_len)
    output = _lengths(rng, length_dist, output_mean, sigma, num_requests, max_len)
    return Workload(np.cumsum(gaps) - gaps[0], prompt, output)


def _lengths(rng: np.random.Generator, dist: str, mean: float, sigma: float, n: int,
             max_len: int | None) -> np.ndarray:
    if mean < 1:
        raise ConfigError(f"mean length {mean} must be >= 1")
    if dist == "lognormal":
        values = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
    elif dist == "uniform":
        values = rng.uniform(mean / 2, 1.5 * mean, n)
    else:
        raise ConfigError(f"length distribution {dist!r}: use 'lognormal' or 'uniform'")
    return np.clip(np.rint(values), 1, max_len or np.inf).astype(np.int64)


def load_trace(path: str | Path) -> Workload:
    """CSV (header: arrival,prompt_len,output_len; other columns ignored) or JSONL (.jsonl /
    .ndjson, one object per line with those keys). Rows are sorted by arrival."""
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"trace {path} does not exist")
    try:
        if path.suffix in (".jsonl", ".ndjson"):
            with path.open() as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (ValueError, csv.Error) as exc:  # bad JSON, not UTF-8 text, a malformed CSV
        raise InvalidArgument(f"trace {path} cannot be read as "
                              f"{'JSONL' if path.suffix in ('.jsonl', '.ndjson') else 'CSV'}: "
                              f"{exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise InvalidArgument(f"trace {path}: every JSONL line must be an object with keys "
                              f"{list(FIELDS)}")
    if not rows:
        raise InvalidArgument(f"trace {path} has no rows")
    if "hash_ids" in rows[0]:  # Mooncake
        arrival, prompt, output, content = mooncake_rows(rows, path)
        _check_lengths(path, arrival, prompt, output)
        order = np.argsort(arrival, kind="stable")
        return Workload(arrival[order], prompt[order], output[order],
                        [content[i] for i in order.tolist()])
    missing = [k for k in FIELDS if k not in rows[0]]
    if missing:
        raise InvalidArgument(f"trace {path} lacks {missing}; columns must include {list(FIELDS)}")
    try:
        arrival = np.array([float(r["arrival"]) for r in rows])
        prompt = np.array([int(r["prompt_len"]) for r in rows], dtype=np.int64)
        output = np.array([int(r["output_len"]) for r in rows], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"trace {path}: {exc}") from None
    _check_lengths(path, arrival, prompt, output)
    order = np.argsort(arrival, kind="stable")
    return Workload(arrival[order], prompt[order], output[order])


def _check_lengths(path: Path, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> None:
    if (prompt < 1).any() or (output < 1).any() or not np.isfinite(arrival).all():
        raise InvalidArgument(f"trace {path}: prompt and output lengths must be >= 1, arrivals "
                              f"finite")
