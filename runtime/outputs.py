"""What a finished (or streaming) request hands back: its tokens, why it ended, and how long each
phase took. Plain frozen data, safe to pass between threads and event loops."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvpager.runtime.request import Request


@dataclass(frozen=True)
class OutputTimings:
    """Seconds on the engine's clock; None until the phase happened.

    queue: arrival -> first admission; ttft: arrival -> first token; tpot: mean time per output
    token after the first; e2e: arrival -> finish."""

    queue: float | None
    ttft: float | None
    tpot: float | None
    e2e: float | None


@dataclass(frozen=True)
class RequestOutput:
    """A request's result. finish_reason: "length" | "stop" | "abort" | "error", or None while
    it runs. logprobs[i] is the log-probability of token_ids[i] under the model's distribution
    (before temperature / top-k / top-p); top_logprobs[i] maps the n most likely token ids to
    theirs (SamplingParams.logprobs = n > 0). Both are None unless SamplingParams asked for
    them (kvpager.runtime.sampling.token_logprobs says how they are computed)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: str | None
    timings: OutputTimings
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[dict[int, float], ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        """Snapshot of req. O(prompt + output tokens)."""
        t = req.timings
        queue = None if t.admitted is None else t.admitted - t.arrival
        logprobs, top = req.logprobs, req.top_logprobs
        return cls(
            request_id=req.request_id, prompt_token_ids=tuple(req.prompt_token_ids),
            token_ids=tuple(req.output_token_ids), finish_reason=req.finish_reason,
            timings=OutputTimings(queue=queue, ttft=t.ttft, tpot=req.tpot, e2e=t.e2e),
            logprobs=None if logprobs is None else tuple(logprobs),
            top_logprobs=None if top is None else tuple(top))


@dataclass(frozen=True)
class StreamChunk:
    """One item of `async for chunk in stream`: the tokens generated since the previous chunk
    (and their logprobs / top_logprobs when SamplingParams asked, else None); the last chunk has
    finished=True and carries the whole RequestOutput."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    output: RequestOutput | None = None
    new_logprobs: tuple[float, ...] | None = None
    new_top_logprobs: tuple[dict[int, float], ...] | None = None

    @property
    def finish_reason(self) -> str | None:
        return None if self.output is None else self.output.finish_reason
