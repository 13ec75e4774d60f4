"""/v1/chat/completions (+ SSE streaming) and /v1/completions.

One request = admission (queue bound, draining) -> validation -> input processing -> engine
stream. Errors before the first byte are HTTP errors; an error after a stream began is sent as
an SSE error event and the stream ends. A client that goes away (streaming or not) cancels
the engine iteration, which aborts the request in the engine at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.engine.client import EngineDeadError, EngineRequestError, EngineRequestFailed, RequestDelta
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import Logprob
from server.engine.sampling_params import SamplingParams
from server.metrics import RequestMetrics
from server.model.processor import PromptInputs

from .body import OffLoopJSONRoute
from .constraints import tool_choice_mode
from .errors import SERVER, UNAVAILABLE, APIError, bad_request, error_body
from .fanout import CombinedMetrics, merge_streams
from .prompts import chat_inputs, check_structured_output, completion_inputs, fit_to_context, sampling_params
from .protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from .state import ServerState, Ticket
from .tool_calls import ToolCallStream, parse_tool_calls

log = logging.getLogger("grace_serve.api")
router = APIRouter(route_class=OffLoopJSONRoute)
T = TypeVar("T")
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf


class ClientDisconnected(Exception):
    pass


def get_state(request: Request) -> ServerState:
    return request.app.state.grace


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.config.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.config.model_name}`.",
            param="model",
            code="model_not_found",
        )


# -- shared generation plumbing ---------------------------------------------------------------


@dataclass
class Choice:
    """What one choice (sibling) has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


async def tracked(
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
    if isinstance(e, EngineRequestFailed):  # this request only; the engine serves on
        return APIError(500, f"the engine failed this request: {e}", SERVER, None, "engine_request_failed")
    return APIError(500, "internal server error", SERVER, None, "internal_error")


# Characters json.dumps leaves raw that line readers built on str.splitlines() (httpx's
# aiter_lines among them) take for line breaks, cutting an SSE event in two: escaped.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: Any) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_LINE_BREAKS)
    return b"data: " + text.encode() + b"\n\n"


def _usage(rm: RequestMetrics | CombinedMetrics) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": rm.num_prompt_tokens,
        "completion_tokens": rm.total_completion_tokens,
        "total_tokens": rm.num_prompt_tokens + rm.total_completion_tokens,
    }
    if rm.num_cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": rm.num_cached_tokens}
    return usage


def _note_access(request: Request, rid: str, rm: RequestMetrics | CombinedMetrics) -> None:
    """Numbers for the access log line (written by the middleware when the response ends)."""
    request.state.access = lambda: {
        "id": rid,
        "prompt_tokens": rm.num_prompt_tokens,
        "completion_tokens": rm.total_completion_tokens,
        "ttft_ms": None if rm.ttft is None else round(rm.ttft * 1000, 1),
        "finish": ",".join(sorted(set(rm.finish_reasons.values()))) or None,
    }


Prepared = list[tuple[PromptInputs, SamplingParams]]  # one engine request per entry


async def _serve(
    request: Request,
    state: ServerState,
    ticket: Ticket,
    prepare: Callable[[], Awaitable[Prepared]],
    stream: bool,
    rid: str,
    render_stream: Callable[[AsyncIterator[RequestDelta], Any, SamplingParams], AsyncIterator[bytes]],
    render_full: Callable[[list[Choice], Any], dict[str, Any]],
) -> Response:
    """Common path of chat and completions once the request is admitted. Several prepared
    prompts (completions) run as concurrent engine requests merged into one response."""
    arrival = time.monotonic()
    # The middleware calls this when the response is over, whatever happened (a stream that
    # never started never runs its own cleanup).
    request.state.cleanup = ticket.release
    try:
        prepared = await until_disconnected(request, prepare())
    except ClientDisconnected:
        return Response(status_code=499)
    params = prepared[0][1]
    parts = [RequestMetrics(state.metrics, arrival) for _ in prepared]
    if len(prepared) == 1:
        rm: Any = parts[0]
        deltas = tracked(state, prepared[0][0], params, rid, rm, ticket)
    else:
        rm = CombinedMetrics(parts, params.n)
        streams = [
            tracked(state, inputs, p, f"{rid}-{i}", part, ticket)
            for i, ((inputs, p), part) in enumerate(zip(prepared, parts))
        ]
        deltas = merge_streams(streams, params.n)
    _note_access(request, rid, rm)
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            render_stream(deltas, rm, params), media_type="text/event-stream", headers=headers
        )

    async def collect() -> list[Choice]:
        choices = [Choice() for _ in range(params.n * len(prepared))]
        async with contextlib.aclosing(deltas) as it:
            async for delta in it:
                for d in delta.deltas:
                    c = choices[d.index]
                    c.text.append(d.text)
                    c.logprobs += d.logprobs or []
                    if d.finish_reason is not None:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        return choices

    try:
        choices = await until_disconnected(request, collect())
    except ClientDisconnected:
        return Response(status_code=499)
    except APIError:
        raise
    except (EngineDeadError, EngineRequestError, EngineRequestFailed) as e:
        raise _engine_error(e) from e
    return JSONResponse(render_full(choices, rm))


async def _stream_guard(rid: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Turn a failure after streaming began into an SSE error event and `[DONE]`."""
    try:
        async for chunk in body:
            yield chunk
    except Exception as e:
        err = _engine_error(e)
        if err.status == 500:
            log.exception("internal error while streaming (request %s)", rid)
        yield _sse(error_body(err.message, err.type, err.param, err.code))
        yield b"data: [DONE]\n\n"  # every stream ends the same way (as vLLM's do), error or not


# -- logprobs formatting ----------------------------------------------------------------------


class _TokenText:
    """Token id -> its text, cached (logprobs name every alternative)."""

    def __init__(self, state: ServerState) -> None:
        self.processor = state.processor
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.processor.decode([token_id], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return max(float(value), _LOGPROB_FLOOR)


def chat_logprobs(tok: _TokenText, lps: list[Logprob], top: int, skip_special: bool = True) -> dict[str, Any]:
    """`bytes`: the token's own bytes, so that joined they give the text back exactly; null for
    a special token the text leaves out (skip_special_tokens), as OpenAI allows."""
    proc = tok.processor

    def entry(tid: int, lp: float) -> dict[str, Any]:
        skipped = skip_special and tid in proc.special_ids
        return {
            "token": tok(tid),
            "logprob": _lp(lp),
            "bytes": None if skipped else list(proc.token_bytes(tid)),
        }

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top_logprobs[:top]]}
            for lp in lps
        ],
        "refusal": None,
    }


class _TokenPieces:
    """Each token's share of a choice's text, in order: "" for a token that only starts a
    character (the token completing it carries the character) or that the text skips (a
    special token under skip_special_tokens). Joined they are the text, so `text_offset` is
    exact (single-token decodes show U+FFFD for partial characters and name skipped tokens)."""

    def __init__(self, state: ServerState, skip_special_tokens: bool) -> None:
        self._detok = IncrementalDetokenizer(state.processor, skip_special_tokens=skip_special_tokens)

    def next(self, token_id: int, last: bool = False) -> str:
        self._detok.add_tokens([token_id])
        if last:  # the text ends with whatever is left (a partial character as U+FFFD)
            self._detok.flush()
        return self._detok.take_delta(final=last)


def completion_logprobs(
    tok: _TokenText, pieces: _TokenPieces, lps: list[Logprob], top: int, offset: int, final: bool = True
) -> dict[str, Any]:
    """`final`: these logprobs end the choice (its text's last piece is theirs)."""
    tokens, offsets = [], []
    for i, lp in enumerate(lps):
        tokens.append(pieces.next(lp.token_id, last=final and i == len(lps) - 1))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(lp.logprob) for lp in lps],
        "top_logprobs": [{tok(t): _lp(v) for t, v in lp.top_logprobs[:top]} for lp in lps],
        "text_offset": offsets,
    }


# -- /v1/chat/completions -----------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"}
    },
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    params = sampling_params(state, body)  # cheap checks first, before any image work
    ticket = state.admit()
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = state.config.model_name
    top = body.top_logprobs or 0
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # tools are offered (and the output parsed for calls) unless tool_choice is "none"
    tools = (
        [t.model_dump(exclude_none=True) for t in body.tools or []]
        if tool_choice_mode(body) != "none"
        else []
    )

    async def prepare() -> Prepared:
        await check_structured_output(state, params, body)
        inputs = await chat_inputs(state, body.messages, tools=tools or None)
        return [(inputs, fit_to_context(state, params, len(inputs.prompt_token_ids), "messages", max_param))]

    def chunk(choices: list[dict[str, Any]], usage: Any = ...) -> bytes:
        payload: dict[str, Any] = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices
        }  # fmt: skip
        if include_usage:
            payload["usage"] = None if usage is ... else usage
        return _sse(payload)

    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

    def finish_reason(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason

    async def render_stream(
        deltas: AsyncIterator[RequestDelta], rm: RequestMetrics, p: SamplingParams
    ) -> AsyncIterator[bytes]:
        tok = _TokenText(state)
        parsers = {i: ToolCallStream() for i in range(p.n)} if tools else {}
        for i in range(p.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])  # fmt: skip
        async with contextlib.aclosing(deltas) as it:
            async for delta in it:
                for d in delta.deltas:
                    if not d.text and not d.logprobs and d.finish_reason is None:
                        continue
                    parser = parsers.get(d.index)
                    if parser is None:
                        pieces = [{"content": d.text}] if d.text else []
                    else:
                        pieces = parser.feed(d.text) + (
                            parser.finish() if d.finish_reason is not None else []
                        )
                    lps = (
                        chat_logprobs(tok, d.logprobs, top, p.skip_special_tokens)
                        if p.logprobs is not None and d.logprobs
                        else None
                    )
                    for j, piece in enumerate(pieces or [{}]):
                        last = j == max(len(pieces), 1) - 1
                        entry: dict[str, Any] = {"index": d.index, "delta": piece,
                                                 "logprobs": lps if j == 0 else None, "finish_reason": None}  # fmt: skip
                        if last and d.finish_reason is not None:
                            entry["finish_reason"] = finish_reason(
                                d.finish_reason, bool(parser and parser.calls)
                            )
                            entry["stop_reason"] = d.stop_reason
                        if piece or entry["logprobs"] or entry["finish_reason"]:
                            yield chunk([entry])
        if include_usage:
            yield chunk([], _usage(rm))
        yield b"data: [DONE]\n\n"

    def message(text: str) -> tuple[dict[str, Any], bool]:
        content, calls = parse_tool_calls(text) if tools else (text, [])
        msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        return msg, bool(calls)

    def render_full(choices: list[Choice], rm: RequestMetrics) -> dict[str, Any]:
        tok = _TokenText(state)
        out = []
        for i, c in enumerate(choices):
            msg, called = message("".join(c.text))
            out.append({
                "index": i,
                "message": msg,
                "logprobs": chat_logprobs(tok, c.logprobs, top, params.skip_special_tokens) if params.logprobs is not None else None,
                "finish_reason": finish_reason(c.finish_reason, called),
                "stop_reason": c.stop_reason,
            })  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
                "usage": _usage(rm)}  # fmt: skip

    def stream_body(
        d: AsyncIterator[RequestDelta], rm: RequestMetrics, p: SamplingParams
    ) -> AsyncIterator[bytes]:
        return _stream_guard(rid, render_stream(d, rm, p))

    return await _serve(request, state, ticket, prepare, body.stream, rid, stream_body, render_full)


# -- /v1/completions ----------------------------------------------------------------------------


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"}
    },
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    params = sampling_params(state, body)
    ticket = state.admit()
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = state.config.model_name
    top = body.logprobs or 0
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

    async def prepare() -> Prepared:
        await check_structured_output(state, params, body)
        return [
            (inputs, fit_to_context(state, params, len(inputs.prompt_token_ids), "prompt", "max_tokens"))
            for inputs in await completion_inputs(state, body)
        ]

    def chunk(choices: list[dict[str, Any]], usage: Any = ...) -> bytes:
        payload: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                   "choices": choices}  # fmt: skip
        if include_usage:
            payload["usage"] = None if usage is ... else usage
        return _sse(payload)

    async def render_stream(
        deltas: AsyncIterator[RequestDelta], rm: RequestMetrics, p: SamplingParams
    ) -> AsyncIterator[bytes]:
        tok = _TokenText(state)
        offsets: collections.Counter[int] = collections.Counter()  # text so far per choice
        pieces: dict[int, _TokenPieces] = {}
        async with contextlib.aclosing(deltas) as it:
            async for delta in it:
                out = []
                for d in delta.deltas:
                    if not d.text and not d.logprobs and d.finish_reason is None:
                        continue
                    lps = None
                    if p.logprobs is not None and d.logprobs:
                        one = pieces.setdefault(d.index, _TokenPieces(state, p.skip_special_tokens))
                        lps = completion_logprobs(tok, one, d.logprobs, top, offsets[d.index],
                                                  final=d.finish_reason is not None)  # fmt: skip
                    offsets[d.index] += len(d.text)
                    out.append({"index": d.index, "text": d.text, "logprobs": lps, "finish_reason": d.finish_reason,
                                **({"stop_reason": d.stop_reason} if d.finish_reason is not None else {})})  # fmt: skip
                if out:
                    yield chunk(out)
        if include_usage:
            yield chunk([], _usage(rm))
        yield b"data: [DONE]\n\n"

    def render_full(choices: list[Choice], rm: RequestMetrics) -> dict[str, Any]:
        tok = _TokenText(state)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": "".join(c.text),
                    "logprobs": completion_logprobs(
                        tok, _TokenPieces(state, params.skip_special_tokens), c.logprobs, top, 0
                    )
                    if params.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(rm),
        }

    def stream_body(
        d: AsyncIterator[RequestDelta], rm: RequestMetrics, p: SamplingParams
    ) -> AsyncIterator[bytes]:
        return _stream_guard(rid, render_stream(d, rm, p))

    return await _serve(request, state, ticket, prepare, body.stream, rid, stream_body, render_full)
