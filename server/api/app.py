"""FastAPI factory and the gateway middleware (request id, draining, auth, body size, access
log, HTTP metrics, in-flight count).

The gateway is plain ASGI and wraps the whole FastAPI app (outside its error middleware), so
it sees every response, streaming ones to their last byte, and never buffers a body. It also
ends requests on the server's side (`Gateway.abort_inflight`, at the drain deadline or a
forced shutdown) with an OpenAI-shaped ending: a 503 before the response began (the body may
still be arriving), an SSE error event and `[DONE]` in a stream. WebSocket upgrades get an
OpenAI-shaped 400.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import ServerConfig
from server.model.processor import PromptError

from . import chat
from .background import run_text_work
from .body import OffLoopJSONRoute
from .chat import check_model, get_state
from .constraints import check_tool_messages
from .errors import (
    INVALID,
    SERVER,
    UNAVAILABLE,
    APIError,
    ErrorResponse,
    bad_request,
    error_body,
    error_bytes,
    install_error_handlers,
    unavailable,
)
from .prompts import chat_inputs, check_token_ids, tokenize_text
from .protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from .state import ServerState

log = logging.getLogger("grace_serve.api")
access_log = logging.getLogger("grace_serve.access")

PUBLIC_PATHS = frozenset(
    {"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

try:
    __version__ = version("grace-serve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"


def _needs_auth(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize")


class BodyTooLarge(StarletteHTTPException):
    """Raised from receive(); an HTTPException so FastAPI's body parsing passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


WEBSOCKET_REFUSAL = (
    "WebSocket connections are not supported; use HTTP (stream=true streams over server-sent events)"
)


def _is_websocket_upgrade(headers: dict[str, str]) -> bool:
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "upgrade" in connection and headers.get("upgrade", "").strip().lower() == "websocket"


class Flight:
    """A request the gateway can end from the server's side (see Gateway.abort_inflight)."""

    __slots__ = ("ended", "reason", "sse", "started", "task")

    def __init__(self) -> None:
        self.task: asyncio.Future[None] | None = None
        self.reason: tuple[str, str] | None = None  # (code, message) once aborted
        self.started = False  # http.response.start sent
        self.sse = False  # ... as text/event-stream
        self.ended = False  # the last body message sent


class Gateway:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.keys = [k.encode() for k in state.config.api_keys]
        self.flights: set[Flight] = set()

    def abort_inflight(self, code: str, message: str) -> int:
        """End every in-flight API request now (drain deadline, forced shutdown): each one's
        handler is cancelled (which aborts its engine requests) and the client gets a 503
        (response not begun: also a request whose body is still arriving) or, in an SSE
        stream, `data: {"error": ...}` then `data: [DONE]`. Returns how many were ended."""
        n = 0
        for flight in list(self.flights):
            if flight.reason is None and flight.task is not None and not flight.task.done():
                flight.reason = (code, message)
                flight.task.cancel()
                n += 1
        return n

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        req_state = scope.setdefault("state", {})
        req_state["request_id"] = rid
        path: str = scope["path"]
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        counted = False
        try:
            if _is_websocket_upgrade(headers):  # an upgrade the HTTP layer left to us as plain HTTP
                refusal = APIError(400, WEBSOCKET_REFUSAL, INVALID, None, "websocket_not_supported")
                await refusal.response()(scope, receive, send_with_id)
                return
            if path not in PUBLIC_PATHS:
                refusal = self._refuse(path, headers)
                if refusal is not None:
                    await refusal.response()(scope, receive, send_with_id)
                    return
                receive = self._capped(receive)
                self.state.inflight += 1
                counted = True
                await self._abortable(scope, receive, send_with_id, req_state)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            # after a start, the app's error handler already answered and logged it
            if status[0] == 0:  # a failure outside FastAPI's handlers: never uvicorn's text/plain 500
                log.exception("internal error in %s %s (request id %s)", scope["method"], path, rid)
                err = APIError(
                    500, f"internal server error (request id {rid})", SERVER, None, "internal_error"
                )
                await err.response()(scope, receive, send_with_id)
        finally:
            if counted:
                self.state.inflight -= 1
            cleanup = req_state.get("cleanup")
            if cleanup is not None:
                cleanup()
            self._log(scope, rid, status[0] or 500, time.monotonic() - start, req_state)

    async def _abortable(self, scope: Scope, receive: Receive, send: Send, req_state: dict[str, Any]) -> None:
        """Run the app in its own task so that abort_inflight (or a cancellation of this task by
        the HTTP server at shutdown) can stop it and still end the response properly."""
        flight = Flight()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                flight.started = True
                ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                flight.sse = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                flight.ended = True
            await send(message)

        flight.task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        self.flights.add(flight)
        try:
            await flight.task
        except asyncio.CancelledError:
            # ours (abort_inflight) or the HTTP server's at shutdown: the handler is gone (its
            # engine requests aborted); end the response cleanly, then return normally
            code, message = flight.reason or (
                "shutdown",
                "the server is shutting down; retry on another replica",
            )
            if not flight.task.done():  # we were cancelled while the handler still runs
                flight.task.cancel()
            req_state["aborted"] = code
            await self._end_aborted(flight, scope, receive, send, code, message)
        finally:
            self.flights.discard(flight)

    @staticmethod
    async def _end_aborted(
        flight: Flight, scope: Scope, receive: Receive, send: Send, code: str, message: str
    ) -> None:
        if flight.ended:
            return
        if not flight.started:
            err = unavailable(message, code, 5)
            err.headers["Connection"] = "close"  # the request body may not have been read
            await err.response()(scope, receive, send)
        elif flight.sse:
            event = b"data: " + json.dumps(error_body(message, UNAVAILABLE, None, code)).encode() + b"\n\n"
            await send(
                {"type": "http.response.body", "body": event + b"data: [DONE]\n\n", "more_body": False}
            )
        # else: a non-SSE body half sent; the HTTP server closes the connection

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No WebSocket endpoint exists: answer the upgrade with an OpenAI-shaped 400 through
        the ASGI WebSocket Denial Response extension where the server has it (uvicorn does),
        else close (the server then sends a bare 403)."""
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_bytes(400, WEBSOCKET_REFUSAL, INVALID, "websocket_not_supported")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        self.state.metrics.http_requests.labels("GET", "other", "400").inc()

    def _refuse(self, path: str, headers: dict[str, str]) -> APIError | None:
        s = self.state
        if s.draining:
            return unavailable("the server is shutting down; retry on another replica", "draining", 5)
        if self.keys and _needs_auth(path) and not self._authorized(headers.get("authorization", "")):
            return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", INVALID,
                            None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        declared = headers.get("content-length", "")
        limit = s.config.max_request_bytes
        if declared.isdigit() and int(declared) > limit:
            return APIError(413, f"request body is larger than the limit of {limit} bytes", INVALID, None,
                            "request_too_large")  # fmt: skip
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.keys:  # compare against every key, in constant time each
            ok |= hmac.compare_digest(given, key)
        return ok

    def _capped(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive (chunked bodies have no Content-Length)."""
        limit = self.state.config.max_request_bytes
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return capped

    def _log(self, scope: Scope, rid: str, status: int, seconds: float, req_state: dict[str, Any]) -> None:
        path = scope["path"]
        label = path if path in KNOWN_PATHS or path in PUBLIC_PATHS else "other"
        self.state.metrics.http_requests.labels(scope["method"], label, str(status)).inc()
        if path in ("/health", "/metrics"):
            return  # probes and scrapes would drown the log
        extra = req_state.get("access")
        fields = extra() if callable(extra) else {}
        if req_state.get("aborted"):
            fields = {**fields, "aborted": req_state["aborted"]}
        client = scope.get("client") or ("-", 0)
        detail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        access_log.info(
            "%s %s %s %d %.1fms rid=%s %s",
            client[0],
            scope["method"],
            path,
            status,
            seconds * 1000,
            rid,
            detail,
            extra={"access": {"client": client[0], "method": scope["method"], "path": path, "status": status,
                              "duration_ms": round(seconds * 1000, 1), "request_id": rid, **fields}},
        )  # fmt: skip


# -- app ----------------------------------------------------------------------------------------


def create_app(config: ServerConfig, state: ServerState | None = None) -> tuple[Any, ServerState]:
    """The ASGI app to serve (FastAPI inside the gateway) and its state."""
    state = state or ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="grace-serve",
        version=__version__,
        description="OpenAI-compatible server for the GRACE Qwen3-VL-2B vision-language model.",
        lifespan=lifespan,
    )
    app.state.grace = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(_router())
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return Gateway(app, state), state


# -- the OpenAPI document: the status codes and bodies the server really sends -----------------

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERROR_WHEN = {
    400: "invalid request: a field (`param` names it), the JSON, an image, the context length, or a "
    "grammar that failed only while decoding (code `structured_output_failed`)",
    401: "missing or wrong API key (only when the server runs with --api-key)",
    404: "`model` is not the served model (code `model_not_found`)",
    413: "body above --max-request-bytes (code `request_too_large`)",
    503: "draining, queue full, or the engine is gone (code `draining` / `queue_full` / "
    "`engine_unavailable` / `engine_stalled` / `engine_dead`; `shutdown` when a forced stop ended the "
    "request); has Retry-After",
    500: "a bug (code `internal_error`; the log has the request id), or the engine failed this request "
    "alone (code `engine_request_failed`; other requests are unaffected)",
}
_HEALTH_OK = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ok"]}},
    "required": ["status"],
}
_VERSION = {
    "type": "object",
    "properties": {
        "version": {"type": "string"},
        "model": {"type": "string"},
        "max_model_len": {"type": "integer"},
        "kernel_backend": {
            "type": "object",
            "properties": {"requested": {"type": "string"}, "in_use": {"type": "string"}},
            "description": "--kernel-backend as given, and the kernels serving (reference after a fallback)",
        },
    },
    "required": ["version", "model", "max_model_len", "kernel_backend"],
}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description or _ERROR_WHEN[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status == 503:
        out["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return out


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, corrected: no 422 (validation errors are 400), every error status
    a route can answer with the OpenAI error body (ErrorResponse), /metrics as Prometheus
    text, /health's 200 and 503, /version's fields."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            codes: list[int] = []
            if path not in PUBLIC_PATHS:  # the gateway: auth, draining, body size
                codes += [401, 503] + ([413] if method == "post" else [])
            if method == "post":
                codes.append(400)
            if path.startswith("/v1/models/") or method == "post":
                codes.append(404)
            codes.append(500)
            for code in sorted(set(codes)):
                responses.setdefault(str(code), _error(code))
    paths = doc.get("paths", {})
    if "/health" in paths:
        paths["/health"]["get"]["responses"] = {
            "200": {"description": "serving", "content": {"application/json": {"schema": _HEALTH_OK}}},
            "503": _error(503, "not serving: draining (code `draining`) or the engine is gone "
                          "(`engine_unavailable`) or stalled (`engine_stalled`); has Retry-After"),
        }  # fmt: skip
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {
            "200": {
                "description": "Prometheus text exposition format (see docs/METRICS.md)",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        }
    if "/version" in paths:
        paths["/version"]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": _VERSION}}
    app.openapi_schema = doc
    return doc


def _router() -> Any:
    from fastapi import APIRouter

    router = APIRouter(route_class=OffLoopJSONRoute)

    @router.head("/health", include_in_schema=False)  # load balancers' probes (uvicorn drops the body)
    @router.get("/health")
    async def health(request: Request) -> Response:
        reason = get_state(request).unhealthy_reason
        if reason is None:
            return JSONResponse({"status": "ok"})
        return unavailable(f"not serving: {reason}", reason, 5).response()

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = get_state(request)
        if state.engine is not None:  # also set per engine step; refreshed here for idle servers
            state.metrics.set_gauges(state.engine.stats())
        state.metrics.draining.set(1 if state.draining else 0)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/version")
    async def get_version(request: Request) -> dict[str, Any]:
        state = get_state(request)
        return {
            "version": __version__,
            "model": state.config.model_name,
            "max_model_len": state.max_model_len,
            "kernel_backend": {
                "requested": state.config.kernel_backend,
                "in_use": state.engine.stats().kernel_backend if state.engine is not None else None,
            },
        }

    @router.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [_card(get_state(request))]}

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        state = get_state(request)
        check_model(state, model_id)
        return _card(state)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        state = get_state(request)
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of 'prompt' or 'messages'", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages must not be empty", "messages")
            check_tool_messages(body.messages)
            ids = (await chat_inputs(state, body.messages, body.add_generation_prompt)).prompt_token_ids
        else:
            try:
                ids = await tokenize_text(state, body.prompt or "")
            except PromptError as e:
                raise bad_request(str(e), "prompt") from e
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        state = get_state(request)
        check_model(state, body.model)
        check_token_ids(state, body.tokens, "tokens")
        text = await run_text_work(state.processor.decode, body.tokens, False)  # up to 1M ids
        return {"prompt": text}

    return router


def _card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.config.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "grace-serve",
        "root": state.config.model,
        "max_model_len": state.max_model_len,
    }
