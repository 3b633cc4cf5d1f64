"""Per-step and per-request metrics, kept as columns (array('d'): 8 bytes a value, so a
million-step simulation stays small) so recording a step is a few appends; summarised into
percentiles at the end."""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np

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
)
PERCENTILES = (50, 90, 99)


@dataclass
class Metrics:
    num_pages: int
    steps: dict[str, array] = field(default_factory=lambda: {c: array("d") for c in STEP_COLUMNS})
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)  # arrival -> first admission
    output_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    first_arrival: float | None = None

    def record_step(self, **values: float) -> None:
        """One value per STEP_COLUMNS name."""
        for name, column in self.steps.items():
            column.append(values[name])

    def record_request(self, req: Request) -> None:
        """Called once when req finishes or is aborted."""
        t = req.timings
        if self.first_arrival is None or t.arrival < self.first_arrival:
            self.first_arrival = t.arrival
        if req.status is Status.ABORTED:
            self.aborted += 1
            return
        self.finished += 1
        self.output_tokens += req.num_generated
        if t.first_token is not None:
            self.ttft.append(t.first_token - t.arrival)
        if t.admitted is not None:
            self.queued.append(t.admitted - t.arrival)
        self.e2e.append(t.finished - t.arrival)
        tpot = req.tpot
        if tpot is not None:
            self.tpot.append(tpot)

    def summary(self) -> dict:
        """Totals, throughput and p50/p90/p99 (+ mean) of each latency, in seconds."""
        steps = self.steps
        end = steps["time"][-1] if steps["time"] else 0.0
        elapsed = max(end - (self.first_arrival or 0.0), 1e-12)
        used = np.asarray(steps["pages_used"], dtype=np.float64)
        out = {
            "requests_finished": self.finished,
            "requests_aborted": self.aborted,
            "output_tokens": self.output_tokens,
            "steps": len(steps["time"]),
            "elapsed_s": elapsed,
            "throughput_tok_s": self.output_tokens / elapsed,
            "throughput_req_s": self.finished / elapsed,
            "preemptions": int(sum(steps["preemptions"])),
            "mean_batch_size": float(np.mean(steps["batch_size"])) if steps["time"] else 0.0,
            "page_utilisation_mean": float(used.mean() / self.num_pages) if used.size else 0.0,
            "page_utilisation_max": float(used.max() / self.num_pages) if used.size else 0.0,
        }
        for name in ("ttft", "tpot", "e2e", "queued"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            out[name] = summarise(values)
        return out


    def timeseries(self, bins: int = 1000) -> dict[str, list[float]]:
        """Per-step columns averaged over `bins` equal time bins (empty bins dropped): time
        (bin centre, s), batch_size, page_utilisation (0..1), waiting, throughput_tok_s."""
        t = np.frombuffer(self.steps["time"], dtype=np.float64)
        if t.size == 0:
            return {k: [] for k in ("time", "batch_size", "page_utilisation", "waiting", "throughput_tok_s")}
        edges = np.linspace(t[0], t[-1] + 1e-9, bins + 1)
        which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        keep = count > 0

        def mean(name: str) -> np.ndarray:
            col = np.frombuffer(self.steps[name], dtype=np.float64)
            return np.bincount(which, weights=col, minlength=bins)[keep] / count[keep]

        generated = np.bincount(which, weights=np.frombuffer(self.steps["generated"]), minlength=bins)
        width = edges[1] - edges[0]
        return {
            "time": ((edges[:-1] + edges[1:]) / 2)[keep].tolist(),
            "batch_size": mean("batch_size").tolist(),
            "page_utilisation": (mean("pages_used") / self.num_pages).tolist(),
            "waiting": mean("waiting").tolist(),
            "throughput_tok_s": (generated[keep] / width).tolist(),
        }


def summarise(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    pct = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}}
