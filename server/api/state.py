"""Server-wide state shared by the middleware, the routes and the process lifecycle:
the engine, metrics, admission control (queue bound, draining) and in-flight counts."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from typing import TYPE_CHECKING

import anyio

from server.config import ServerConfig
from server.engine.structured import GrammarCompiler
from server.metrics import Metrics

from .background import warm_up
from .body import start_pool, stop_pool
from .errors import unavailable
from .loop_lag import LoopLagMonitor
from .media import MediaPolicy, new_http_client

if TYPE_CHECKING:
    import httpx

    from server.engine.client import AsyncEngine
    from server.model.processor import Processor

log = logging.getLogger("grace_serve.api")


class Ticket:
    """A request's place in the admission queue; released at its first token (or its end)."""

    def __init__(self, state: ServerState) -> None:
        self._state: ServerState | None = state

    def release(self) -> None:
        if self._state is not None:
            self._state.queued -= 1
            self._state.metrics.requests_queued.set(self._state.queued)
            self._state = None


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.metrics = Metrics(
            config.model_name, config.max_model_len or 1
        )  # replaced once the model is known
        self.media = MediaPolicy(
            frozenset(d.lower().strip("[]").rstrip(".") for d in config.allowed_media_domains),
            config.media_fetch_timeout,
            config.max_image_bytes,
        )
        self.http: httpx.AsyncClient | None = None
        self.max_model_len = config.max_model_len or 0
        self.started_at = int(time.time())
        self.queued = 0  # admitted, no first token yet (preprocessing + engine waiting queue)
        self.inflight = 0  # API requests being served (what a drain waits for)
        self.draining = False
        self.drain_deadline = 0.0
        self.stopping = False
        self.exit_code = 0
        self.loop_lag: LoopLagMonitor | None = None
        self.grammars: GrammarCompiler  # set in start(): compiles requests' output constraints

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        from server.engine.client import AsyncEngine

        c = self.config
        engine = AsyncEngine(
            c.engine_args(),
            inline=c.engine_in_thread,
            stall_timeout=c.engine_stall_timeout,
            log_setup=(c.log_format, c.log_level),
        )
        await engine.start()
        assert engine.processor is not None and engine.model_config is not None
        # the byte and pixel caps are server policy, not model config
        engine.processor.image_settings = dataclasses.replace(
            engine.processor.image_settings,
            max_encoded_bytes=c.max_image_bytes,
            max_decoded_pixels=c.max_image_pixels,
        )
        # the engine's value: it caps the context at what its KV cache holds
        self.max_model_len = (
            engine.stats().max_model_len
            or c.max_model_len
            or engine.model_config.text.max_position_embeddings
        )
        self.metrics = Metrics(c.model_name, self.max_model_len)
        self.metrics.watch_engine(engine)
        engine.on_stats = self.metrics.on_engine_stats
        self.http = new_http_client(self.media)
        await asyncio.to_thread(start_pool)
        await asyncio.to_thread(warm_up, engine.processor)
        self.grammars = await asyncio.to_thread(
            GrammarCompiler,
            engine.processor.tokenizer,
            engine.model_config.text.vocab_size,
            engine.processor.eos_token_ids,
        )
        async with anyio.create_task_group():  # imports anyio's asyncio backend (streams use it)
            pass
        self.engine = engine
        self.loop_lag = LoopLagMonitor(self.metrics.event_loop_lag.observe)
        self.loop_lag.start()
        log.info("engine ready: model %s, max_model_len %d", c.model, self.max_model_len)
        # Everything alive now (torch, the tokenizer, the app) lives as long as the process: keep
        # it out of the collector's full passes, which took 150-600 ms under load here and held
        # the event loop for all of it.
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        self.stopping = True
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        stop_pool()
        if self.http is not None:
            await self.http.aclose()
        if self.engine is not None:
            await self.engine.shutdown(timeout=10)

    @property
    def processor(self) -> Processor:
        assert self.engine is not None and self.engine.processor is not None
        return self.engine.processor

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    @property
    def unhealthy_reason(self) -> str | None:
        """Why /health answers 503 (None: serving): draining, engine_unavailable (dead or not
        started) or engine_stalled (alive, work pending, no step for --engine-stall-timeout)."""
        if self.draining:
            return "draining"
        if self.engine is None or not self.engine.healthy:
            return "engine_unavailable"
        if self.engine.stalled:
            return "engine_stalled"
        return None

    def engine_dead(self) -> bool:
        return self.engine is not None and not self.engine.healthy and not self.stopping

    # -- draining (SIGTERM) ----------------------------------------------------------------

    def start_drain(self) -> None:
        """Called from the signal handler: only set flags here."""
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.config.drain_timeout

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> Ticket:
        if self.draining:
            raise unavailable("the server is shutting down; retry on another replica", "draining", 5)
        if self.engine is None or not self.engine.healthy:
            raise unavailable("the inference engine is not running", "engine_unavailable", 5)
        if self.engine.stalled:
            raise unavailable("the inference engine is not making progress", "engine_stalled", 5)
        if self.queued >= self.config.max_queued_requests:
            raise unavailable(
                f"too many requests are waiting ({self.queued}); retry shortly", "queue_full", 1
            )
        self.queued += 1
        self.metrics.requests_queued.set(self.queued)
        return Ticket(self)
