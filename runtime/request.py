"""One request's state: its tokens, sampling parameters, status, pages and timings.

A request is plain data. The scheduler moves it between the waiting queue and the running batch;
the engine appends tokens and timestamps; `RequestHandle` is the read-only view users hold.

Invariants (checked by tests/runtime/test_runtime_state.py):
  status WAITING / PREEMPTED  -> seq is None (holds no pages), in the waiting queue
  status RUNNING              -> seq is not None, in the running batch
  status FINISHED / ABORTED   -> seq is None, in neither
  seq.num_tokens == num_computed (the KV of token_ids[:num_computed] is in the cache)
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import field_validator, model_validator

from kvpager.errors import RequestError, UnknownRequest
from kvpager.validation import Int, validated

if TYPE_CHECKING:
    import torch

    from kvpager import PrefixKeys, Sequence
    from kvpager.runtime.engine import Engine
    from kvpager.runtime.outputs import RequestOutput
    from kvpager.runtime.workload import Content


class Status(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, at the front of the queue, to be recomputed
    FINISHED = "finished"
    ABORTED = "aborted"


DONE = (Status.FINISHED, Status.ABORTED)
MAX_LOGPROBS = 20  # most likely tokens a request may ask logprobs of, per position


@validated(RequestError)
class SamplingParams:
    """How to pick tokens. temperature == 0 is greedy (top_k / top_p / seed ignored).

    max_new_tokens: tokens to generate at most (>= 1); stop_token_ids: a sequence of token ids
    that end the request (stored as a tuple); top_k: 0 keeps every token; top_p: 1.0 keeps
    every token; seed: the request's own torch.Generator seed in [0, 2**64), so a request
    samples the same tokens whatever batch it runs in; logprobs: None (off), 0 (the
    log-probability of each sampled token) or n <= MAX_LOGPROBS (also the n most likely tokens'),
    computed from the raw logits, before temperature / top-k / top-p (kvpager.runtime.sampling.
    token_logprobs; RequestOutput.logprobs / top_logprobs).

    Frozen and strict (kvpager.validation): a bad field raises RequestError naming it, and
    nothing is converted silently (`top_k=1.5`, `max_new_tokens="8"` are errors).
    """

    max_new_tokens: Int = 16
    stop_token_ids: tuple[Int, ...] = ()
    temperature: float = 0.0
    top_k: Int = 0
    top_p: float = 1.0
    seed: Int | None = None
    logprobs: Int | None = None

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            example = f"[{value}]" if isinstance(value, int) else "[2]"
            raise ValueError(f"stop_token_ids={value!r} must be a sequence of token ids; pass "
                             f"a list or tuple of ints, e.g. stop_token_ids={example}")
        return tuple(value)

    @model_validator(mode="after")
    def _ranges(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids} holds a negative id; token ids "
                             f"are >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter)")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed} must be in [0, 2**64) or None")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be None (off) or in [0, "
                             f"{MAX_LOGPROBS}] (0: the sampled token's only)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Timings:
    """Seconds on the engine's clock (time.perf_counter, or the simulator's virtual clock)."""

    arrival: float
    admitted: float | None = None  # first admission
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]  # empty in the simulator, which only counts tokens
    prompt_len: int
    params: SamplingParams
    timings: Timings
    on_token: Callable[[str, int], None] | None = None
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    seq: Sequence | None = None  # its pages while it runs (the scheduler's to change)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_prefill: int = 0  # tokens to prefill on this admission: prompt + output so far
    num_generated: int = 0  # == len(output_token_ids); the simulator only counts
    num_preemptions: int = 0
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error" (status ABORTED)
    generator: torch.Generator | None = None
    # With SamplingParams.logprobs: one entry per output token (the engine fills them).
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # Prefix caching (SchedulerConfig.enable_prefix_caching): the request's PrefixKeys, built
    # at submit and extended as its KV is written; `content` gives synthetic token ids in the
    # simulator, which stores none (workload.Content); next_commit: the token count at which
    # its next page fills (runtime/prefix.py).
    keys: PrefixKeys | None = None
    content: Content | None = None
    next_commit: int = 0
    # While num_generated < plain_until the next token cannot finish, stop or stream the
    # request, so the engine's decode loop records it inline (0: always take the full path).
    plain_until: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        p = self.params
        if self.on_token is None and not p.stop_token_ids:
            self.plain_until = p.max_new_tokens - 1

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_prefill

    @property
    def is_done(self) -> bool:
        return self.status in DONE

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        t = self.timings
        if t.finished is None or t.first_token is None or self.num_generated < 2:
            return None
        return (t.finished - t.first_token) / (self.num_generated - 1)


class RequestHandle:
    """What `Engine.submit` returns: a live, read-only view of one request.

    Iterating a handle streams its tokens: each `next()` returns the next generated token; while
    none is ready it waits for the serving thread's next step, or steps the engine itself (which
    advances every request) when no other thread is stepping (Engine.advance). It stops when the
    request finishes, is aborted or fails. For callbacks, pass `on_token=` to `Engine.submit`.
    Safe to use from any thread.
    """

    def __init__(self, request: Request, engine: Engine):
        self._request = request
        self._engine = engine

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def status(self) -> Status:
        return self._request.status

    @property
    def finished(self) -> bool:
        return self._request.is_done

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason

    @property
    def output_token_ids(self) -> list[int]:
        return list(self._request.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._request.output_token_ids)

    def output_token_ids_since(self, start: int) -> list[int]:
        """The tokens generated after the first `start`: O(new tokens), for streaming."""
        return self._request.output_token_ids[start:]

    def logprobs_since(self, start: int) -> tuple[list[float] | None, list[dict[int, float]] | None]:
        """The logprobs and top_logprobs of the tokens after the first `start` (None when the
        request did not ask for them): O(new tokens), for streaming."""
        r = self._request
        return (None if r.logprobs is None else r.logprobs[start:],
                None if r.top_logprobs is None else r.top_logprobs[start:])

    def output(self) -> RequestOutput:
        """A snapshot of the request as a RequestOutput (final once `finished`)."""
        from kvpager.runtime.outputs import RequestOutput

        return RequestOutput.of(self._request)

    @property
    def timings(self) -> Timings:
        return self._request.timings

    @property
    def num_preemptions(self) -> int:
        return self._request.num_preemptions

    def abort(self) -> None:
        """Abort the request; nothing happens once it has finished (even after the engine has
        forgotten it)."""
        if not self._request.is_done:
            try:
                self._engine.abort(self.request_id)
            except UnknownRequest:  # it finished and was forgotten since the check above
                if not self._request.is_done:
                    raise

    def __iter__(self) -> Iterator[int]:
        seen = 0
        while True:
            out = self._request.output_token_ids
            while seen < len(out):
                seen += 1
                yield out[seen - 1]
            if self._request.is_done:
                return
            self._engine.advance()

    def __repr__(self) -> str:
        r = self._request
        return f"RequestHandle({r.request_id!r}, {r.status.value}, {len(r.output_token_ids)} tokens)"
