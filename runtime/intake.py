"""Intake: the engine's requests, and the way in for new ones (submit, generate, abort).

Invariants, whenever the step gate's lock is free:
  - `requests` maps the id of every unfinished request to it, plus the ids of the last
    `retain_finished` finished ones (`finished`, oldest first); an id the engine picks is never
    one in it, and a finished request in it has no callback or generator left.
  - `num_sampling` / `num_logprobs` count the unfinished requests that do not decode greedily /
    that asked for logprobs (the model runner skips per-request work while they are 0).
  - Nothing changes on bad input: prepare() and prepare_batch() check everything and build
    Requests without touching the engine; enqueue() queues a batch all or none.
  - A queued request reaches the scheduler before enqueue() returns, unless another thread is
    inside step(): then at that step's end (StepGate.apply_or_post).
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence as Seq

import torch

from kvpager.errors import DuplicateRequest, RequestError, UnknownRequest
from kvpager.runtime.checks import check_prompt, check_request_id, check_submit_args
from kvpager.runtime.request import Request, SamplingParams, Timings
from kvpager.runtime.sampling import make_generator
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, check_fits
from kvpager.runtime.step_gate import StepGate


class Intake:
    def __init__(self, vocab_size: int, config: SchedulerConfig, num_pages: int, page_size: int,
                 clock: Callable[[], float], device: torch.device, scheduler: Scheduler,
                 gate: StepGate, retain_finished: int) -> None:
        self.vocab_size, self.config, self.clock, self.device = vocab_size, config, clock, device
        self.num_pages, self.page_size = num_pages, page_size
        self.scheduler, self.gate, self.retain_finished = scheduler, gate, retain_finished
        self.requests: dict[str, Request] = {}
        self.finished: deque[str] = deque()
        self.num_sampling = 0
        self.num_logprobs = 0
        self._ids = itertools.count()

    def prepare(self, prompt_token_ids: object, params: object, request_id: object,
                on_token: object, arrival_time: object) -> Request:
        """A checked Request, not yet queued (request_id None: enqueue picks one)."""
        params = SamplingParams() if params is None else params
        prompt = check_prompt(prompt_token_ids, self.vocab_size)
        check_submit_args(params, request_id, on_token, arrival_time)
        check_fits(len(prompt), params.max_new_tokens, self.config, self.num_pages, self.page_size)
        req = Request(request_id, prompt, len(prompt), params,
                      Timings(self.clock() if arrival_time is None else float(arrival_time)),
                      on_token=on_token, generator=make_generator(params, self.device))
        if params.logprobs is not None:
            req.logprobs = []
            req.top_logprobs = [] if params.logprobs else None
        return req

    def prepare_batch(self, prompts: object, params: object) -> list[Request]:
        """generate()'s requests: prompts a list of prompts, params one SamplingParams (or None)
        for all or a list of one per prompt; every one is checked before any is returned."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise RequestError(f"prompts={prompts!r:.40} must be a list of prompts (lists of "
                               f"token ids)")
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, Iterable):
            raise RequestError(f"params={params!r:.40} must be a SamplingParams, None, or a "
                               f"list of one per prompt")
        elif len(params := list(params)) != len(prompts):
            raise RequestError(f"params holds {len(params)} SamplingParams for {len(prompts)} "
                               f"prompts; pass one per prompt, or one for all")
        return [self.prepare(p, sp, None, None, None) for p, sp in zip(prompts, params)]

    def enqueue(self, reqs: Seq[Request]) -> None:
        """Queue reqs, all or none: DuplicateRequest if an id is in use (or repeated)."""
        with self.gate.lock:
            chosen = [r.request_id for r in reqs if r.request_id is not None]
            for request_id in chosen:
                if request_id in self.requests or chosen.count(request_id) > 1:
                    raise DuplicateRequest(f"request id {request_id!r} was already submitted; "
                                           f"use a new id")
            for req in reqs:
                if req.request_id is None:
                    req.request_id = str(next(self._ids))
                    while req.request_id in self.requests:  # never one a user chose
                        req.request_id = str(next(self._ids))
                self.requests[req.request_id] = req
                self.num_sampling += not req.params.greedy
                self.num_logprobs += req.params.logprobs is not None

            def add() -> None:
                for req in reqs:
                    self.scheduler.add(req)
            self.gate.apply_or_post(add)

    def find(self, request_id: object) -> Request:
        """The request abort() names (call with the gate's lock held): RequestError for a
        non-str id, UnknownRequest for one never submitted or forgotten."""
        check_request_id(request_id)
        req = self.requests.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request with id {request_id!r} is known: it was never "
                                 f"submitted, or it finished more than retain_finished="
                                 f"{self.retain_finished} requests ago")
        return req

    def retired(self, req: Request) -> None:
        """req finished or was aborted: it leaves the counts, drops its callback and generator,
        and is forgotten once retain_finished newer ones have finished (its handle keeps the
        outputs). O(1)."""
        with self.gate.lock:  # submit() on another thread changes these
            self.num_sampling -= not req.params.greedy
            self.num_logprobs -= req.params.logprobs is not None
            req.on_token = None
            req.generator = None
            finished = self.finished
            finished.append(req.request_id)
            if len(finished) > self.retain_finished:
                del self.requests[finished.popleft()]
