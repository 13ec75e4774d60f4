"""Unit tests of the HTTP layer's parts that need no model: config from flags and env, SSRF
rules and the image fetcher (against a local test server), error shapes, metrics bookkeeping."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from types import SimpleNamespace
from typing import ClassVar

import httpx
import pytest
from api_server import image_bytes

from server.api.errors import from_validation_errors, param_path
from server.api.media import MediaPolicy, _check_address, check_allowed, fetch_image
from server.config import FLAGS, build_parser, parse_config
from server.metrics import Metrics, RequestMetrics, build_1_2_5_buckets
from server.model.images import ImageError

# -- config -------------------------------------------------------------------------------------


def test_env_vars_are_defaults_and_flags_win():
    env = {
        "GRACE_SERVE_PORT": "9001",
        "GRACE_SERVE_MODEL": "/models/grace",
        "GRACE_SERVE_API_KEY": "k1, k2",
        "GRACE_SERVE_ENABLE_PREFIX_CACHING": "false",
        "GRACE_SERVE_ALLOWED_MEDIA_DOMAINS": "images.example.com,cdn.example.com",
        "GRACE_SERVE_MAX_QUEUED_REQUESTS": "7",
        "GRACE_SERVE_LOG_FORMAT": "json",
    }
    c = parse_config([], env=env)
    assert (c.port, c.model, c.api_keys, c.enable_prefix_caching) == (
        9001,
        "/models/grace",
        ["k1", "k2"],
        False,
    )
    assert c.allowed_media_domains == ["images.example.com", "cdn.example.com"]
    assert (c.max_queued_requests, c.log_format) == (7, "json")
    c = parse_config(
        ["--port", "9002", "--api-key", "a", "--api-key", "b", "--enable-prefix-caching"], env=env
    )
    assert (c.port, c.api_keys, c.enable_prefix_caching) == (9002, ["a", "b"], True)
    assert c.model_name == "/models/grace"
    args = c.engine_args()
    assert (args.model, args.enable_prefix_caching, args.max_num_seqs) == ("/models/grace", True, 64)


def test_engine_mode_flags_reach_the_engine():
    """--async-scheduling is tri-state (unset: the engine picks, on with CUDA); the
    environment and the command line both set it and --enforce-eager."""
    assert parse_config([], env={}).engine_args().async_scheduling is None
    args = parse_config(["--no-async-scheduling", "--enforce-eager"], env={}).engine_args()
    assert (args.async_scheduling, args.enforce_eager) == (False, True)
    env = {"GRACE_SERVE_ASYNC_SCHEDULING": "true", "GRACE_SERVE_ENFORCE_EAGER": "0"}
    args = parse_config([], env=env).engine_args()
    assert (args.async_scheduling, args.enforce_eager) == (True, False)


def test_engine_options_are_declared_once_and_all_are_flags():
    """ServerConfig takes its engine fields from EngineArgs (no second set of defaults), and
    every engine option a user may need is a flag (encoder_cache_bytes is internal)."""
    import dataclasses

    from server.config import FLAGS, ServerConfig
    from server.engine.args import EngineArgs

    engine = {f.name for f in dataclasses.fields(EngineArgs)}
    assert engine <= {f.name for f in dataclasses.fields(ServerConfig)}
    assert ServerConfig().engine_args() == EngineArgs()
    assert engine - {f.dest for f in FLAGS} == {"encoder_cache_bytes"}
    args = parse_config(["--kernel-backend", "reference", "--max-num-seqs", "3"], env={}).engine_args()
    assert (args.kernel_backend, args.max_num_seqs) == ("reference", 3)


def test_defaults_and_help_lists_every_env_var():
    c = parse_config([], env={})
    assert (c.host, c.port, c.model, c.api_keys, c.allowed_media_domains) == (
        "127.0.0.1",
        8000,
        "demo",
        [],
        [],
    )
    assert c.max_request_bytes == 32 * 1024 * 1024
    text = build_parser({"GRACE_SERVE_API_KEY": "top-secret"}).format_help()
    for f in FLAGS:
        assert f.env in text
    assert "top-secret" not in text  # keys from the environment are never printed


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--port", "0"], {}),
        (["--max-queued-requests", "0"], {}),
        (["--gpu-memory-utilization", "1.5"], {}),
        (["--log-format", "xml"], {}),
        ([], {"GRACE_SERVE_PORT": "eighty"}),
        ([], {"GRACE_SERVE_ENABLE_PREFIX_CACHING": "maybe"}),
    ],
)
def test_bad_config_is_refused(argv, env):
    with pytest.raises(SystemExit):
        parse_config(argv, env=env)


# -- SSRF rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
     "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::"],
)  # fmt: skip
def test_private_loopback_link_local_addresses_are_refused(addr):
    with pytest.raises(ImageError, match="private, loopback"):
        _check_address(addr, MediaPolicy())


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"])
def test_public_addresses_pass(addr):
    assert str(_check_address(addr, MediaPolicy())) == addr


@pytest.mark.parametrize(
    "url, match",
    [
        ("https://evil.example/x.png", "not allowed"),
        ("file:///etc/passwd", "scheme"),
        ("ftp://images.example.com/x.png", "scheme"),
        ("https://user:pw@images.example.com/x.png", "credentials"),
        ("http://images.example.com:99999/x.png", "malformed"),
    ],
)
def test_check_allowed_refuses_without_network(url, match):
    with pytest.raises(ImageError, match=match):
        check_allowed(url, MediaPolicy(frozenset({"images.example.com"})))


# -- the fetcher, against a local server ------------------------------------------------------------

PNG = image_bytes("PNG", (32, 32))


class _Handler(http.server.BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        _Handler.hosts.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {"Content-Length": str(len(PNG))}, PNG),
            "/same-host-redirect": (302, {"Location": "/img.png"}, b""),
            "/other-host-redirect": (302, {"Location": f"http://127.0.0.2:{port}/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {"Content-Length": "5000"}, b"\0" * 5000),
            "/big-no-length": (200, {}, b"\0" * 5000),
        }
        if self.path == "/slow":
            time.sleep(1.5)
        status, headers, body = routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_host():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _fetch(url: str, max_bytes: int = 1000, timeout: float = 5.0, allow_private: bool = True) -> bytes:
    policy = MediaPolicy(frozenset({"127.0.0.1"}), timeout, max_bytes, allow_private_addresses=allow_private)

    async def go() -> bytes:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await fetch_image(url, policy, client)

    return asyncio.run(go())


def test_fetch_ok_and_same_host_redirect(image_host):
    assert _fetch(image_host + "/img.png") == PNG
    assert _fetch(image_host + "/same-host-redirect") == PNG
    assert _Handler.hosts[-1] == image_host.removeprefix("http://")  # the name travels in Host


@pytest.mark.parametrize(
    "path, match",
    [
        ("/other-host-redirect", "another host"),
        ("/loop", "redirects more than"),
        ("/big", "too large"),
        ("/big-no-length", "too large"),
        ("/missing", "HTTP 404"),
        ("/slow", "longer than"),
    ],
)
def test_fetch_refusals(image_host, path, match):
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=match):
        _fetch(image_host + path, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_fetch_refuses_loopback_by_default(image_host):
    with pytest.raises(ImageError, match="private, loopback"):
        _fetch(image_host + "/img.png", allow_private=False)


# -- errors -----------------------------------------------------------------------------------------


def test_param_paths_and_union_messages():
    assert param_path(("body", "messages", 0, "content", "list[ContentPart]", 1, "image_url", "url")) == (
        "messages[0].content[1].image_url.url"
    )
    assert param_path(("body",)) is None
    # a union of models: the member's class name is no part of the path (found by fuzzing)
    assert param_path(("body", "tool_choice", "NamedToolChoice", "function")) == "tool_choice.function"
    err = from_validation_errors(
        [
            {"loc": ("body", "stop", "str"), "msg": "Input should be a valid string", "type": "string_type"},
            {
                "loc": ("body", "stop", "list[str]"),
                "msg": "Input should be a valid list",
                "type": "list_type",
            },
        ]
    )
    assert (err.status, err.param) == (400, "stop")
    assert err.message == "stop: Input should be a valid string or a valid list"
    assert err.body() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": "stop", "code": None}
    }


# -- metrics ----------------------------------------------------------------------------------------


def test_token_buckets_like_vllm():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(4096)[-1] == 2000


def _sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, {"model_name": "demo", "engine": "0", **labels})
    return 0.0 if value is None else value


def test_request_metrics_accounting():
    m = Metrics("demo", 4096)

    def delta(tokens: list[int], finish: str | None = None) -> SimpleNamespace:
        seqs = [SimpleNamespace(index=i, finish_reason=finish) for i in range(len(tokens))]
        return SimpleNamespace(
            num_prompt_tokens=10, num_cached_tokens=0, first_token=None, completion_tokens=tokens, deltas=seqs
        )

    rm = RequestMetrics(m)
    rm.on_delta(delta([1, 1]))
    rm.on_delta(delta([3, 2]))  # two steps arrived together: two inter-token gaps
    rm.on_delta(delta([4, 4], "length"))
    rm.finish(2)
    rm.finish(2)  # recorded once only
    assert _sample(m, "grace_serve_time_to_first_token_seconds_count") == 1
    assert _sample(m, "grace_serve_inter_token_latency_seconds_count") == 3
    assert _sample(m, "grace_serve_prompt_tokens_total") == 10
    assert _sample(m, "grace_serve_generation_tokens_total") == 8
    assert _sample(m, "grace_serve_request_success_total", finished_reason="length") == 2
    assert _sample(m, "grace_serve_e2e_request_latency_seconds_count") == 1
    aborted = RequestMetrics(m)
    aborted.on_delta(delta([1]))
    aborted.finish(1, aborted=True)
    assert _sample(m, "grace_serve_request_success_total", finished_reason="abort") == 1


def test_engine_stats_become_gauges_and_counter_increments():
    m = Metrics("demo", 4096)

    def stats(**kw: float) -> SimpleNamespace:
        base = dict(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_preemptions=0, prefix_cache_queries=0,
                    prefix_cache_hits=0, step_tokens=0, num_steps=0)  # fmt: skip
        return SimpleNamespace(**{**base, **kw})

    m.on_engine_stats(stats(prefix_cache_queries=32, prefix_cache_hits=16, step_tokens=32, num_steps=1))
    m.on_engine_stats(stats(prefix_cache_queries=48, prefix_cache_hits=16, num_preemptions=1, step_tokens=2,
                            num_steps=2))  # fmt: skip
    m.on_engine_stats(
        stats(prefix_cache_queries=48, prefix_cache_hits=16, num_preemptions=1, num_steps=2)
    )  # no step ran
    assert _sample(m, "grace_serve_prefix_cache_queries_total") == 48
    assert _sample(m, "grace_serve_prefix_cache_hits_total") == 16
    assert _sample(m, "grace_serve_num_preemptions_total") == 1
    assert _sample(m, "grace_serve_iteration_tokens_total_count") == 2
    assert _sample(m, "grace_serve_iteration_tokens_total_sum") == 34
    assert _sample(m, "grace_serve_kv_cache_usage_perc") == 0.25
    assert _sample(m, "grace_serve_num_requests_running") == 2
    assert _sample(m, "grace_serve_engine_steps_total") == 2


# -- the gateway, in process (no engine: the lifespan is not run) ------------------------------------


def _asgi_client(**config: object):
    from server.api.app import create_app
    from server.config import ServerConfig

    asgi, state = create_app(ServerConfig(**config))  # type: ignore[arg-type]
    state.max_model_len = 128
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test")
    return client, state


def test_gateway_auth_public_paths_and_draining():
    async def go() -> None:
        client, state = _asgi_client(api_keys=["k1", "k2"])
        async with client:
            assert (await client.get("/v1/models")).status_code == 401
            r = await client.get("/v1/models", headers={"Authorization": "Bearer k2"})
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "demo"
            assert (await client.get("/v1/models", headers={"Authorization": "Basic k2"})).status_code == 401
            assert (await client.get("/metrics")).status_code == 200  # public
            assert (await client.get("/health")).status_code == 503  # no engine here
            state.start_drain()
            r = await client.get("/v1/models", headers={"Authorization": "Bearer k1"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json()["error"]["code"] == "draining"
            assert state.inflight == 0

    asyncio.run(go())


def test_a_bug_is_a_500_without_internals(monkeypatch, caplog):
    import server.api.app as app_module

    def broken(state):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app_module, "_card", broken)

    async def go() -> httpx.Response:
        client, _ = _asgi_client()
        async with client:
            return await client.get("/v1/models", headers={"X-Request-Id": "bug-1"})

    r = asyncio.run(go())
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    err = r.json()["error"]
    assert err == {"message": "internal server error (request id bug-1)", "type": "server_error", "param": None,
                   "code": "internal_error"}  # fmt: skip
    assert "secret" not in r.text
    assert any("bug-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_sse_events_survive_line_readers_that_split_on_unicode_breaks():
    """Found by the 30-minute soak: the demo model emitted U+0085 / U+2028, json.dumps left it
    raw, and httpx's aiter_lines (str.splitlines rules) cut the event in two. Each event is one
    line by any reader's rules and round-trips through JSON."""
    import json

    from server.api.chat import _sse

    payload = {"delta": {"content": "a\x85b\u2028c\u2029d\ne\x0bf\x1cg — ü"}}
    event = _sse(payload).decode()
    assert event.startswith("data: ") and event.endswith("\n\n")
    line = event[len("data: ") : -2]
    assert line.splitlines() == [line]
    assert json.loads(line) == payload
