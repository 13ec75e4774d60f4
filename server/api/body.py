"""JSON request bodies parsed without stalling the event loop.

json.loads holds the GIL for the whole document, in any thread: a 32 MB body (under the
default --max-request-bytes) takes 0.25-0.5 s on one core, and /health would wait for it.
Bodies above LARGE_BODY_BYTES are parsed in a small process pool instead; the loop only
copies bytes out and unpickles the result (strings come back as one memcpy-like decode each).
Routes opt in with `APIRouter(route_class=OffLoopJSONRoute)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from .background import BACKGROUND_NICENESS

log = logging.getLogger("grace_serve.api")
LARGE_BODY_BYTES = 1 << 20
_pool: ProcessPoolExecutor | None = None


def _parse(body: bytes) -> tuple[Any, tuple[str, int] | None]:
    """In the worker: the document, or the decode error's message and position (a
    JSONDecodeError pickles its whole document along)."""
    try:
        return json.loads(body), None
    except json.JSONDecodeError as e:
        return None, (e.msg, e.pos)


def _lower_priority() -> None:
    """In the worker: parsing is bulk work; the API's event loop gets the core first."""
    os.nice(BACKGROUND_NICENESS)


def start_pool() -> None:
    """Start the worker before traffic (spawning costs ~100 ms, not to be paid by a request)."""
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(
            max_workers=1, mp_context=mp.get_context("spawn"), initializer=_lower_priority
        )
        _pool.submit(_parse, b"{}").result(timeout=60)


def stop_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


async def parse_json(body: bytes) -> Any:
    global _pool
    pool = _pool
    if len(body) < LARGE_BODY_BYTES or pool is None:
        return json.loads(body)
    try:
        value, error = await asyncio.get_running_loop().run_in_executor(pool, _parse, body)
    except BrokenProcessPool:  # the worker died (OOM killer, a signal): a new one, this body here
        log.warning("the JSON worker process died; starting a new one")
        if _pool is pool:
            _pool = None
            asyncio.get_running_loop().run_in_executor(None, start_pool)
        return json.loads(body)
    if error is not None:
        raise json.JSONDecodeError(error[0], "", error[1])
    return value


_large_bodies: asyncio.Semaphore | None = None


def _one_large_body_at_a_time() -> asyncio.Semaphore:
    """Large bodies are read and parsed one at a time: each costs the process a few copies of
    itself with the GIL held (joining, pickling to the worker, unpickling the result); ten at
    once made the loop wait for them back to back (a burst of 8 image bodies and a 31 MB one
    held /health for up to 350 ms on 2 cores). The others wait unread, in their sockets."""
    global _large_bodies
    if _large_bodies is None:
        _large_bodies = asyncio.Semaphore(1)
    return _large_bodies


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) >= LARGE_BODY_BYTES:
                async with _one_large_body_at_a_time():
                    self._json = await parse_json(await self.body())
            else:
                self._json = await parse_json(await self.body())
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A route whose JSON body is parsed by parse_json (FastAPI reads it via request.json())."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(_as_json(request.scope), request.receive))

        return route


def _as_json(scope: dict[str, Any]) -> dict[str, Any]:
    """These routes take only JSON: a body sent as another type (`curl -d` says
    application/x-www-form-urlencoded) is read as JSON too, so a user gets the body's real
    error or none at all, not FastAPI's "Input should be a valid dictionary"."""
    headers = scope.get("headers", [])
    ctype = next((v for k, v in headers if k == b"content-type"), b"").split(b";")[0].strip().lower()
    if ctype == b"application/json" or ctype.endswith(b"+json"):
        return scope
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
