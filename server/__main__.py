"""`python -m server --model demo`: the OpenAI-compatible server (API process + engine process).

Lifecycle: the engine process starts (and loads the model) before the port opens. SIGTERM
(or Ctrl-C) starts a drain: /health turns 503, new requests get 503, in-flight requests run
to completion (up to --drain-timeout), then the process exits 0. A second Ctrl-C stops at
once. If the engine process dies, /health turns 503 and the process exits 1 within seconds.
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

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any structured extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


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


def main(argv: list[str] | None = None) -> int:
    from server.config import parse_config

    config = parse_config(argv)
    configure_logging(config.log_format, config.log_level)

    import uvicorn

    from server.api.app import create_app

    asgi, state = create_app(config)

    class Server(uvicorn.Server):
        """uvicorn, with a drain on the first SIGTERM/SIGINT and an exit when the engine dies."""

        dead_since: float | None = None

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
                return True
            if state.engine_dead():
                if self.dead_since is None:
                    reason = (state.engine.dead_reason if state.engine else None) or "it exited"
                    log.error("the engine process died (%s); exiting with status 1", reason)
                    self.dead_since = time.monotonic()
                    state.exit_code = 1
                # a moment of 503s first: probes see it and in-flight requests send their errors
                return time.monotonic() - self.dead_since >= DEAD_GRACE_S
            if state.draining:
                if not getattr(self, "_drain_logged", False):
                    self._drain_logged = True
                    state.metrics.draining.set(1)
                    log.info(
                        "draining: %d request(s) in flight, up to %.0f s",
                        state.inflight,
                        config.drain_timeout,
                    )
                if state.inflight == 0:
                    log.info("drained; shutting down")
                    return True
                if time.monotonic() > state.drain_deadline:
                    log.warning("drain timeout: aborting %d request(s)", state.inflight)
                    return True
            return False

    uv_config = uvicorn.Config(
        asgi,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,  # the gateway writes one access line per request, with timings
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        lifespan="on",
    )
    Server(uv_config).run()
    return state.exit_code


if __name__ == "__main__":
    sys.exit(main())
