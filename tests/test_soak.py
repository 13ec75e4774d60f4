"""loadtest/soak.py: a short soak against a demo server it starts itself (0 unexpected failures,
gauges back to 0, every request kind exercised as intended, RSS of both processes sampled),
and its classifier on fake responses: a broken stream, a 5xx, a non-OpenAI error body, a wrong
status or a 200 of the wrong shape are unexpected, so the soak cannot pass vacuously.

The soak run is bounded: --duration 20 plus the in-flight tail, under a subprocess timeout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def load_soak() -> Any:
    spec = importlib.util.spec_from_file_location("soak", REPO / "loadtest" / "soak.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_soak()


# -- the short soak -------------------------------------------------------------------------


@pytest.mark.slow
def test_short_soak_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "loadtest" / "soak.py"), "--duration", "20", "--concurrency", "12", "--max-tokens", "8",
           "--rss-interval", "1", "--json", str(out), "--server-log", str(tmp_path / "server.log")]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=170)
    log = (
        (tmp_path / "server.log").read_text(errors="replace")[-3000:]
        if (tmp_path / "server.log").exists()
        else ""
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:] + log
    r = json.loads(out.read_text())

    assert r["passed"] and r["failures"] == [], r["failures"]
    assert r["total"]["unexpected"] == 0, r["unexpected_reasons"]
    assert r["idle"] and all(v == 0 for v in r["gauges"].values()), r["gauges"]
    assert set(r["gauges"]) == set(soak.GAUGES)
    assert r["health_after"] == 200 and r["server_exit"] == 0

    # every kind was sent and answered as intended
    assert set(r["by_kind"]) == set(soak.KINDS) | set(soak.HOSTILE_KINDS)
    for kind, row in r["by_kind"].items():
        assert row["sent"] >= 1, kind
        if kind in soak.HOSTILE_KINDS:  # refused or served, never a failure
            assert row["ok"] + row["refused"] >= 1 and row["unexpected"] == 0, (kind, row)
            continue
        want = "ok" if kind in soak.SUCCESS_KINDS else "refused" if kind in soak.REFUSAL_KINDS else "aborted"
        assert row[want] >= 1, (kind, row)
    for cls in soak.CLASSES[:3]:
        assert r["total"][cls] >= 1, cls
    # the server saw the same: refusals (400, 404, 413), aborts (499 and finished_reason abort)
    for status in ("200", "400", "404", "413", "499"):
        assert r["server_statuses"].get(status, 0) >= 1, (status, r["server_statuses"])
    assert not [s for s in r["server_statuses"] if s.startswith("5")], r["server_statuses"]
    assert r["finished_reasons"].get("abort", 0) >= 1, r["finished_reasons"]
    assert r["seeded_checks"] >= 1  # a seeded request was repeated and gave the same text
    assert r["prefix_cache_hit_tokens"] > 0  # repeated images and seeded prompts hit the cache

    # RSS of both processes, sampled through the load, judged
    assert set(r["rss"]) == {"api", "engine"}
    for name, s in r["rss"].items():
        assert s["samples"] >= 10 and s["ok"], (name, {k: v for k, v in s.items() if k != "series"})
        assert 0 < s["start_mb"] <= s["peak_mb"] and "growth_mb" in s and "slope_mb_per_min" in s
    assert r["rss"]["api"]["pid"] != r["rss"]["engine"]["pid"]

    for line in ("kind", "total", "RSS (MB)", "grace_serve_kv_cache_usage_perc", "PASS"):
        assert line in res.stdout


# -- the classifier, on fake responses --------------------------------------------------------


def chat_spec(**kw: Any) -> Any:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if kw.get("stream"):
        body["stream_options"] = {"include_usage": True}
    return soak.Spec("chat", soak.CHAT, body, **kw)


def chat_json(n: int = 1, **choice: Any) -> bytes:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "length",
            **choice,
        }
        for i in range(n)
    ]
    usage = {"prompt_tokens": 9, "completion_tokens": 4 * n, "total_tokens": 9 + 4 * n}
    data = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "demo",
            "choices": choices, "usage": usage}  # fmt: skip
    return json.dumps(data).encode()


def sse(*chunks: Any, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def chunk(content: str | None = None, finish: str | None = None, index: int = 0) -> dict:
    delta = {"content": content} if content is not None else {}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "demo",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}], "usage": None}  # fmt: skip


USAGE = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "demo", "choices": [],
         "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}  # fmt: skip
GOOD_STREAM = sse(chunk(""), chunk("he"), chunk("llo", "length"), USAGE)
OPENAI_400 = json.dumps(
    {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": None}}
).encode()


def test_classifier_accepts_good_answers() -> None:
    v = soak.classify(chat_spec(), 200, chat_json())
    assert (v.cls, v.texts) == ("ok", ["hello"])
    assert soak.classify(chat_spec(choices=3), 200, chat_json(3)).cls == "ok"
    v = soak.classify(chat_spec(stream=True), 200, GOOD_STREAM)
    assert (v.cls, v.texts) == ("ok", ["hello"])
    assert soak.classify(chat_spec(expect="refused", status=400), 400, OPENAI_400).cls == "refused"
    busy = json.dumps({"error": {"message": "x", "type": "service_unavailable_error", "param": None,
                                 "code": "queue_full"}}).encode()  # fmt: skip
    assert soak.classify(chat_spec(), 503, busy).cls == "refused"  # documented backpressure
    assert soak.classify(chat_spec(expect="any"), 400, OPENAI_400).cls == "refused"
    assert soak.classify(chat_spec(expect="any"), 200, chat_json()).cls == "ok"


@pytest.mark.parametrize(
    ("name", "spec", "status", "body"),
    [
        ("stream without [DONE]", chat_spec(stream=True), 200, sse(chunk(""), chunk("hi", "length"), USAGE, done=False)),
        ("stream cut before any finish_reason", chat_spec(stream=True), 200, sse(chunk(""), chunk("hi"))),
        ("error event in a stream", chat_spec(stream=True), 200,
         sse(chunk("hi"), {"error": {"message": "engine died", "type": "server_error", "param": None, "code": None}})),
        ("a line that is not SSE", chat_spec(stream=True), 200, b"hello\n\n" + GOOD_STREAM),
        ("a chunk that is not JSON", chat_spec(stream=True), 200, b"data: {oops\n\n" + GOOD_STREAM),
        ("data after [DONE]", chat_spec(stream=True), 200, GOOD_STREAM + sse(chunk("x"), done=False)),
        ("stream without the usage chunk", chat_spec(stream=True), 200, sse(chunk(""), chunk("hi", "length"))),
        ("500 with an OpenAI body", chat_spec(), 500,
         json.dumps({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}).encode()),
        ("502 plain text", chat_spec(), 502, b"Bad Gateway"),
        ("503 engine_dead", chat_spec(), 503,
         json.dumps({"error": {"message": "x", "type": "service_unavailable_error", "param": None,
                               "code": "engine_dead"}}).encode()),
        ("500 for a bad request", chat_spec(expect="refused", status=400), 500, b"Internal Server Error"),
        ("400 with a FastAPI body", chat_spec(expect="refused", status=400), 400, b'{"detail": "bad"}'),
        ("400 plain text from uvicorn", chat_spec(expect="refused", status=400), 400, b"Invalid HTTP request received."),
        ("error body without param/code", chat_spec(expect="refused", status=400), 400,
         b'{"error": {"message": "bad", "type": "invalid_request_error"}}'),
        ("hostile number: 500", chat_spec(expect="any"), 500, b"Internal Server Error"),
        ("hostile number: 4xx without OpenAI body", chat_spec(expect="any"), 422, b'{"detail": []}'),
        ("wrong refusal status", chat_spec(expect="refused", status=400), 404, OPENAI_400),
        ("a bad request answered 200", chat_spec(expect="refused", status=400), 200, chat_json()),
        ("a valid request refused", chat_spec(), 400, OPENAI_400),
        ("200 not in the OpenAI shape", chat_spec(), 200, b'{"text": "hello"}'),
        ("200 that is not JSON", chat_spec(), 200, b"hello"),
        ("200 with the wrong object", chat_spec(), 200, chat_json().replace(b'"chat.completion"', b'"list"')),
        ("n=3 answered with 1 choice", chat_spec(choices=3), 200, chat_json(1)),
        ("logprobs asked, none sent", chat_spec(top_logprobs=2), 200, chat_json(logprobs=None)),
        ("finish_reason abort", chat_spec(), 200, chat_json().replace(b'"length"', b'"abort"')),
        ("usage inconsistent", chat_spec(), 200, chat_json().replace(b'"total_tokens": 13', b'"total_tokens": 99')),
        ("3xx", chat_spec(), 302, b""),
    ],
)  # fmt: skip
def test_classifier_flags_unexpected(name: str, spec: Any, status: int, body: bytes) -> None:
    v = soak.classify(spec, status, body)
    assert v.cls == "unexpected", (name, v)
    assert v.reason


def mock_client(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


def run_send(handler: Any, spec: Any, timeout: float = 5.0) -> Any:
    async def go() -> Any:
        async with mock_client(handler) as client:
            return await soak.send(client, spec, timeout)

    return asyncio.run(go())


class BrokenStream(httpx.AsyncByteStream):
    async def __aiter__(self):
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": []}\n\n'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_send_flags_broken_connections_and_timeouts() -> None:
    res, _ = run_send(lambda req: httpx.Response(200, stream=BrokenStream()), chat_spec(stream=True))
    assert res.cls == "unexpected" and "connection error" in res.reason

    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    res, _ = run_send(refuse, chat_spec())
    assert res.cls == "unexpected" and res.status is None

    async def slow(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=chat_json())

    res, _ = run_send(slow, chat_spec(), timeout=0.2)
    assert res.cls == "unexpected" and "within" in res.reason

    res, _ = run_send(lambda req: httpx.Response(200, content=GOOD_STREAM), chat_spec(stream=True))
    assert res.cls == "ok" and res.ttft is not None
    res, _ = run_send(lambda req: httpx.Response(500, content=b"oops"), chat_spec(stream=True))
    assert (res.cls, res.status) == ("unexpected", 500)
    # an abort the client chose is its own class, not a failure nor a success
    res, _ = run_send(slow, chat_spec(abort="request", abort_after=0.05))
    assert res.cls == "aborted"
    res, _ = run_send(
        lambda req: httpx.Response(200, content=GOOD_STREAM), chat_spec(stream=True, abort="stream")
    )
    assert res.cls == "aborted"


def test_seeded_texts_must_repeat() -> None:
    book = soak.SeedBook()
    assert book.check((0, 1), ["a b"]) is None
    assert book.check((0, 1), ["a b"]) is None
    assert book.check((1, 1), ["c"]) is None
    assert "changed" in book.check((0, 1), ["a c"])
    assert book.checked == 2  # the first text of a key is not a comparison


def test_rss_judgement() -> None:
    flat = [(t, 500.0 + (t % 3)) for t in range(0, 100, 2)]
    s = soak.rss_summary(flat, (0.0, 100.0), 64)
    assert s["ok"] and abs(s["growth_mb"]) < 3 and abs(s["slope_mb_per_min"]) < 5
    leak = [(t, 500.0 + 2.0 * t) for t in range(0, 100, 2)]  # 2 MB/s
    s = soak.rss_summary(leak, (0.0, 100.0), 64)
    assert not s["ok"] and s["growth_mb"] > 100 and s["slope_mb_per_min"] == pytest.approx(120, rel=0.01)
    assert (s["start_mb"], s["peak_mb"], s["end_mb"]) == (500.0, 696.0, 696.0)
    warmup = [(t, 300.0 if t < 20 else 500.0) for t in range(0, 100, 2)]  # growth in the first fifth: fine
    assert soak.rss_summary(warmup, (0.0, 100.0), 64)["ok"]
    assert soak.rss_summary([], (0.0, 10.0), 64)["ok"]


def test_cycle_and_coverage() -> None:
    cycle = soak.make_cycle(soak.KINDS, seed=3)
    assert set(cycle[: len(soak.KINDS)]) == set(soak.KINDS)  # the first requests cover every kind
    assert sorted(cycle) == sorted(k for k, w in soak.KINDS.items() for _ in range(w))
    assert set(soak.KINDS) == soak.SUCCESS_KINDS | soak.REFUSAL_KINDS | {"abort_stream", "abort_request"}
    rows = {k: {"sent": 1, **dict.fromkeys(soak.CLASSES, 0)} for k in ("chat", "bad_json", "abort_stream")}
    rows["chat"]["refused"] = 1  # a success kind that was only refused: not exercised
    rows["bad_json"]["refused"] = 1
    assert soak.coverage_problems(rows) == [
        "kind chat never answered as intended (1 sent)",
        "kind abort_stream never answered as intended (1 sent)",
    ]


def test_every_kind_builds_a_request() -> None:
    work = soak.Workload("demo", 256, 8, 1000, seed=0)
    kinds = work.kinds(hostile=True)
    assert "oversized_body" in kinds and "hostile_numbers" in kinds
    assert "oversized_body" not in soak.Workload("demo", 256, 8, None, seed=0).kinds(hostile=False)
    for kind in kinds:
        for _ in range(6):
            spec = work.make(kind)
            assert spec.kind == kind and spec.path in (soak.CHAT, soak.COMPLETIONS)
            if not isinstance(spec.body, bytes):
                json.dumps(spec.body)
            assert spec.expect in ("ok", "refused", "any")
    body = work.make("oversized_body").body
    assert len(body) > 1000


def test_only_local_urls() -> None:
    with pytest.raises(SystemExit):
        soak.parse_args(["--url", "http://example.com:8000"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--url", "http://localhost:8000"])
    assert soak.parse_args(["--url", "http://127.0.0.1:8000"]).url == "http://127.0.0.1:8000"
    assert soak.parse_args([]).hostile and not soak.parse_args(["--no-hostile"]).hostile
