"""The HTTP edges: every way a response can end outside the happy path still ends in the
OpenAI shape. Malformed HTTP (raw sockets), WebSocket upgrades, the OpenAPI document against
the real status codes, and the drain deadline / forced shutdown with streams, a non-streamed
request and uploads still arriving. Traffic goes to 127.0.0.1 only; every loop and wait is
bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from api_server import ServerProcess, wait_until

_WS_HEADERS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, read until the server closes (or `timeout`); the whole answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    return _read_response(s, timeout)


def _split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # de-chunk (bounded by the data)
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return status, headers, body


def _assert_openai_error(body: bytes | dict, type_: str, code: str | None = None) -> dict:
    err = (json.loads(body) if isinstance(body, bytes) else body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == type_ and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("edges"), "--max-model-len", "512")
    srv.wait_ready()
    yield srv
    srv.stop()


# -- malformed HTTP ---------------------------------------------------------------------------------

MALFORMED = {
    "duplicate Content-Length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello",
    "bad chunk size": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "bad request line": b"GARBAGE\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "non-numeric Content-Length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_an_openai_400(server, case):
    """Before: uvicorn answered `400 text/plain "Invalid HTTP request received."` (for the
    bad chunk size even chunked, after the app had started on the request). Now: a JSON 400
    with code malformed_http, a Content-Length, and the connection closed."""
    status, headers, body = _split(_raw(server.port, MALFORMED[case]))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    _assert_openai_error(body, "invalid_request_error", "malformed_http")
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_malformed_pipelined_request_after_a_good_one(server):
    """A good request, then garbage on the same keep-alive connection: the first gets its
    answer, the second the JSON 400."""
    raw = _raw(server.port, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    first, _, rest = raw.partition(b"}")  # /version's body is one flat JSON object
    assert first.startswith(b"HTTP/1.1 200")
    status, _, body = _split(rest)
    assert status == 400
    _assert_openai_error(body, "invalid_request_error", "malformed_http")


# -- WebSocket upgrades -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health", "/nope"])
def test_websocket_upgrade_gets_an_openai_400(server, path):
    """Before: `403` with an empty body (uvicorn's WebSocket layer, wsproto here, after the
    router found no WebSocket route). Now: the gateway answers the websocket scope through the
    WebSocket Denial Response extension with a JSON 400 websocket_not_supported."""
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + _WS_HEADERS + b"\r\n"
    status, headers, body = _split(_raw(server.port, req, timeout=5))
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    _assert_openai_error(body, "invalid_request_error", "websocket_not_supported")


def test_websocket_refusal_in_process():
    """The two other ways an upgrade reaches the gateway: as plain HTTP (no WebSocket library
    in uvicorn) -> the same JSON 400; as a websocket scope without the denial extension ->
    a close before accept (the server's bare 403: the one place no body can be sent)."""
    from server.api.app import create_app
    from server.config import ServerConfig

    asgi, _ = create_app(ServerConfig())

    async def go() -> None:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.get("/v1/models", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
            assert r.status_code == 400
            _assert_openai_error(r.json(), "invalid_request_error", "websocket_not_supported")
            assert (await c.get("/v1/models", headers={"Upgrade": "websocket"})).status_code == 200

        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "websocket.connect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await asgi(
            {"type": "websocket", "path": "/v1/models", "headers": [], "extensions": {}}, receive, send
        )
        assert sent == [{"type": "websocket.close", "code": 1008}]

    asyncio.run(go())


def test_failure_outside_fastapi_is_an_openai_500(caplog):
    """An exception that escapes the FastAPI app before any response (FastAPI's own handlers
    answer everything inside it) used to propagate to uvicorn, which answers a text/plain
    "Internal Server Error". Now the gateway answers the OpenAI 500 and logs the traceback."""
    from server.api.app import create_app
    from server.config import ServerConfig

    asgi, _ = create_app(ServerConfig())

    async def broken(scope, receive, send) -> None:
        raise RuntimeError("secret detail")

    asgi.app = broken

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/v1/models", headers={"X-Request-Id": "edge-1"})

    r = asyncio.run(go())
    assert r.status_code == 500
    err = _assert_openai_error(r.json(), "server_error", "internal_error")
    assert "edge-1" in err["message"] and "secret" not in r.text
    assert "secret detail" in caplog.text


# -- the OpenAPI document ---------------------------------------------------------------------------


def test_openapi_document_matches_what_the_server_sends(server):
    """Before: every route with a body or parameter advertised 422 (never sent: validation
    errors are 400), and 400/401/404/413/503 were missing; /metrics was documented as JSON.
    Now each status a route really answers with is there, with the ErrorResponse body, and
    real error responses have exactly that shape."""
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert '"422"' not in json.dumps(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    paths = doc["paths"]
    expected = {
        ("/v1/chat/completions", "post"): {"200", "400", "401", "404", "413", "500", "503"},
        ("/v1/completions", "post"): {"200", "400", "401", "404", "413", "500", "503"},
        ("/tokenize", "post"): {"200", "400", "401", "404", "413", "500", "503"},
        ("/detokenize", "post"): {"200", "400", "401", "404", "413", "500", "503"},
        ("/v1/models", "get"): {"200", "401", "500", "503"},
        ("/v1/models/{model_id}", "get"): {"200", "401", "404", "500", "503"},
        ("/health", "get"): {"200", "503"},
        ("/metrics", "get"): {"200"},
    }
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == codes, (path, method, sorted(responses))
        for code in codes - {"200"}:
            assert responses[code]["content"]["application/json"]["schema"] == ref, (path, code)
    assert "Retry-After" in paths["/health"]["get"]["responses"]["503"]["headers"]
    metrics_200 = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert len(metrics_200) == 1 and next(iter(metrics_200)).startswith("text/plain; version=")
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]

    # the real responses, one per documented error status the running server can give here
    url = server.url
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [], "temperature": "x"}, timeout=10)
    assert r.status_code == 400
    _assert_openai_error(r.json(), "invalid_request_error")
    r = httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "hi"}, timeout=10)
    assert r.status_code == 404
    _assert_openai_error(r.json(), "invalid_request_error", "model_not_found")
    req = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n{" % 2**40
    status, _, body = _split(_raw(server.port, req, timeout=5))
    assert status == 413
    _assert_openai_error(body, "invalid_request_error", "request_too_large")
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.headers["content-type"] == next(iter(metrics_200))  # Prometheus text, as documented
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}


# -- the drain deadline and a forced shutdown ------------------------------------------------------


def _chat(max_tokens: int, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


class _Stream(threading.Thread):
    """One SSE stream read line by line in a thread (bounded by the client timeout)."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            body = _chat(self.max_tokens, stream=True)
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        self.events.append(line)
        except BaseException as e:
            self.error = e


def _long_stream_tokens(url: str, seconds: float, cap: int) -> int:
    """Enough tokens to stream for about `seconds` on this machine."""
    t0 = time.monotonic()
    httpx.post(url + "/v1/chat/completions", json=_chat(32, False), timeout=120).raise_for_status()
    per_token = (time.monotonic() - t0) / 32
    return int(min(cap, max(64, seconds / per_token)))


def _assert_ended_with_error_and_done(stream: _Stream, code: str) -> None:
    assert stream.error is None, stream.error
    assert stream.events[-1] == "data: [DONE]", stream.events[-3:]
    err = json.loads(stream.events[-2].removeprefix("data: "))
    _assert_openai_error(err, "service_unavailable_error", code)
    assert len(stream.events) >= 4  # role chunk + content before the end


def _upload_head(port: int, chunked: bool) -> socket.socket:
    """A POST whose body is still arriving: headers and a part of the body, no more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = b"Transfer-Encoding: chunked\r\n\r\n10\r\n" if chunked else b"Content-Length: 100000\r\n\r\n"
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + framing + b'{"messages": [{')  # fmt: skip
    return s


def _read_response(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def test_drain_deadline_ends_streams_requests_and_uploads_cleanly(tmp_path):
    """Before (--drain-timeout 5): streams still running at the deadline were cut mid-body
    (no error event, no [DONE]) and an upload still arriving got uvicorn's plain-text 500.
    Here, at a 1 s deadline: 3 streams, 1 non-streamed request and 2 uploads (Content-Length
    and chunked) in flight. Each stream ends with a service_unavailable_error event (code
    draining) and then [DONE]; the request and the uploads get an OpenAI 503; exit 0."""
    srv = ServerProcess(tmp_path, "--max-model-len", "4096", "--drain-timeout", "1")
    try:
        srv.wait_ready()
        length = _long_stream_tokens(srv.url, 20.0, 4000)
        streams = [_Stream(srv.url, length) for _ in range(3)]
        for st in streams:
            st.start()
        full: list[httpx.Response | BaseException] = []

        def non_streamed() -> None:
            try:
                full.append(
                    httpx.post(srv.url + "/v1/chat/completions", json=_chat(length, False), timeout=60)
                )
            except BaseException as e:
                full.append(e)

        waiter = threading.Thread(target=non_streamed, daemon=True)
        waiter.start()
        uploads = [_upload_head(srv.port, chunked=False), _upload_head(srv.port, chunked=True)]
        assert wait_until(lambda: all(len(st.events) >= 4 for st in streams), timeout=60)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for st in streams:
            st.join(20)
            assert not st.is_alive(), "a stream did not end after the drain deadline"
            _assert_ended_with_error_and_done(st, "draining")
        waiter.join(20)
        assert isinstance(full[0], httpx.Response), full
        assert full[0].status_code == 503
        _assert_openai_error(full[0].json(), "service_unavailable_error", "draining")
        for s in uploads:
            status, headers, body = _split(_read_response(s, 20))
            assert status == 503, body
            assert headers["content-type"] == "application/json" and headers["connection"] == "close"
            _assert_openai_error(body, "service_unavailable_error", "draining")
        srv.proc.wait(timeout=30)
        assert srv.proc.returncode == 0, srv.log_text()[-3000:]
        assert time.monotonic() - t0 < 15
    finally:
        srv.stop()
    log = srv.log_text()
    assert "drain timeout" in log and "Internal Server Error" not in log and "Traceback" not in log
    assert log.count("aborted=draining") == 6, log[-3000:]  # one access line each, marked


def test_second_signal_ends_streams_with_shutdown_error_and_done(tmp_path):
    """A second SIGTERM/Ctrl-C during a drain stops at once. Before: streams were dropped
    mid-body. Now they end with an error event (code shutdown) and [DONE] within ~2 s."""
    srv = ServerProcess(tmp_path, "--max-model-len", "4096", "--drain-timeout", "60")
    try:
        srv.wait_ready()
        length = _long_stream_tokens(srv.url, 20.0, 4000)
        streams = [_Stream(srv.url, length) for _ in range(2)]
        for st in streams:
            st.start()
        assert wait_until(lambda: all(len(st.events) >= 4 for st in streams), timeout=60)
        srv.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "draining:" in srv.log_text(), timeout=10)
        assert all(st.is_alive() for st in streams), "the streams ended before the second signal"
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for st in streams:
            st.join(15)
            assert not st.is_alive()
            _assert_ended_with_error_and_done(st, "shutdown")
        assert time.monotonic() - t0 < 5
        srv.proc.wait(timeout=30)
    finally:
        srv.stop()


def test_engine_death_answers_an_upload_still_arriving(tmp_path):
    """The engine process dies while a request body is still arriving. Before: the server
    exited after uvicorn's graceful timeout had cancelled the request, which got uvicorn's
    text/plain 500. Now it gets a JSON 503 engine_dead and the server exits 1 promptly."""
    import os

    srv = ServerProcess(tmp_path, "--max-model-len", "512")
    try:
        srv.wait_ready()
        upload = _upload_head(srv.port, chunked=False)
        time.sleep(0.5)  # the headers are in: the request is in flight
        os.kill(srv.engine_pid(), signal.SIGKILL)
        t0 = time.monotonic()
        status, _, body = _split(_read_response(upload, 20))
        assert status == 503, body
        _assert_openai_error(body, "service_unavailable_error", "engine_dead")
        srv.proc.wait(timeout=20)
        assert srv.proc.returncode == 1
        assert time.monotonic() - t0 < 8
    finally:
        srv.stop()
    assert "Internal Server Error" not in srv.log_text()


# -- schema-driven fuzzing ---------------------------------------------------------------------------


@pytest.mark.slow
def test_schemathesis_fuzz_short(tmp_path):
    """loadtest/fuzz_api.py for 30 s (CI time; the script runs longer by hand): schemathesis against /openapi.json of a demo server on
    127.0.0.1. Before: 405s without Allow, 422 advertised and 400/404/413/503 missing (every
    real error response a status_code_conformance failure). Now: no failure, no 5xx, no
    traceback in the server log, and the server still exits 0 on SIGTERM afterwards."""
    pytest.importorskip("schemathesis")
    from api_server import REPO

    cmd = [sys.executable, "loadtest/fuzz_api.py", "--max-time", "30", "--max-examples", "30"]
    r = subprocess.run([*cmd, "--keep", str(tmp_path)], cwd=REPO, timeout=420, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert " POST    /v1/chat/completions   200:" in r.stdout  # generation was reached, not only 400s


def test_fuzz_script_verdicts(tmp_path):
    """The script's own judgement, without a fuzz run: failed checks and network errors are
    findings, hypothesis' "Inconsistent results" inside schemathesis is not; a 5xx or a
    traceback in the server log is."""
    import importlib.util

    from api_server import REPO

    spec = importlib.util.spec_from_file_location("fuzz_api", REPO / "loadtest" / "fuzz_api.py")
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    (tmp_path / "junit-1.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="schemathesis">'
        '<testcase name="POST /a"><error type="error" message="Runtime Error&#10;&#10;Inconsistent '
        'results: A test case failed on the first run but now succeeds">tb</error></testcase>'
        '<testcase name="POST /b"><error type="error" message="Network Error&#10;&#10;Read timed out '
        'after 60.0 seconds">x</error></testcase>'
        '<testcase name="GET /c"><failure type="failure" message="Server error">500</failure></testcase>'
        '<testcase name="GET /d" /></testsuite></testsuites>'
    )
    findings, internal = fuzz.classify_report(tmp_path)
    assert [f.split(":")[0] for f in internal] == ["POST /a"]
    assert [f.split(":")[0] for f in findings] == ["POST /b", "GET /c"]
    log = (
        "2026-01-01 00:00:00,000 INFO grace_serve.access: 127.0.0.1 POST /v1/completions 400 1.0ms rid=a \n"
        "2026-01-01 00:00:00,000 INFO grace_serve.access: 127.0.0.1 GET /v1/models/x 500 1.0ms rid=b \n"
        "Traceback (most recent call last):\n"
    )
    counts, problems = fuzz.summarize(log)
    assert counts == {("POST", "/v1/completions", 400): 1, ("GET", "/v1/models/{id}", 500): 1}
    assert len(problems) == 2
