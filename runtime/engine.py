"""The continuous-batching engine: submit / abort at any time, `step()` runs one scheduled step
through the model, `generate()` runs an offline batch to completion.

One step: the scheduler plans (admissions, chunks, preemptions, page appends); the prefill chunks
share model calls (a PrefillBatch: varlen chunks left-padded to the call's longest, causal,
grouped so that padding stays bounded: runtime/prefill.py; or one call per chunk with
SchedulerConfig(batched_prefill=False)); all decoding requests are one model call with the block
table, cache_seqlens and MLA metadata computed once; the engine samples (and computes the
logprobs requests asked for), appends tokens, and retires finished requests, freeing their pages
before the step returns.

MTP / speculative mode (num_speculative_tokens = k > 0): each decode row is the last token plus k
draft tokens proposed by prompt lookup (the longest recent n-gram match in the request's own
tokens; model-free). The model returns logits for all 1 + k positions; drafts are accepted while
they equal the token sampled at the previous position, so the output is exactly what one-token
decoding would produce, one or more tokens per step.

Failures (a model call, the sampler or an on_token callback raising, NaN logits, a device
error) end exactly the requests the failed work was for, with finish_reason "error", and the
step goes on for everyone else: see Engine.

This file wires the pieces and runs the step loop: intake.py takes requests in (checks, ids,
queueing, the registry), model_runner.py makes the model calls (tables, inputs, sampling, MTP),
bookkeeping.py records what they produced, step_gate.py lets other threads in.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq

import torch

from kvpager import BlockAllocator, CacheConfig, PagePool
from kvpager.errors import ConfigError
from kvpager.runtime.bookkeeping import Bookkeeping
from kvpager.runtime.checks import check_engine_args, warn_cpu_threads
from kvpager.runtime.intake import Intake
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.model_runner import ModelRunner
from kvpager.runtime.models.protocol import Model
from kvpager.runtime.outputs import RequestOutput
from kvpager.runtime.request import Request, RequestHandle, SamplingParams, Status
from kvpager.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan
from kvpager.runtime.step_gate import StepGate


class Engine:
    """The serving loop's state: pool, allocator, scheduler, decode tables and the requests.

    Memory stays bounded however long it serves: `requests` holds the unfinished requests and
    only the last `retain_finished` finished ones (a finished request's callback and generator
    are dropped at once; its handle keeps the outputs), and `metrics` keeps aggregates and
    latency reservoirs, not per-step series (`full_metrics=True` keeps those, as the simulator
    does).

    A failing step changes nothing for the requests it did not fail for. Each piece of model
    work is a unit (runtime/model_runner.py): one prefill call (its chunks), or the whole
    decode batch (one call, its MLA metadata and inputs included). When a unit raises (a model
    bug, a device error), the requests it computed for end with status ABORTED and
    finish_reason "error"; a row with NaN logits, or whose sampler raised, ends the same way,
    alone; so does a request whose on_token callback raised. Their pages and decode rows are
    freed before step() returns, they emit no token of the failed step, and every other request
    continues as if nothing happened (its KV and tokens were never touched).

    Threads: submit(), abort() and generate() are safe from any thread, and step() from any
    one thread at a time (others wait), all through a StepGate (runtime/step_gate.py). A
    submit or abort made while no other thread is inside step() applies before it returns (an
    abort frees the pages at once, as in a single-threaded program); one made during another
    thread's step is posted and applied at that step's end, so it never waits for a whole step
    and the step never sees a half-applied change. Iterating a RequestHandle, or generate(),
    waits for the serving thread's next step when another thread is stepping, and steps itself
    when nobody is. step() from inside a step (an on_token callback) raises ReentrantStep, so
    a callback cannot break its request's limits. Callbacks run on the stepping thread.

    On the CPU, torch's default intra-op threads make small models (the tiny test model, the
    demo) slow on a busy machine; the first CPU engine of a process logs a warning when torch
    uses more than one thread (README, "Threads").
    """

    def __init__(self, model: Model, cache_config: CacheConfig,
                 config: SchedulerConfig | None = None, clock: Callable[[], float] = time.perf_counter,
                 *, retain_finished: int = 1024, full_metrics: bool = False):
        check_engine_args(model, cache_config, config, clock, retain_finished, full_metrics)
        self.config = config = config or SchedulerConfig()
        if model.num_layers != cache_config.num_layers:
            raise ConfigError(f"model has {model.num_layers} layers but CacheConfig.num_layers="
                              f"{cache_config.num_layers}; build the cache for the model")
        self.cache_config, self.clock = cache_config, clock
        self.pool = PagePool(cache_config)
        ps = self.page_size = cache_config.page_size
        self.allocator = BlockAllocator(cache_config.resolved_num_pages, ps)
        self.scheduler = Scheduler(config, self.allocator, ps)
        self.max_pages = self.scheduler.max_pages
        self.device = device = torch.device(cache_config.device)
        self._gate = StepGate()  # other threads' way in (runtime/step_gate.py)
        self.intake = Intake(model.vocab_size, config, self.allocator.num_pages, ps, clock,
                             device, self.scheduler, self._gate, retain_finished)
        # The same objects as the intake's and the runner's, under the names users know.
        self.requests, self.retain_finished = self.intake.requests, retain_finished
        self.runner = ModelRunner(model, self.pool, config, self.max_pages, device, self.intake)
        self.decode_tables = self.runner.decode_tables
        self.metrics = Metrics(self.allocator.num_pages, keep_all=full_metrics)
        self.book = Bookkeeping(self.scheduler, self.metrics, clock, self._on_retire)
        if device.type == "cpu":
            warn_cpu_threads()

    # --- public API --------------------------------------------------------------------------

    @property
    def model(self) -> Model:
        """The model the engine calls (the runner's). Assignable, e.g. a CUDA-graph wrapper of the
        same Protocol (examples/deepseek/cuda_graph.py): the next model call uses it."""
        return self.runner.model

    @model.setter
    def model(self, model: Model) -> None:
        self.runner.model = model

    def submit(self, prompt_token_ids: Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None, on_token: Callable[[str, int], None] | None = None,
               arrival_time: float | None = None) -> RequestHandle:
        """Queue a request; raises RequestError subclasses for bad input, nothing else changes.
        Safe from any thread.

        prompt_token_ids: ints in [0, vocab_size) (a list, or an integer numpy array / torch
        tensor); params: a SamplingParams (default: greedy, 16 tokens); request_id: a str not
        in use (default: a fresh id, never one in use); on_token(request_id, token): called for
        every generated token, in order, on the stepping thread (a callback that raises ends its
        request with finish_reason "error"); arrival_time: a finite number on the engine's clock
        (default: now)."""
        req = self.intake.prepare(prompt_token_ids, params, request_id, on_token, arrival_time)
        self.intake.enqueue([req])
        return RequestHandle(req, self)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; aborting a finished request does nothing. Safe
        from any thread: applied before it returns unless another thread is inside step(), and
        then at that step's end."""
        with self._gate.lock:
            req = self.intake.find(request_id)
            self._gate.apply_or_post(lambda: self._abort_now(req))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._gate.posted)

    def load(self) -> dict[str, int]:
        """How busy the engine is now: running and waiting requests, pages used and in the
        pool, and kv_tokens (tokens whose KV is cached for running requests). O(running).
        Approximate while another thread steps."""
        running = list(self.scheduler.running)
        return {"running": len(running), "waiting": len(self.scheduler.waiting),
                "pages_used": self.allocator.num_used, "pages_total": self.allocator.num_pages,
                "kv_tokens": sum(r.num_computed for r in running)}

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (with anything already queued); their RequestOutputs
        (tokens, finish reason, logprobs if asked, timings), in order.
        All or nothing: every prompt and params is checked before any is queued. If waiting is
        interrupted (KeyboardInterrupt), its requests are aborted."""
        reqs = self.intake.prepare_batch(prompts, params)
        self.intake.enqueue(reqs)
        handles = [RequestHandle(r, self) for r in reqs]
        try:
            for h in handles:
                while not h.finished:
                    self.advance()
        except BaseException:
            for h in handles:
                h.abort()
            raise
        return [h.output() for h in handles]

    def advance(self) -> None:
        """Make progress for a thread that waits for tokens: wait for the end of the next step
        when another thread is serving (it stepped last), else step() (StepGate.wait_for_step)."""
        if not self._gate.wait_for_step():
            self.step()

    def step(self) -> StepPlan:
        """Plan and run one step; returns the plan (what ran, what was preempted). Model,
        sampler and callback failures end only their requests (see the class docstring).
        ReentrantStep from inside a step; another thread's call waits for this one.

        Per-request Python for a one-token decode row (the hot case at large batches): one
        pass in the scheduler, one to gather input ids, one to take the sampled token
        (Bookkeeping.take_decoded); the decode tables cost O(changed rows)
        (ModelRunner.advance_decode_rows). Measured by `kvpager bench scheduler`."""
        return self._gate.run_step(self._step)

    # --- the step ---------------------------------------------------------------------------
    def _step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        runner, book = self.runner, self.book
        runner.apply_copies(plan)
        runner.advance_decode_rows(plan)
        started = now = self.clock()
        failed: list[Request] = []  # requests whose model work or sampling failed this step
        new_tokens: list[tuple[Request, list[int]]] = []
        if plan.prefill:
            new_tokens = runner.prefill(plan.prefill, failed)
            for req, _, n in plan.prefill:
                book.prefilled(req, n, now)
        decoded = runner.decode(failed)
        now = self.clock()
        for req in failed:  # first: they get no token of this step, and their pages go back
            if not req.is_done:
                book.retire(req, Status.ABORTED, "error", now)
        generated = 0
        # Emit only once every model call is done: a callback may abort any request.
        for req, tokens in new_tokens:
            generated += book.emit(req, tokens, now)
            if req.status is Status.RUNNING:  # its prefill is done
                runner.join(req)
        if decoded is not None:
            generated += runner.take_decoded(decoded, book, now)
        runner.record_logprobs()
        book.end_step(plan, now, now - started, generated)
        return plan

    def _abort_now(self, req: Request) -> None:
        if req.is_done:
            return
        running = req.status is Status.RUNNING
        self.book.retire(req, Status.ABORTED, "abort", self.clock())
        if running:
            self.scheduler.remove_running(req)

    def _on_retire(self, req: Request) -> None:
        self.runner.leave(req)
        self.intake.retired(req)
