"""One request's life, the same for /v1/chat/completions and /v1/completions.

admission (queue bound, draining) -> prepare (validation, input processing; the renderer's) ->
n choices per prompt in the engine -> SSE chunks or one JSON body (the renderer's shapes).
Errors before the first byte are HTTP errors; an error after a stream began is sent as an SSE
error event and the stream ends. A client that goes away (streaming or not) cancels the engine
iteration, which aborts the request in the engine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.engine.client import EngineDeadError, EngineRequestError, EngineRequestFailed, RequestDelta
from server.engine.messages import Fault
from server.engine.sampling_params import SamplingParams
from server.metrics import RequestMetrics
from server.model.processor import PromptInputs

from .errors import SERVER, UNAVAILABLE, APIError, bad_request, error_body
from .fanout import CombinedMetrics, merge_streams
from .render import Choice, Prepared, Renderer
from .state import ServerState, Ticket

log = logging.getLogger("grace_serve.api")
T = TypeVar("T")
Metrics = RequestMetrics | CombinedMetrics
_DONE = b"data: [DONE]\n\n"  # every stream ends the same way (as vLLM's do), error or not


class ClientDisconnected(Exception):
    pass


async def serve(request: Request, r: Renderer, stream: bool) -> Response:
    """The whole request once its body has passed the endpoint's cheap checks."""
    ticket = r.state.admit()
    arrival = time.monotonic()
    # The middleware calls this when the response is over, whatever happened (a stream that
    # never started never runs its own cleanup).
    request.state.cleanup = ticket.release
    try:
        prepared = await until_disconnected(request, r.prepare())
    except ClientDisconnected:
        return Response(status_code=499)
    deltas, rm = _submit(r, prepared, ticket, arrival)
    _note_access(request, r.rid, rm)
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_guarded(r.rid, _stream(r, deltas, rm)), media_type="text/event-stream",
                                 headers=headers)  # fmt: skip
    try:
        choices = await until_disconnected(request, _collect(deltas, r.params.n * len(prepared)))
    except ClientDisconnected:
        return Response(status_code=499)
    except (EngineDeadError, EngineRequestError, EngineRequestFailed) as e:
        raise _engine_error(e) from e
    body = r.envelope(r.object, [r.choice(i, c) for i, c in enumerate(choices)])
    return JSONResponse(body | {"usage": _usage(rm)})


def _submit(
    r: Renderer, prepared: Prepared, ticket: Ticket, arrival: float
) -> tuple[AsyncIterator[RequestDelta], Metrics]:
    """Start the engine requests; several prompts (completions) run concurrently, merged."""
    parts = [RequestMetrics(r.state.metrics, arrival) for _ in prepared]
    if len(prepared) == 1:
        return _tracked(r.state, *prepared[0], r.rid, parts[0], ticket), parts[0]
    streams = [
        _tracked(r.state, inputs, p, f"{r.rid}-{i}", part, ticket)
        for i, ((inputs, p), part) in enumerate(zip(prepared, parts))
    ]
    return merge_streams(streams, r.params.n), CombinedMetrics(parts, r.params.n)


async def _tracked(
    state: ServerState,
    inputs: PromptInputs,
    params: SamplingParams,
    rid: str,
    rm: RequestMetrics,
    ticket: Ticket,
) -> AsyncIterator[RequestDelta]:
    """The engine stream with metrics and admission bookkeeping. Closing it (disconnect, error)
    closes the engine stream right away, which aborts the request in the engine."""
    assert state.engine is not None
    finished = False
    try:
        async with contextlib.aclosing(state.engine.generate(inputs, params, rid)) as stream:
            async for delta in stream:
                ticket.release()
                rm.on_delta(delta)
                finished = delta.finished
                yield delta
    except EngineRequestError as e:
        rm.rejected = True
        raise bad_request(str(e), None, "engine_rejected") from e
    finally:
        ticket.release()
        rm.finish(params.n, aborted=not finished)


async def _collect(deltas: AsyncIterator[RequestDelta], n: int) -> list[Choice]:
    choices = [Choice() for _ in range(n)]
    async with contextlib.aclosing(deltas) as it:
        async for delta in it:
            for d in delta.deltas:
                c = choices[d.index]
                c.text.append(d.text)
                c.logprobs += d.logprobs or []
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return choices


async def _stream(r: Renderer, deltas: AsyncIterator[RequestDelta], rm: Metrics) -> AsyncIterator[bytes]:
    for choices in r.opening():
        yield _chunk(r, choices)
    async with contextlib.aclosing(deltas) as it:
        async for delta in it:
            live = [d for d in delta.deltas if d.text or d.logprobs or d.finish_reason is not None]
            for choices in r.chunks(live):
                yield _chunk(r, choices)
    if r.include_usage:
        yield _chunk(r, [], _usage(rm))
    yield _DONE


def _chunk(r: Renderer, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
    payload = r.envelope(r.chunk_object, choices)
    if r.include_usage:  # null on every chunk but the last, as OpenAI sends it
        payload["usage"] = usage
    return sse(payload)


async def _guarded(rid: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Turn a failure after streaming began into an SSE error event and `[DONE]`."""
    try:
        async for chunk in body:
            yield chunk
    except Exception as e:
        err = _engine_error(e)
        if err.status == 500:
            log.exception("internal error while streaming (request %s)", rid)
        yield sse(error_body(err.message, err.type, err.param, err.code))
        yield _DONE


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, but cancel it (and raise ClientDisconnected) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves (shutdown): take both down with us
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
    raise ClientDisconnected()


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, "the inference engine stopped; retry later", UNAVAILABLE, None, "engine_dead",
                        {"Retry-After": "5"})  # fmt: skip
    if isinstance(e, EngineRequestFailed) and e.fault is Fault.GRAMMAR:
        return bad_request(
            f"the structured output's grammar failed while decoding (a simpler schema, pattern or grammar may work): {e}",
            None,
            "structured_output_failed",
        )
    if isinstance(e, EngineRequestFailed):  # this request only; the engine serves on
        return APIError(500, f"the engine failed this request: {e}", SERVER, None, "engine_request_failed")
    return APIError(500, "internal server error", SERVER, None, "internal_error")


# Characters json.dumps leaves raw that line readers built on str.splitlines() (httpx's
# aiter_lines among them) take for line breaks, cutting an SSE event in two: escaped.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: Any) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_LINE_BREAKS)
    return b"data: " + text.encode() + b"\n\n"


def _usage(rm: Metrics) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": rm.num_prompt_tokens,
        "completion_tokens": rm.total_completion_tokens,
        "total_tokens": rm.num_prompt_tokens + rm.total_completion_tokens,
    }
    if rm.num_cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": rm.num_cached_tokens}
    return usage


def _note_access(request: Request, rid: str, rm: Metrics) -> None:
    """Numbers for the access log line (written by the middleware when the response ends)."""
    request.state.access = lambda: {
        "id": rid,
        "prompt_tokens": rm.num_prompt_tokens,
        "completion_tokens": rm.total_completion_tokens,
        "ttft_ms": None if rm.ttft is None else round(rm.ttft * 1000, 1),
        "finish": ",".join(sorted(set(rm.finish_reasons.values()))) or None,
    }
