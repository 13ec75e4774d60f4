"""Bad requests, table-driven: each row says what was tried and the documented answer (status,
OpenAI error type, param, code). Afterwards the server is healthy and its KV cache empty."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from api_server import ServerProcess, data_url, image_bytes, kv_empty, png_bomb, wait_until

API_KEY = "sekrit-key"
MODEL = "grace-demo"
MAX_MODEL_LEN = 256
MAX_BODY = 1_000_000
ANY = object()  # param not checked


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("api-errors"),
        "--served-model-name", MODEL,
        "--api-key", API_KEY,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-request-bytes", str(MAX_BODY),
        "--max-image-bytes", "300000",
        "--max-images-per-request", "3",
        "--max-image-pixels", "4000000",
        "--allowed-media-domains", "localhost", "10.0.0.1", "[::1]",
    )  # fmt: skip
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def _msgs(*parts: Any) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "what is this?"}
OK_MSGS = [{"role": "user", "content": "hi"}]
PNG = image_bytes("PNG", (32, 32))


def _chat(**fields: Any) -> dict:
    return {"model": MODEL, "messages": OK_MSGS, "max_tokens": 4, **fields}


@dataclass
class Case:
    name: str  # what is tried
    status: int
    body: Any = None  # dict -> JSON; bytes -> sent as is
    param: Any = None
    type: str = "invalid_request_error"
    code: Any = ANY
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = API_KEY


CASES = [
    # body shape
    Case("malformed JSON", 400, b'{"messages": [', param=None, code="invalid_json"),
    Case("JSON array instead of an object", 400, b"[1, 2]"),
    Case("text/plain body", 400, b"hello", headers={"Content-Type": "text/plain"}),
    Case("messages missing", 400, {"model": MODEL}, param="messages"),
    Case("messages empty", 400, _chat(messages=[]), param="messages"),
    Case("messages is a string", 400, _chat(messages="hi"), param="messages"),
    Case("unknown role", 400, _chat(messages=[{"role": "robot", "content": "hi"}]), param="messages[0].role"),
    Case("tool message without tool_call_id", 400, _chat(messages=[{"role": "tool", "content": "x"}]),
         param="messages[0].tool_call_id"),
    Case("tool_calls on a user message", 400,
         _chat(messages=[{"role": "user", "content": "x", "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
         param="messages[0].tool_calls"),
    Case("role missing", 400, _chat(messages=[{"content": "hi"}]), param="messages[0].role"),
    Case("content is a number", 400, _chat(messages=[{"role": "user", "content": 42}]), param="messages[0].content"),
    Case("unknown content part type", 400, _chat(messages=_msgs({"type": "audio", "audio": "x"})),
         param="messages[0].content[0].type"),
    Case("text part without text", 400, _chat(messages=_msgs({"type": "text"})), param="messages[0].content[0]"),
    Case("an image in a system message (the template drops it)", 400,
         _chat(messages=[{"role": "system", "content": [_img(data_url(PNG))]}, *OK_MSGS]),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("image_url is a string", 400, _chat(messages=_msgs({"type": "image_url", "image_url": "data:x"})),
         param="messages[0].content[0].image_url"),
    # sampling fields: wrong types and ranges
    Case("temperature is a string", 400, _chat(temperature="hot"), param="temperature"),
    Case("negative temperature", 400, _chat(temperature=-0.5), param="temperature"),
    Case("top_p > 1", 400, _chat(top_p=1.5), param="top_p"),
    Case("top_p = 0", 400, _chat(top_p=0), param="top_p"),
    Case("top_k < -1", 400, _chat(top_k=-5), param="top_k"),
    Case("max_tokens = 0", 400, _chat(max_tokens=0), param="max_tokens"),
    Case("max_tokens negative", 400, _chat(max_tokens=-3), param="max_tokens"),
    Case("max_tokens is a float", 400, _chat(max_tokens=1.5), param="max_tokens"),
    Case("max_completion_tokens = 0", 400, _chat(max_completion_tokens=0), param="max_completion_tokens"),
    Case("n = 0", 400, _chat(n=0), param="n"),
    Case("n too large", 400, _chat(n=100), param="n"),
    Case("stream is a string", 400, _chat(stream="yes"), param="stream"),
    Case("stop is a number", 400, _chat(stop=5), param="stop"),
    Case("empty stop string", 400, _chat(stop=[""]), param="stop"),
    Case("17 stop strings (16 allowed)", 400, _chat(stop=[f"s{i}" for i in range(17)]), param="stop"),
    Case("a 513-character stop string (512 allowed)", 400, _chat(stop=["x" * 513]), param="stop"),
    Case("seed is a string", 400, _chat(seed="abc"), param="seed"),
    Case("top_logprobs > 20", 400, _chat(logprobs=True, top_logprobs=50), param="top_logprobs"),
    Case("top_logprobs without logprobs", 400, _chat(top_logprobs=2), param="top_logprobs"),
    Case("presence_penalty out of range", 400, _chat(presence_penalty=5), param="presence_penalty"),
    Case("repetition_penalty = 0", 400, _chat(repetition_penalty=0), param="repetition_penalty"),
    Case("repetition_penalty = 1e-300 (seen logits became inf, then NaN)", 400, _chat(repetition_penalty=1e-300),
         param="repetition_penalty"),
    Case("min_tokens > max_tokens", 400, _chat(min_tokens=10, max_tokens=2), param="min_tokens"),
    Case("min_tokens beyond the context (no max_tokens)", 400, {"messages": OK_MSGS, "min_tokens": 10_000},
         param="min_tokens"),
    Case("stop_token_ids out of vocabulary", 400, _chat(stop_token_ids=[10**9]), param="stop_token_ids"),
    # hostile numbers: each one reached a tensor constructor in the engine step before it
    # was bounded here (top_k >= 2**63 raised OverflowError there and ended the engine)
    Case("top_k = 2**63 (killed the engine)", 400, _chat(top_k=2**63, temperature=1.0), param="top_k"),
    Case("top_k = 2**31", 400, _chat(top_k=2**31, temperature=0.5), param="top_k"),
    Case("completions: top_k = 2**64", 400, {"prompt": "hi", "max_tokens": 2, "top_k": 2**64, "temperature": 1},
         path="/v1/completions", param="top_k"),
    Case("seed = 2**64", 400, _chat(seed=2**64), param="seed"),
    Case("seed below -2**63", 400, _chat(seed=-(2**63) - 1), param="seed"),
    Case("stop_token_ids with 2**70", 400, _chat(stop_token_ids=[2**70]), param="stop_token_ids[0]"),
    Case("stop_token_ids negative", 400, _chat(stop_token_ids=[-3]), param="stop_token_ids[0]"),
    Case("65 stop_token_ids (64 allowed)", 400, _chat(stop_token_ids=[1] * 65), param="stop_token_ids"),
    Case("temperature NaN (json.loads takes it)", 400, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
         param="temperature"),
    Case("top_p Infinity", 400, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', param="top_p"),
    Case("presence_penalty -Infinity", 400, b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}',
         param="presence_penalty"),
    Case("max_tokens = 2**80", 400, _chat(max_tokens=2**80), param="max_tokens", code="context_length_exceeded"),
    Case("min_tokens = 2**80", 400, _chat(min_tokens=2**80, max_tokens=None), param="min_tokens"),
    Case("completions: n=16 x 16 prompts (128 choices allowed)", 400,
         {"prompt": ["hi"] * 16, "n": 16, "max_tokens": 2}, path="/v1/completions", param="n"),
    Case("n = 2**40", 400, _chat(n=2**40), param="n"),
    Case("top_logprobs = 2**63", 400, _chat(logprobs=True, top_logprobs=2**63), param="top_logprobs"),
    # images
    Case("bad base64", 400, _chat(messages=_msgs(_img("data:image/png;base64,@@@not-base64!!"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("non-image bytes", 400, _chat(messages=_msgs(_img(data_url(b"hello, I am text, not pixels" * 4)), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("truncated PNG", 400, _chat(messages=_msgs(TEXT, _img(data_url(image_bytes("PNG", (64, 64))[:-30])))),
         param="messages[0].content[1].image_url.url", code="invalid_image"),
    Case("20000x20000 PNG (decompression bomb)", 400, _chat(messages=_msgs(_img(data_url(png_bomb())), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("6000x1000 image over --max-image-pixels", 400, _chat(messages=_msgs(_img(data_url(png_bomb(6000, 1000))), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("too many images", 400, _chat(messages=_msgs(*[_img(data_url(PNG))] * 4, TEXT)), param="messages",
         code="too_many_images"),
    Case("image over the byte limit", 400, _chat(messages=_msgs(_img(data_url(b"\x89PNG" + b"\0" * 400_000)), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("data URL that is not an image type", 400,
         _chat(messages=_msgs(_img("data:text/plain;base64," + base64.b64encode(b"hi").decode()), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image"),
    Case("file:// URL", 400, _chat(messages=_msgs(_img("file:///etc/passwd"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("private IP URL (host allowed)", 400, _chat(messages=_msgs(_img("http://10.0.0.1/cat.png"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("loopback IPv6 URL (host allowed)", 400, _chat(messages=_msgs(_img("http://[::1]:9/cat.png"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("name resolving to loopback (host allowed)", 400, _chat(messages=_msgs(_img("http://localhost:9/a.png"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("link-local metadata URL (host not allowed)", 400,
         _chat(messages=_msgs(_img("http://169.254.169.254/latest/meta-data"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("https URL on a host not allowed", 400, _chat(messages=_msgs(_img("https://example.com/cat.png"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    Case("URL with credentials", 400, _chat(messages=_msgs(_img("http://user:pw@localhost/a.png"), TEXT)),
         param="messages[0].content[0].image_url.url", code="invalid_image_url"),
    # context length
    Case("prompt over max-model-len", 400, _chat(messages=[{"role": "user", "content": "lorem ipsum " * 400}]),
         param="messages", code="context_length_exceeded"),
    Case("prompt + max_tokens over max-model-len", 400, _chat(max_tokens=MAX_MODEL_LEN), param="max_tokens",
         code="context_length_exceeded"),
    # size, model, auth, routes
    Case("oversized body", 413, _chat(padding="x" * (MAX_BODY + 10)), code="request_too_large"),
    Case("unknown model", 404, _chat(model="gpt-4"), param="model", code="model_not_found"),
    Case("missing API key", 401, _chat(), auth=None, code="invalid_api_key"),
    Case("wrong API key", 401, _chat(), auth="sekrit-kez", code="invalid_api_key"),
    Case("wrong API key on /v1/models", 401, None, method="GET", path="/v1/models", auth="nope"),
    Case("GET on a POST route", 405, None, method="GET", code="method_not_allowed"),
    Case("unknown route", 404, {}, path="/v1/nothing-here", code="not_found"),
    # completions and tokenizer endpoints
    Case("completions: empty prompt", 400, {"prompt": "", "max_tokens": 2}, path="/v1/completions", param="prompt"),
    Case("completions: token id out of range", 400, {"prompt": [1, 2, 10**8]}, path="/v1/completions", param="prompt"),
    Case("completions: prompt is an object", 400, {"prompt": {"a": 1}}, path="/v1/completions", param="prompt"),
    Case("completions: echo unsupported", 400, {"prompt": "hi", "echo": True}, path="/v1/completions", param="echo"),
    Case("completions: logprobs > 20", 400, {"prompt": "hi", "logprobs": 21}, path="/v1/completions", param="logprobs"),
    Case("detokenize: token id out of range", 400, {"tokens": [-1]}, path="/detokenize", param="tokens"),
    Case("tokenize: neither prompt nor messages", 400, {}, path="/tokenize", param="prompt"),
    Case("tokenize: a tool message without tool_call_id (as chat refuses it)", 400,
         {"messages": [{"role": "tool", "content": "x"}]}, path="/tokenize", param="messages[0].tool_call_id"),
    # a lone UTF-16 surrogate is valid JSON but not text: tokenizers refuse it
    Case("chat: lone surrogate in content", 400, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', param="messages"),
    Case("completions: lone surrogate", 400, b'{"prompt": "a\\ud800", "max_tokens": 2}', path="/v1/completions", param="prompt"),
    Case("tokenize: lone surrogate", 400, b'{"prompt": "a\\ud800"}', path="/tokenize", param="prompt"),
]  # fmt: skip


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request(server, case: Case):
    headers = dict(case.headers)
    if case.auth is not None:
        headers["Authorization"] = f"Bearer {case.auth}"
    content = (
        case.body if isinstance(case.body, bytes) else None if case.body is None else json.dumps(case.body)
    )
    headers.setdefault("Content-Type", "application/json")
    r = httpx.request(case.method, server.url + case.path, content=content, headers=headers, timeout=30)
    assert r.status_code == case.status, f"{case.name}: {r.status_code} {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == case.type, err
    if case.param is not ANY:
        assert err["param"] == case.param, err
    if case.code is not ANY:
        assert err["code"] == case.code, err
    assert "Traceback" not in err["message"]
    assert r.headers.get("x-request-id")


def test_server_is_healthy_and_kv_empty_after_the_table(server):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert wait_until(lambda: kv_empty(server.url), timeout=10)
    # and it still serves
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json=_chat(),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_sent_as_another_type_is_read_as_json(server, ctype):
    """`curl -d` without -H says application/x-www-form-urlencoded: the body is still the
    request (it was a 400 "Input should be a valid dictionary", param null); bad JSON sent so
    is the usual invalid_json 400."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    headers = auth | ({"Content-Type": ctype} if ctype else {})
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=json.dumps(_chat()).encode(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    bad = httpx.post(url, content=b'{"messages": [', headers=headers, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json", bad.text


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length: the limit is enforced while the body streams in."""

    def body():
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 50_000 + 2):
            yield b"x" * 50_000
        yield b'"}]}'

    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
