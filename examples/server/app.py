"""The FastAPI app: OpenAI-compatible `/v1/completions` (streaming and not) over an AsyncEngine,
plus `/v1/models`, `/health` and Prometheus `/metrics`.

Errors follow OpenAI's shape ({"error": {"message", "type", "param", "code"}}): a bad body or a
request the engine refuses is a 400 naming the field, a full queue a 429, a stopping engine a
503. A client that drops a stream aborts its request; its pages are free after the next step.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvpager.errors import EngineClosed, EngineDead, KVPagerError, QueueFull
from kvpager.runtime.async_engine import AsyncEngine, RequestStream
from kvpager.runtime.request import SamplingParams

from .metrics import ServerMetrics
from .protocol import CompletionRequest, chunk_body, completion_body, error_body, logprobs_body
from .text import IdsText, TokenizerText


def make_app(aengine: AsyncEngine, model_name: str, text: IdsText | TokenizerText) -> FastAPI:
    metrics = ServerMetrics(aengine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        aengine.start()
        yield
        await aengine.shutdown(abort=True)

    app = FastAPI(title="kvpager example server", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return JSONResponse(error_body(f"{field}: {first['msg']}", field), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "kvpager"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        try:
            prompt = body.prompt if isinstance(body.prompt, list) else text.encode(body.prompt)
            stops = _stop_strings(body.stop, text)
            params = SamplingParams(
                max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, seed=body.seed, stop_token_ids=tuple(body.stop_token_ids),
                logprobs=body.logprobs)
            stream = await aengine.submit(prompt, params, request_id=f"cmpl-{uuid.uuid4().hex}")
        except QueueFull as exc:
            return JSONResponse(error_body(str(exc), kind="rate_limit_error"), status_code=429)
        except (EngineClosed, EngineDead) as exc:
            return JSONResponse(error_body(str(exc), kind="server_error"), status_code=503)
        except (KVPagerError, ValueError) as exc:
            return JSONResponse(error_body(str(exc)), status_code=400)
        name = body.model or model_name
        if body.stream:
            return StreamingResponse(_events(stream, name, text, stops, metrics, body.logprobs),
                                     media_type="text/event-stream")
        watch = _StopWatch(text, stops)
        logprobs, top = [], []
        async for chunk in stream:
            logprobs += chunk.new_logprobs or ()
            top += chunk.new_top_logprobs or ()
            if watch.feed(chunk.new_token_ids):
                stream.abort()
                break
        out = stream.output
        reason = "stop" if watch.stopped else out.finish_reason
        metrics.observe(out) if out is not None else None
        return completion_body(stream.request_id, name, watch.text, watch.token_ids, reason,
                               len(prompt), _logprobs(body.logprobs, text, watch.token_ids,
                                                      logprobs, top, 0))

    return app


async def _events(stream: RequestStream, model: str, text: IdsText | TokenizerText,
                  stops: list[str], metrics: ServerMetrics, logprobs: int | None
                  ) -> AsyncIterator[str]:
    """Server-sent events: one chunk per engine step that produced tokens, then [DONE]."""
    watch = _StopWatch(text, stops)
    try:
        async for chunk in stream:
            sent = len(watch.text)
            stopped = watch.feed(chunk.new_token_ids)
            reason = "stop" if stopped else chunk.finish_reason
            new_ids = list(chunk.new_token_ids)
            lp = _logprobs(logprobs, text, new_ids, chunk.new_logprobs or (),
                           chunk.new_top_logprobs or (), sent)
            yield f"data: {json.dumps(chunk_body(stream.request_id, model, watch.text[sent:], new_ids, reason, lp))}\n\n"
            if stopped:
                stream.abort()
                break
        yield "data: [DONE]\n\n"
    finally:
        if stream.output is not None:
            metrics.observe(stream.output)


def _logprobs(asked: int | None, text: IdsText | TokenizerText, token_ids: list[int],
              logprobs, top, offset: int) -> dict | None:
    """The choice's `logprobs` object for these tokens, or None when the request did not ask."""
    if asked is None:
        return None
    return logprobs_body([text.decode([t]) for t in token_ids], token_ids, list(logprobs),
                         list(top) if asked else None, text.decode, offset)


def _stop_strings(stop: str | list[str] | None, text: IdsText | TokenizerText) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops and isinstance(text, IdsText):
        raise ValueError("stop strings need a tokenizer and this model has none; use "
                         "stop_token_ids instead")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class _StopWatch:
    """Decoded text of the tokens so far, cut at the first stop string."""

    def __init__(self, text: IdsText | TokenizerText, stops: list[str]):
        self._text, self._stops = text, stops
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False

    def feed(self, new_ids: tuple[int, ...]) -> bool:
        """Add tokens; True when a stop string appeared (text is cut before it)."""
        self.token_ids.extend(new_ids)
        full = self._text.decode(self.token_ids)
        for s in self._stops:
            at = full.find(s)
            if at >= 0:
                full, self.stopped = full[:at], True
        self.text = full
        return self.stopped
