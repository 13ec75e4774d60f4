"""FastAPI factory and the gateway middleware (request id, draining, auth, body size, access
log, HTTP metrics, in-flight count).

The gateway is plain ASGI and wraps the whole FastAPI app (outside its error middleware), so
it sees every response, streaming ones to their last byte, and never buffers a body.
"""

from __future__ import annotations

import asyncio
import hmac
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
from .body import OffLoopJSONRoute
from .chat import check_model, get_state
from .errors import INVALID, APIError, bad_request, install_error_handlers, unavailable
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


class Gateway:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.keys = [k.encode() for k in state.config.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            if path not in PUBLIC_PATHS:
                refusal = self._refuse(path, headers)
                if refusal is not None:
                    await refusal.response()(scope, receive, send_with_id)
                    return
                receive = self._capped(receive)
                self.state.inflight += 1
                counted = True
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status[0] == 0:
                raise
            # the app's error handler already answered and logged it; do not log it twice
        finally:
            if counted:
                self.state.inflight -= 1
            cleanup = req_state.get("cleanup")
            if cleanup is not None:
                cleanup()
            self._log(scope, rid, status[0] or 500, time.monotonic() - start, req_state)

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
    return Gateway(app, state), state


def _router() -> Any:
    from fastapi import APIRouter

    router = APIRouter(route_class=OffLoopJSONRoute)

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
        text = await asyncio.to_thread(state.processor.decode, body.tokens, False)  # up to 1M ids
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
