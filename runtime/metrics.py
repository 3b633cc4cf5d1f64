"""Per-step and per-request metrics. The simulator keeps everything, as columns (array('d'): 8
bytes a value, so a million-step simulation stays small; recording a step is a few appends); the
engine keeps bounded aggregates and latency reservoirs (`Metrics(keep_all=False)`), so a
long-running server's memory does not grow with the requests it has served."""
from __future__ import annotations

import random
from array import array

import numpy as np

from kvpager.errors import ConfigError

from kvpager.runtime.request import Request, Status

STEP_COLUMNS = (
    "time",            # clock at the end of the step (s)
    "duration",        # step time (s): measured in the engine, modelled in the simulator
    "batch_size",      # requests that did work this step (prefill chunks + decodes)
    "prefill_tokens",
    "decode_tokens",   # tokens fed to the model for decoding (B * s_q)
    "generated",       # tokens emitted to requests this step
    "pages_used",
    "pages_free",
    "preemptions",     # this step
    "waiting",         # queue length after the step
    "kv_usage_tokens",  # tokens of KV the running requests hold (shared pages once)
    "prefix_query_tokens",  # prompt tokens looked up in the prefix cache this step
    "prefix_hit_tokens",    # of those, found cached (their prefill is skipped)
    "evictions",       # cached pages evicted this step
)
SERIES = ("time", "batch_size", "page_utilisation", "waiting", "waiting_max", "preemptions",
          "throughput_tok_s", "kv_usage_tokens", "prefix_hit_rate", "prefix_hit_tokens",
          "evictions")
_TOTALS = ("preemptions", "prefix_query_tokens", "prefix_hit_tokens", "evictions")
PERCENTILES = (50, 90, 99)
RESERVOIR_SIZE = 4096  # latency samples kept per metric when not keeping everything


class Samples:
    """One latency's values: all of them (capacity None), or a uniform random sample of at most
    `capacity` (reservoir sampling: the i-th value replaces a random kept one with probability
    capacity / i), so a server running for weeks keeps O(capacity) floats. count and total are
    exact either way, so the mean is exact; percentiles from a 4096-value reservoir are within
    about a percentile point of the truth."""

    __slots__ = ("values", "count", "total", "capacity", "_rng")

    def __init__(self, capacity: int | None = None, seed: int = 0) -> None:
        self.values: list[float] = []
        self.count = 0
        self.total = 0.0
        self.capacity = capacity
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if self.capacity is None or len(self.values) < self.capacity:
            self.values.append(value)
            return
        j = self._rng.randrange(self.count)
        if j < self.capacity:
            self.values[j] = value

    def __len__(self) -> int:
        return self.count

    def summary(self) -> dict[str, float | None]:
        """mean (exact) and p50 / p90 / p99 (of the kept values)."""
        out = summarise(np.asarray(self.values, dtype=np.float64))
        if self.count:
            out["mean"] = self.total / self.count
        return out


class Metrics:
    """Run totals, per-step aggregates and per-request latencies (ttft, tpot, e2e, queued: a
    `Samples` each).

    keep_all=True (the simulator): every step's STEP_COLUMNS (`steps`, for `timeseries()`) and
    every request's latencies. keep_all=False (the engine's default: a server runs
    indefinitely): no per-step series (`steps` is None) and a RESERVOIR_SIZE reservoir per
    latency, so memory stays bounded; `summary()` gives the same fields either way.
    """

    def __init__(self, num_pages: int, keep_all: bool = True,
                 reservoir_size: int = RESERVOIR_SIZE) -> None:
        self.num_pages = num_pages
        self.keep_all = keep_all
        self.steps: dict[str, array] | None = (
            {c: array("d") for c in STEP_COLUMNS} if keep_all else None)
        cap = None if keep_all else reservoir_size
        self.ttft, self.tpot, self.e2e = Samples(cap, 1), Samples(cap, 2), Samples(cap, 3)
        self.queued = Samples(cap, 4)  # arrival -> first admission
        self.output_tokens = 0
        self.finished = 0
        self.aborted = 0  # aborted or failed (finish_reason "error")
        self.errors = 0  # failed: finish_reason "error"
        self.first_arrival: float | None = None
        # per-step aggregates: folded in by record_step, or from the columns by summary()
        self.num_steps = 0
        self.last_time = 0.0
        self.batch_size_total = 0.0
        self.pages_used_total = 0.0
        self.pages_used_max = 0.0
        self.kv_usage_total = 0.0
        self.kv_usage_max = 0.0
        self.totals = dict.fromkeys(_TOTALS, 0)  # summed per-step counts

    def record_step(self, **values: float) -> None:
        """One value per STEP_COLUMNS name: appended to the columns (keep_all), else folded
        into the aggregates (summary() reads whichever is kept)."""
        if self.steps is not None:
            for name, column in self.steps.items():
                column.append(values[name])
            return
        self.num_steps += 1
        self.last_time = values["time"]
        self.batch_size_total += values["batch_size"]
        used = values["pages_used"]
        self.pages_used_total += used
        if used > self.pages_used_max:
            self.pages_used_max = used
        kv = values["kv_usage_tokens"]
        self.kv_usage_total += kv
        if kv > self.kv_usage_max:
            self.kv_usage_max = kv
        totals = self.totals
        for name in _TOTALS:
            totals[name] += values[name]

    def record_request(self, req: Request) -> None:
        """Called once when req finishes or is aborted."""
        t = req.timings
        if self.first_arrival is None or t.arrival < self.first_arrival:
            self.first_arrival = t.arrival
        if req.status is Status.ABORTED:
            self.aborted += 1
            self.errors += req.finish_reason == "error"
            return
        self.finished += 1
        self.output_tokens += req.num_generated
        if t.first_token is not None:
            self.ttft.add(t.first_token - t.arrival)
        if t.admitted is not None:
            self.queued.add(t.admitted - t.arrival)
        self.e2e.add(t.finished - t.arrival)
        tpot = req.tpot
        if tpot is not None:
            self.tpot.add(tpot)

    def _fold_columns(self) -> None:
        """The per-step aggregates, from the columns (keep_all: record_step only appends)."""
        steps = self.steps
        used = np.frombuffer(steps["pages_used"], dtype=np.float64)
        self.num_steps = used.size
        self.last_time = steps["time"][-1] if used.size else 0.0
        self.batch_size_total = float(np.sum(steps["batch_size"]))
        self.pages_used_total = float(used.sum())
        self.pages_used_max = float(used.max()) if used.size else 0.0
        kv = np.frombuffer(steps["kv_usage_tokens"], dtype=np.float64)
        self.kv_usage_total = float(kv.sum())
        self.kv_usage_max = float(kv.max()) if kv.size else 0.0
        for name in _TOTALS:
            self.totals[name] = float(np.sum(np.frombuffer(steps[name], dtype=np.float64)))

    @property
    def preemptions(self) -> int:
        return int(self.totals["preemptions"])

    def summary(self) -> dict:
        """Totals, throughput and p50/p90/p99 (+ mean) of each latency, in seconds."""
        if self.steps is not None:
            self._fold_columns()
        n = self.num_steps
        end = self.last_time if n else 0.0
        elapsed = max(end - (self.first_arrival or 0.0), 1e-12)
        out = {
            "requests_finished": self.finished,
            "requests_aborted": self.aborted,
            "requests_failed": self.errors,
            "output_tokens": self.output_tokens,
            "steps": n,
            "elapsed_s": elapsed,
            "throughput_tok_s": self.output_tokens / elapsed,
            "throughput_req_s": self.finished / elapsed,
            "preemptions": int(self.preemptions),
            "mean_batch_size": self.batch_size_total / n if n else 0.0,
            "page_utilisation_mean": self.pages_used_total / n / self.num_pages if n else 0.0,
            "page_utilisation_max": self.pages_used_max / self.num_pages if n else 0.0,
            "kv_usage_tokens_mean": self.kv_usage_total / n if n else 0.0,
            "kv_usage_tokens_max": int(self.kv_usage_max),
            "prefix_query_tokens": int(self.totals["prefix_query_tokens"]),
            "prefix_hit_tokens": int(self.totals["prefix_hit_tokens"]),
            "prefix_hit_rate": _rate(self.totals["prefix_hit_tokens"],
                                     self.totals["prefix_query_tokens"]),
            "evictions": int(self.totals["evictions"]),
        }
        for name in ("ttft", "tpot", "e2e", "queued"):
            out[name] = getattr(self, name).summary()
        return out

    def timeseries(self, bins: int = 1000) -> dict[str, list[float]]:
        """Per-step columns over `bins` equal time bins (empty bins dropped): time (bin centre,
        s), batch_size (mean), page_utilisation (mean, 0..1), waiting (mean queue length),
        waiting_max (the longest queue seen in the bin), preemptions (sum), throughput_tok_s,
        kv_usage_tokens (mean), prefix_hit_rate (hit / query tokens of the bin's admissions;
        None in a bin that admitted nothing), prefix_hit_tokens and evictions (sums).
        Needs keep_all=True."""
        if self.steps is None:
            raise ConfigError("this Metrics keeps no per-step series (keep_all=False, the "
                              "engine's default); build it with keep_all=True for timeseries()")
        t = np.frombuffer(self.steps["time"], dtype=np.float64)
        if t.size == 0:
            return {k: [] for k in SERIES}
        edges = np.linspace(t[0], t[-1] + 1e-9, bins + 1)
        which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        keep = count > 0

        def column(name: str) -> np.ndarray:
            return np.frombuffer(self.steps[name], dtype=np.float64)

        def total(name: str) -> np.ndarray:
            return np.bincount(which, weights=column(name), minlength=bins)[keep]

        waiting_max = np.zeros(bins)
        np.maximum.at(waiting_max, which, column("waiting"))
        width = edges[1] - edges[0]
        query, hits = total("prefix_query_tokens"), total("prefix_hit_tokens")
        return {
            "time": ((edges[:-1] + edges[1:]) / 2)[keep].tolist(),
            "batch_size": (total("batch_size") / count[keep]).tolist(),
            "page_utilisation": (total("pages_used") / count[keep] / self.num_pages).tolist(),
            "waiting": (total("waiting") / count[keep]).tolist(),
            "waiting_max": waiting_max[keep].tolist(),
            "preemptions": total("preemptions").tolist(),
            "throughput_tok_s": (total("generated") / width).tolist(),
            "kv_usage_tokens": (total("kv_usage_tokens") / count[keep]).tolist(),
            "prefix_hit_rate": [float(h / q) if q else None for h, q in zip(hits, query)],
            "prefix_hit_tokens": hits.tolist(),
            "evictions": total("evictions").tolist(),
        }


def _rate(part: float, whole: float) -> float:
    return float(part / whole) if whole else 0.0


def summarise(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    pct = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}}
