"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers here turn every failure into that shape: our own APIError, FastAPI's validation
errors (400 with the offending field as `param`, never 422), unknown routes, and bugs (500,
logged with the request id, the message without internals). `raw_http_error` is the same
body as a whole HTTP/1.1 response, for the HTTP protocol layer (malformed requests that never
reach the app).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("grace_serve.api")

INVALID = "invalid_request_error"
UNAVAILABLE = "service_unavailable_error"
SERVER = "server_error"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(status: int, message: str, type: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(message, type, None, code)).encode()


def raw_http_error(
    status: int,
    message: str,
    code: str | None,
    type: str = INVALID,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A complete `HTTP/1.1` response carrying the OpenAI error body, closing the connection."""
    from http import HTTPStatus

    body = error_bytes(status, message, type, code)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers or []]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body (documented in /openapi.json)."""

    error: ErrorDetail


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID, param, code)


def unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, UNAVAILABLE, None, code, {"Retry-After": str(retry_after)})


# -- validation errors -> 400 with a param path ---------------------------------------------


def _is_union_label(part: Any) -> bool:
    """pydantic puts the union member's name into error locations ('str', 'list[Part]',
    'NamedToolChoice'); the protocol's own field names are all lower case."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "none", "list", "dict"}
    )


def param_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if _is_union_label(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """Pick the most specific error (the deepest location); a union of failures at the same
    field is reported as one message."""
    if not errors:
        return bad_request("invalid request")
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    deepest = max(errors, key=lambda e: len(e.get("loc", ())))
    param = param_path(deepest.get("loc", ()))
    same = [e for e in errors if param_path(e.get("loc", ())) == param]
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same))
    lead = "Input should be "
    if len(msgs) > 1 and all(m.startswith(lead) for m in msgs):  # a union: "a valid string or a valid list"
        msgs = [lead + " or ".join(m[len(lead) :] for m in msgs)]
    where = param or "request body"
    return bad_request(f"{where}: {' or '.join(msgs)}", param=param)


# -- handlers -------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{request.method} {request.url.path}: {message}"
        headers = dict(exc.headers or {})  # e.g. Allow on a 405
        return APIError(
            exc.status_code, message, INVALID, None, codes.get(exc.status_code), headers
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None) or "?"
        log.exception("internal error in %s %s (request id %s)", request.method, request.url.path, rid)
        return APIError(
            500, f"internal server error (request id {rid})", SERVER, None, "internal_error"
        ).response()
