"""Prometheus metrics, one place. Names, meanings, units and buckets follow vLLM's
(`vllm:X` -> `grace_serve_X`, same `model_name` and `engine` labels) so dashboards port by
renaming; docs/METRICS.md has the mapping.

Engine-wide numbers (running/waiting, KV usage, preemptions, prefix cache, tokens per step)
come from the engine's per-step stats; per-request numbers (TTFT, inter-token latency, e2e,
queue time, token counts, finish reasons) are recorded by the API process as each request
streams (RequestMetrics), TTFT with its breakdown into parts that add up to it (TTFT_PARTS).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from server.engine.messages import ENGINE_FINISH_REASONS, FinishReason, FirstTokenTimes

PREFIX = "grace_serve_"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
LOOP_LAG_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
IMAGE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Our TTFT parts can be sub-millisecond (the process boundary): finer at the low end.
TTFT_PART_BUCKETS = [0.0001, 0.00025, 0.0005, *TTFT_BUCKETS]
# The TTFT cut at each stamp of a request's way to its first token, in order: (histogram name,
# help). They add up to time_to_first_token; vLLM's queue and prefill names and buckets kept.
TTFT_PARTS = (
    ("request_api_preprocess_seconds",
     "Arrival in the API to the request handed to the engine client: parsing, templating, tokenizing, images."),
    ("request_engine_transit_in_seconds",
     "Handed to the engine client to taken in by the engine process (the queue between them)."),
    ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("request_engine_transit_out_seconds",
     "First token sampled in the engine to its step's outputs read by the API process."),
    ("request_detokenize_seconds",
     "First token's outputs read by the API process to its text ready to send (event loop, detokenizer)."),
)  # fmt: skip
VLLM_PART_BUCKETS = {"request_queue_time_seconds", "request_prefill_time_seconds"}
FINISH_REASONS = tuple(r.value for r in ENGINE_FINISH_REASONS)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """[1, 2, 5, 10, 20, 50, ...] up to max_value (vLLM's token-count buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(v)
        exp += 1


class Metrics:
    def __init__(
        self, model_name: str, max_model_len: int, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name", "engine"]
        values = (model_name, "0")

        def gauge(name: str, doc: str) -> Any:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(*values)

        def histogram(name: str, doc: str, buckets: list[float] | list[int]) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(*values)

        self.num_requests_running = gauge(
            "num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter("num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.request_success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.ttft_parts = [
            histogram(name, doc, REQUEST_LATENCY_BUCKETS if name in VLLM_PART_BUCKETS else TTFT_PART_BUCKETS)
            for name, doc in TTFT_PARTS
        ]
        self.vision_encode = histogram(
            "request_vision_encode_seconds",
            "Vision tower time for the request's images before its first token (inside prefill).",
            TTFT_PART_BUCKETS,
        )
        # grace-serve's own (no vLLM counterpart)
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by method, route and status code.",
            ["method", "path", "status"],
            registry=r,
        )
        self.image_preprocess = Histogram(
            PREFIX + "image_preprocess_seconds",
            "Time to turn one image into model input (fetch excluded): decode, checks, resize, patchify.",
            buckets=IMAGE_BUCKETS,
            registry=r,
        )
        self.requests_queued = Gauge(
            PREFIX + "api_requests_queued",
            "Requests admitted by the API and waiting for their first token (--max-queued-requests bounds it).",
            registry=r,
        )
        self.event_loop_lag = Histogram(
            PREFIX + "api_event_loop_lag_seconds",
            "How late the API event loop woke a timer set every 20 ms (time a request waited for the loop).",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.draining = Gauge(PREFIX + "draining", "1 while the server drains after SIGTERM.", registry=r)
        self.engine_steps = counter("engine_steps", "Engine steps run (the heartbeat /health watches).")
        self.seconds_since_engine_step = gauge(
            "engine_seconds_since_last_step",
            "Seconds since the engine last completed a step while requests are pending (0 when idle).",
        )
        self.engine_stalled = gauge(
            "engine_stalled",
            "1 while work is pending and no engine step completed for --engine-stall-timeout seconds.",
        )
        self.kernel_backend = Info(
            PREFIX + "kernel_backend",
            "Kernels serving: backend is triton or reference (reference after a Triton kernel failed at start).",
            labels,
            registry=r,
        ).labels(*values)
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}

    def watch_engine(self, engine: Any) -> None:
        """Heartbeat gauges read from the engine client at scrape time (no per-step cost), and
        the kernels it serves on (fixed once it is ready)."""
        self.kernel_backend.info({"backend": engine.stats().kernel_backend})
        self.seconds_since_engine_step.set_function(engine.seconds_since_step)
        self.engine_stalled.set_function(lambda: 1.0 if engine.stalled else 0.0)

    # -- engine side: called for every engine step (from the engine reader thread) -----------

    def set_gauges(self, stats: Any) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)

    def on_engine_stats(self, stats: Any) -> None:
        """Once per engine step: gauges, tokens of the step, cumulative counters."""
        self.set_gauges(stats)
        if stats.step_tokens > 0:
            self.iteration_tokens.observe(stats.step_tokens)
        with self._lock:  # cumulative engine counters -> increments
            for name, counter in (
                ("num_steps", self.engine_steps),
                ("num_preemptions", self.num_preemptions),
                ("prefix_cache_queries", self.prefix_cache_queries),
                ("prefix_cache_hits", self.prefix_cache_hits),
            ):
                value = int(getattr(stats, name))
                delta = value - self._last.get(name, 0)
                if delta > 0:
                    counter.inc(delta)
                self._last[name] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Per-request timing and token accounting, fed with each RequestDelta as it arrives."""

    def __init__(self, metrics: Metrics, arrival: float | None = None) -> None:
        self.m = metrics
        self.arrival = arrival if arrival is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.completion_tokens: list[int] = []
        self.finish_reasons: dict[int, FinishReason] = {}
        self.done = False
        self.rejected = False  # refused by the engine (a 400): not a served request

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    def on_delta(self, delta: Any) -> None:
        now = time.monotonic()
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        before = max(self.completion_tokens, default=0)
        self.completion_tokens = list(delta.completion_tokens)
        new = max(self.completion_tokens, default=0) - before
        if new > 0:
            if self.first_token_time is None:
                self.first_token_time = now
                self.m.time_to_first_token.observe(now - self.arrival)
                if delta.first_token is not None:
                    self._observe_breakdown(delta.first_token, now)
                new -= 1
            elif self.last_token_time is not None and new > 0:
                # several steps may arrive together: spread the gap over their tokens
                gap = (now - self.last_token_time) / new
                for _ in range(new):
                    self.m.inter_token_latency.observe(gap)
            self.last_token_time = now
        for d in delta.deltas:
            if d.finish_reason is not None:
                self.finish_reasons[d.index] = d.finish_reason

    def _observe_breakdown(self, times: FirstTokenTimes, delivered: float) -> None:
        for hist, part in zip(self.m.ttft_parts, ttft_parts(self.arrival, times, delivered)):
            hist.observe(part)
        self.m.vision_encode.observe(times.vision_encode)

    def finish(self, n: int, aborted: bool = False) -> None:
        """Record the request once: finished normally, or aborted (disconnect, error)."""
        if self.done or self.rejected:
            return
        self.done = True
        m = self.m
        for i in range(n):
            reason = self.finish_reasons.get(i) or (FinishReason.ABORT if aborted else FinishReason.ERROR)
            m.request_success.get(reason, m.request_success[FinishReason.ERROR]).inc()
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(self.total_completion_tokens)
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.total_completion_tokens)
        m.e2e_request_latency.observe(time.monotonic() - self.arrival)


def ttft_parts(arrival: float, times: FirstTokenTimes, delivered: float) -> list[float]:
    """The TTFT_PARTS of one request: the gaps between consecutive stamps, so they add up to
    delivered - arrival (its TTFT)."""
    stamps = [arrival, times.sent, times.received, times.scheduled, times.sampled, times.returned, delivered]
    out, last = [], arrival
    for t in stamps[1:]:
        if t is None:  # a missing stamp: its gap goes to the next part
            out.append(0.0)
            continue
        out.append(t - last)
        last = t
    return out
