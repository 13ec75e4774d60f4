"""Server lifecycle under stress: a full queue (503 + Retry-After), SIGTERM during a stream
(drain: the stream completes, new requests get 503, exit 0), and engine death (/health 503,
exit non-zero). Each scenario runs its own `python -m server` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest
from api_server import ServerProcess, kv_empty, scrape, wait_until


def _chat(max_tokens: int, stream: bool = False, content: str = "Write a long story.") -> dict:
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_queue_full_then_engine_death(tmp_path):
    """max_num_seqs=1 and max_queued_requests=1: one request runs, one waits, the third gets
    503 with Retry-After. Then the engine process is killed: /health 503, in-flight requests
    get an error, the server exits non-zero within seconds."""
    srv = ServerProcess(
        tmp_path, "--max-num-seqs", "1", "--max-queued-requests", "1", "--max-model-len", "4096"
    )
    try:
        srv.wait_ready()

        async def scenario() -> None:
            async with (
                httpx.AsyncClient(base_url=srv.url, timeout=60) as c,
                c.stream("POST", "/v1/chat/completions", json=_chat(4000, stream=True)) as running,
            ):
                lines = running.aiter_lines()
                for _ in range(6):  # role chunk + content: the first request is running, not queued
                    await asyncio.wait_for(lines.__anext__(), 60)
                assert await asyncio.to_thread(wait_until, lambda: kv_empty(srv.url) is False, 10)
                waiting = asyncio.create_task(c.post("/v1/chat/completions", json=_chat(4)))

                def queued() -> bool:  # admitted by the API, waiting in the engine
                    m = scrape(srv.url)
                    return (
                        m["grace_serve_api_requests_queued"] == 1
                        and m["grace_serve_num_requests_waiting"] == 1
                    )

                assert await asyncio.to_thread(wait_until, queued, 20)
                full = await c.post("/v1/chat/completions", json=_chat(4))
                assert full.status_code == 503, full.text
                assert int(full.headers["retry-after"]) >= 1
                assert full.json()["error"]["code"] == "queue_full"
                assert full.json()["error"]["type"] == "service_unavailable_error"
                assert (await c.get("/health")).status_code == 200  # busy is not unhealthy
                waiting.cancel()  # disconnect the queued one; leaving the block drops the running one
                with pytest.raises(asyncio.CancelledError):
                    await waiting

        asyncio.run(scenario())
        assert wait_until(lambda: kv_empty(srv.url), timeout=20)
        assert wait_until(lambda: scrape(srv.url)["grace_serve_api_requests_queued"] == 0, timeout=10)
        assert httpx.post(srv.url + "/v1/chat/completions", json=_chat(2), timeout=60).status_code == 200

        # engine death, with a stream in flight
        events: list[str] = []

        def stream() -> None:
            with httpx.stream(
                "POST", srv.url + "/v1/chat/completions", json=_chat(4000, stream=True), timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: len(events) >= 3, timeout=30)
        os.kill(srv.engine_pid(), signal.SIGKILL)
        killed_at = time.monotonic()
        saw_503 = wait_until(lambda: _health(srv.url) == 503, timeout=5, interval=0.05)
        srv.proc.wait(timeout=15)
        assert srv.proc.returncode not in (0, None)
        assert time.monotonic() - killed_at < 10
        assert saw_503, "/health never answered 503 after the engine died"
        reader.join(10)
        errors = [i for i, e in enumerate(events) if '"error"' in e]
        assert errors and events[errors[0] + 1 :] == ["data: [DONE]"], events[-3:]  # error, then [DONE]
    finally:
        srv.stop()
    assert "the engine process died" in srv.log_text()


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=1).status_code
    except httpx.HTTPError:
        return -1


def test_sigterm_drains_in_flight_stream_and_exits_zero(tmp_path):
    srv = ServerProcess(tmp_path, "--max-model-len", "2048", "--drain-timeout", "60")
    try:
        srv.wait_ready()
        # The stream must outlast the checks below (~0.5 s) on a fast machine without taking
        # minutes on a slow one: size it to about 3 s of this machine's decoding.
        t0 = time.monotonic()
        httpx.post(srv.url + "/v1/chat/completions", json=_chat(32), timeout=120).raise_for_status()
        per_token = (time.monotonic() - t0) / 32
        length = int(min(1500, max(64, 3.0 / per_token)))
        chunks: list[dict] = []
        done = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST", srv.url + "/v1/chat/completions", json=_chat(length, stream=True), timeout=120
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks.append(json.loads(line[6:]))
                        elif line == "data: [DONE]":
                            done.set()
            except BaseException as e:
                errors.append(e)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: len(chunks) >= 3, timeout=60)
        srv.proc.send_signal(signal.SIGTERM)
        assert not done.is_set(), "the stream ended before SIGTERM; make it longer"
        # draining: new work and readiness probes get 503 while the stream goes on
        assert wait_until(lambda: _health(srv.url) == 503, timeout=5, interval=0.05)
        refused = httpx.post(srv.url + "/v1/chat/completions", json=_chat(2), timeout=10)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "draining"
        assert srv.proc.poll() is None
        # the in-flight stream completes normally, then the server exits 0
        reader.join(120)
        assert not errors, errors
        assert done.is_set()
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "length"
        srv.proc.wait(timeout=30)
        assert srv.proc.returncode == 0, srv.log_text()[-3000:]
    finally:
        srv.stop()
    log = srv.log_text()
    assert "draining" in log and "drained; shutting down" in log
