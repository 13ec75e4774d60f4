"""`python -m server --model demo`: the OpenAI-compatible server (API process + engine process).

Lifecycle: the engine process starts (and loads the model) before the port opens. SIGTERM
(or Ctrl-C) starts a drain: /health turns 503, new requests get 503, in-flight requests run
to completion (up to --drain-timeout), then the process exits 0. Requests still running at
the deadline are ended cleanly: a 503 where no response began (an upload still arriving
too), an SSE error event and `[DONE]` in a stream; then the process exits 0. A second Ctrl-C
ends everything the same way within about a second (code "shutdown"). If the engine process
dies, /health turns 503 and the process exits 1 within seconds.

Malformed HTTP (uvicorn's plain-text "Invalid HTTP request received.") is answered with an
OpenAI-shaped 400 JSON by `openai_http_protocol`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from types import FrameType
from typing import Any

log = logging.getLogger("grace_serve")
DEAD_GRACE_S = 1.0  # after the engine dies: serve 503s this long, then exit 1
# after ending requests (drain deadline, forced stop): wait at most this long for their last bytes
ABORT_GRACE_S = 2.0
MALFORMED_HTTP = (
    "malformed HTTP request: the request line, a header, Content-Length or the chunked framing "
    "could not be parsed"
)


def _banner(config: Any) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    host = f"[{host}]" if ":" in host else host
    base = f"http://{host}:{config.port}"
    auth = ' -H "Authorization: Bearer $GRACE_SERVE_API_KEY"' if config.api_keys else ""
    body = json.dumps(
        {"model": config.model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    return (
        f"\ngrace-serve is ready: model '{config.model_name}' at {base}/v1 (API docs: {base}/docs)\n"
        f"Try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{body}'\n"
    )


def openai_http_protocol(base: type | None = None) -> type:
    """uvicorn's HTTP protocol class (httptools where installed, else h11) answering a request
    it cannot parse (duplicate Content-Length, bad chunk size, bad request line or header)
    with an OpenAI-shaped 400 JSON instead of its text/plain "Invalid HTTP request received.".
    Such a request never reaches the app (no request id, no access log line, no metric)."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    from server.api.errors import raw_http_error

    class OpenAIHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _deferred_400 = False

        def send_400_response(self, msg: str) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                # the bad bytes follow a whole request still being answered (pipelining; the
                # C parser reads ahead): answer that one first, then the 400
                self._deferred_400 = True
                self.flow.pause_reading()
                return
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self.transport.close()  # a response is half sent: nothing valid can follow
                return
            self._write_400_and_close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            cycle = getattr(self, "cycle", None)
            done = cycle is None or cycle.response_complete
            if self._deferred_400 and done and not getattr(self, "pipeline", None):
                self._write_400_and_close()

        def _write_400_and_close(self) -> None:
            if self.transport.is_closing():
                return
            headers = list(self.server_state.default_headers)  # date, server
            self.transport.write(raw_http_error(400, MALFORMED_HTTP, "malformed_http", headers=headers))
            self.transport.close()

        def _unsupported_upgrade_warning(self) -> None:
            # an upgrade (h2c, or websocket without a WebSocket library) is served as plain
            # HTTP; the gateway refuses websocket ones. No warning per request: clients choose it.
            log.debug("upgrade request served as plain HTTP")

    OpenAIHTTPProtocol.__name__ = OpenAIHTTPProtocol.__qualname__ = f"OpenAI{base.__name__}"
    return OpenAIHTTPProtocol


def main(argv: list[str] | None = None) -> int:
    from server.config import parse_config
    from server.logs import configure_logging

    config = parse_config(argv)
    configure_logging(config.log_format, config.log_level)

    import uvicorn

    from server.api.app import create_app

    asgi, state = create_app(config)

    class Server(uvicorn.Server):
        """uvicorn, with a drain on the first SIGTERM/SIGINT and an exit when the engine dies."""

        dead_since: float | None = None
        ended_at: float | None = None  # when abort_inflight ended what was still running

        def end_inflight(self, code: str, message: str) -> bool:
            """End every in-flight request (once), then True when they are gone or the grace passed."""
            now = time.monotonic()
            if self.ended_at is None:
                self.ended_at = now
                n = asgi.abort_inflight(code, message)
                if n:
                    log.warning("ending %d request(s): 503 or an SSE error event + [DONE] (%s)", n, code)
            return state.inflight == 0 or now - self.ended_at >= ABORT_GRACE_S

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # signal handler: set flags only; on_tick does the rest
            if state.draining:
                self.should_exit = self.force_exit = True  # second signal: stop now
            else:
                state.start_drain()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                print(_banner(config), flush=True)

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                if self.force_exit and state.inflight:  # second signal: stop now, but end streams cleanly
                    return self.end_inflight(
                        "shutdown", "the server is shutting down; retry on another replica"
                    )
                return True
            if state.engine_dead():
                if self.dead_since is None:
                    reason = (state.engine.dead_reason if state.engine else None) or "it exited"
                    log.error("the engine process died (%s); exiting with status 1", reason)
                    self.dead_since = time.monotonic()
                    state.exit_code = 1
                # a moment of 503s first: probes see it and in-flight requests send their errors;
                # then whatever still runs (an upload still arriving) gets its 503 too
                if time.monotonic() - self.dead_since < DEAD_GRACE_S:
                    return False
                return self.end_inflight("engine_dead", "the inference engine stopped; retry later")
            if state.draining:
                if not getattr(self, "_drain_logged", False):
                    self._drain_logged = True
                    state.metrics.draining.set(1)
                    log.info(
                        "draining: %d request(s) in flight, up to %.0f s",
                        state.inflight,
                        config.drain_timeout,
                    )
                if state.inflight == 0 and self.ended_at is None:
                    log.info("drained; shutting down")
                    return True
                if time.monotonic() > state.drain_deadline:
                    if self.ended_at is None:
                        log.warning("drain timeout: %d request(s) still in flight", state.inflight)
                    return self.end_inflight(
                        "draining", "the server is shutting down (drain timeout); retry on another replica"
                    )
            return False

    uv_config = uvicorn.Config(
        asgi,
        host=config.host,
        port=config.port,
        log_config=None,
        http=openai_http_protocol(),
        access_log=False,  # the gateway writes one access line per request, with timings
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        lifespan="on",
    )
    Server(uv_config).run()
    return state.exit_code


if __name__ == "__main__":
    sys.exit(main())
