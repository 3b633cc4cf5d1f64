"""AsyncEngine: an Engine stepped by one background thread, for asyncio servers.

    async with AsyncEngine(engine, max_waiting=256) as aengine:
        stream = await aengine.submit(prompt_ids, SamplingParams(max_new_tokens=64))
        async for chunk in stream:          # StreamChunk: new tokens, then the final output
            send(chunk.new_token_ids)
        print(stream.output.finish_reason)

Threading model: the step thread is the only thread that touches the Engine. submit() and
abort() post commands to it (from any coroutine, or any thread for abort) and it applies them
between steps, so a step never sees a half-applied change and the event loop never waits for a
step: submit() awaits only until the step thread has accepted the request (at most one step).
After each step the thread hands every stream its new tokens with loop.call_soon_threadsafe.

Cancelling a consumer (task cancelled, or `async for` left early) aborts its request; the abort
is applied before the next step, which therefore frees the request's pages. A bounded waiting
queue refuses submits beyond `max_waiting` not-yet-admitted requests with QueueFull.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

from kvpager.errors import EngineClosed, EngineDead, QueueFull, UnknownRequest
from kvpager.runtime.engine import Engine
from kvpager.runtime.outputs import RequestOutput, StreamChunk
from kvpager.runtime.request import RequestHandle, SamplingParams, Status

logger = logging.getLogger("kvpager")

_QUEUED = (Status.WAITING, Status.PREEMPTED)


class RequestStream:
    """One request's outputs for one event loop. Iterate it once with `async for`; `output` is
    the final RequestOutput once the iteration has ended."""

    def __init__(self, owner: AsyncEngine, handle: RequestHandle, loop: asyncio.AbstractEventLoop):
        self._owner, self._handle, self._loop = owner, handle, loop
        self._queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        self._sent = 0  # tokens handed to the queue (step thread only)
        self.output: RequestOutput | None = None

    @property
    def request_id(self) -> str:
        return self._handle.request_id

    @property
    def finished(self) -> bool:
        return self.output is not None

    def abort(self) -> None:
        self._owner.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self.output = item.output
                yield item
                if item.finished:
                    return
        finally:
            if self.output is None:  # cancelled or left early: free the pages at the next step
                self._owner.abort(self.request_id)

    # -- step thread ------------------------------------------------------------------------
    def _publish(self) -> bool:
        """Queue the tokens generated since the last call (and the final output); True once the
        request is done. Runs on the step thread."""
        handle = self._handle
        done = handle.finished
        count = handle.num_output_tokens
        if count == self._sent and not done:
            return False
        logprobs, top = handle.logprobs_since(self._sent)
        chunk = StreamChunk(self.request_id, tuple(handle.output_token_ids_since(self._sent)),
                            done, handle.output() if done else None,
                            None if logprobs is None else tuple(logprobs),
                            None if top is None else tuple(top))
        self._sent = count
        self._put(chunk)
        return done

    def _put(self, item: StreamChunk | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this stream
            self._owner.abort(self.request_id)


class AsyncEngine:
    """Runs `engine` on a background thread; see the module docstring. `max_waiting`: most
    requests accepted but not yet admitted (QueueFull beyond)."""

    def __init__(self, engine: Engine, max_waiting: int = 1024) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: deque[tuple[Callable, tuple, Future]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._queued = 0  # streams not yet admitted, as of the last publish (+ submits since)
        self._closing = False  # no new submits
        self._stopping = False  # the thread exits once the engine is idle
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stats = self._snapshot()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvpager-step", daemon=True)
            self._thread.start()
        return self

    async def __aenter__(self) -> AsyncEngine:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(abort=exc[0] is not None)

    async def shutdown(self, abort: bool = False, timeout: float | None = None) -> None:
        """Refuse new requests, then let in-flight ones finish (abort=False) or abort them
        (abort=True) and stop the thread. If `timeout` seconds pass first, what is left is
        aborted."""
        self._closing = True
        if abort:
            self._post(self._abort_all)
        self._post(self._stop)
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            self._post(self._abort_all)
            await asyncio.to_thread(self._thread.join)

    # -- requests ---------------------------------------------------------------------------
    async def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> RequestStream:
        """Queue a request; returns its stream once the step thread accepted it. Raises the
        engine's RequestError subclasses for bad input, QueueFull, or EngineClosed."""
        if self._closing:
            raise EngineClosed("the engine is shutting down; submit to a running AsyncEngine")
        self.start()
        loop = asyncio.get_running_loop()
        future = self._post(self._submit, list(prompt_token_ids), params, request_id, loop)
        return await asyncio.wrap_future(future)

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """submit(), wait for the end, return the RequestOutput."""
        stream = await self.submit(prompt_token_ids, params, request_id)
        async for _ in stream:
            pass
        return stream.output

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread or coroutine; applied before the next step. Unknown or
        finished ids are ignored (the request may have just finished)."""
        self._post(self._abort, request_id)

    def stats(self) -> dict[str, int]:
        """After the last step: running, waiting, pages_used, pages_total, kv_tokens (tokens
        whose KV is cached for running requests)."""
        return dict(self._stats)

    # -- commands (step thread) ---------------------------------------------------------------
    def _post(self, fn: Callable, *args: object) -> Future:
        future: Future = Future()
        if self._error is not None and fn is self._submit:
            future.set_exception(EngineDead(f"the step loop stopped after an error: {self._error!r}"))
            return future
        self._commands.append((fn, args, future))
        self._wake.set()
        return future

    def _submit(self, prompt: list[int], params: SamplingParams | None, request_id: str | None,
                loop: asyncio.AbstractEventLoop) -> RequestStream:
        if self._queued >= self.max_waiting:
            raise QueueFull(f"{self._queued} requests are already waiting (max_waiting="
                            f"{self.max_waiting}); retry later or raise max_waiting")
        handle = self.engine.submit(prompt, params, request_id)
        stream = RequestStream(self, handle, loop)
        self._streams[handle.request_id] = stream
        self._queued += 1
        return stream

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except UnknownRequest:
            pass

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._abort(request_id)

    def _stop(self) -> None:
        self._stopping = True

    def _drain(self) -> None:
        while self._commands:
            fn, args, future = self._commands.popleft()
            try:
                result = fn(*args)
            except Exception as exc:  # bad input: the caller gets it, the engine is unchanged
                future.set_exception(exc)
            else:
                future.set_result(result)

    # -- the step loop ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._drain()
            if engine.has_unfinished():
                try:
                    engine.step()
                except Exception as exc:
                    self._fail(exc)
                    return
                self._publish()
            else:
                self._publish()  # aborts of queued requests finish them without a step
                if self._stopping:
                    return
                self._wake.wait()
                self._wake.clear()

    def _publish(self) -> None:
        queued = 0
        done = []
        for request_id, stream in self._streams.items():
            if stream._publish():
                done.append(request_id)
            elif stream._handle.status in _QUEUED:
                queued += 1
        for request_id in done:
            del self._streams[request_id]
        self._queued = queued
        self._stats = self._snapshot()

    def _snapshot(self) -> dict[str, int]:
        return self.engine.load()

    def _fail(self, exc: BaseException) -> None:
        """A step raised (an engine bug: model, sampler and callback failures end only their
        requests, with finish_reason "error"): every stream ends with the error, later submits
        get EngineDead."""
        logger.exception("AsyncEngine: a step failed; stopping the step loop")
        self._error = exc
        dead = EngineDead(f"the step loop stopped after an error: {exc!r}")
        for stream in self._streams.values():
            stream._put(dead)
        self._streams.clear()
        while self._commands:
            _, _, future = self._commands.popleft()
            future.set_exception(dead)
