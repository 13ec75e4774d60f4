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
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

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


def start_pool() -> None:
    """Start the worker before traffic (spawning costs ~100 ms, not to be paid by a request)."""
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
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


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await parse_json(await self.body())
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A route whose JSON body is parsed by parse_json (FastAPI reads it via request.json())."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return route
