"""A hung engine is seen. Reproduced first as reported: with the engine process stopped
(SIGSTOP) while 4 streams ran, /health stayed 200 and new requests got no answer. Now /health
turns 503 `engine_stalled` within --engine-stall-timeout, new requests get 503 at once, the
heartbeat metrics show it, and after SIGCONT everything recovers: /health 200, every stream
ends with [DONE], nothing left in the KV cache."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
from api_server import ServerProcess, kv_empty, scrape, wait_until

STALL_S = 2.0


def _stream(url: str, results: list[str]) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 600,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    last = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.strip():
                last = line
    results.append(last)


def test_sigstop_engine_turns_health_503_and_sigcont_recovers(tmp_path):
    srv = ServerProcess(tmp_path, "--engine-stall-timeout", str(STALL_S), "--max-model-len", "2048")
    try:
        srv.wait_ready()
        assert scrape(srv.url)["grace_serve_engine_stalled"] == 0
        results: list[str] = []
        threads = [threading.Thread(target=_stream, args=(srv.url, results)) for _ in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: scrape(srv.url)["grace_serve_num_requests_running"] == 4, 30)
        steps_before = scrape(srv.url)["grace_serve_engine_steps_total"]
        assert steps_before > 0

        engine = srv.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_until(
                lambda: httpx.get(srv.url + "/health", timeout=2).status_code == 503, STALL_S + 3, 0.1
            ), "/health never turned 503 while the engine was stopped"
            assert time.monotonic() - stopped_at <= STALL_S + 3
            health = httpx.get(srv.url + "/health", timeout=2)
            assert health.json()["error"]["code"] == "engine_stalled", health.text
            assert health.headers["retry-after"]
            m = scrape(srv.url)
            assert m["grace_serve_engine_stalled"] == 1
            assert m["grace_serve_engine_seconds_since_last_step"] >= STALL_S
            # a new request is refused at once instead of hanging
            t0 = time.monotonic()
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                timeout=10,
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stalled", r.text
            assert time.monotonic() - t0 < 2
        finally:
            os.kill(engine, signal.SIGCONT)

        assert wait_until(lambda: httpx.get(srv.url + "/health", timeout=2).status_code == 200, 10)
        for t in threads:
            t.join(300)
        assert results == ["data: [DONE]"] * 4, results
        m = scrape(srv.url)
        assert m["grace_serve_engine_stalled"] == 0
        assert m["grace_serve_engine_steps_total"] > steps_before
        assert wait_until(lambda: kv_empty(srv.url), 20)
        assert "no progress" in srv.log_text()
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def test_a_long_idle_is_not_a_stall(tmp_path):
    """No work pending: however long since the last step, the engine is healthy. (Also: the
    engine process logs through the server's --log-format, its KV pool line included; a
    spawned process used to drop every INFO line.)"""
    srv = ServerProcess(tmp_path, "--engine-stall-timeout", "0.5", "--log-format", "json")
    try:
        srv.wait_ready()
        time.sleep(1.5)
        assert httpx.get(srv.url + "/health", timeout=2).status_code == 200
        m = scrape(srv.url)
        assert m["grace_serve_engine_stalled"] == 0 and m["grace_serve_engine_seconds_since_last_step"] == 0
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        engine_lines = [
            json.loads(line)
            for line in srv.log_text().splitlines()
            if line.startswith('{"') and "KV cache:" in line
        ]
        assert engine_lines and engine_lines[0]["logger"] == "server.engine.core", srv.log_text()[-2000:]
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def test_a_client_that_stops_reading_is_not_a_stall(tmp_path):
    """Found in review: a stream whose client stops reading kept its request "pending" in the
    API process after the engine had finished it and gone idle, so /health turned 503 (and
    liveness would restart the replica) for as long as that one connection stayed open. The
    stall check now waits only on work the engine still owns."""
    import socket

    srv = ServerProcess(tmp_path, "--engine-stall-timeout", "1")
    try:
        srv.wait_ready()
        body = json.dumps({
            "messages": [{"role": "user", "content": "Write a long story."}], "stream": True, "n": 16,
            "max_tokens": 400, "ignore_eos": True, "logprobs": True, "top_logprobs": 20,
        }).encode()  # fmt: skip
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        # ~8 MB of events, a 4 KB receive window, and nothing ever read: the server's writes block
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", srv.port))
        try:
            sock.sendall(head + body)
            assert wait_until(lambda: scrape(srv.url)["grace_serve_num_requests_running"] > 0, 30)
            assert wait_until(lambda: kv_empty(srv.url), 120), "the engine never finished the request"
            time.sleep(2.5)  # > 2 x the stall timeout, the engine idle, the client still not reading
            health = httpx.get(srv.url + "/health", timeout=5)
            assert health.status_code == 200, health.text
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert scrape(srv.url)["grace_serve_engine_stalled"] == 0
        finally:
            sock.close()
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
