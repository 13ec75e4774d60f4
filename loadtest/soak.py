"""Soak test for grace-serve: a mixed workload at saturation for a set time, then checks that
nothing failed unexpectedly, memory stayed flat and the server went back to idle.

    # start a demo server on a free 127.0.0.1 port, 30 minutes at 32 concurrent clients
    python loadtest/soak.py --duration 1800 --json soak.json
    # against a running server (127.0.0.1 only)
    python loadtest/soak.py --url http://127.0.0.1:8000 --duration 300

Workload (each client walks a shuffled cycle of request kinds from its own offset, so every
kind is sent early): chat and completions, streamed and not, images (small PNG data: URLs, a
few repeated to hit the prefix and encoder caches, others new), n > 1 (and several prompts),
logprobs, seeded sampling (the same seed and prompt must give the same text every time),
aborts (a stream closed after a few chunks, a request cancelled after a random delay), and bad
requests that must be refused with a 4xx OpenAI error body (bad JSON, unknown model, prompts
over the context, bad images, oversized fields, a body over the size limit). `--hostile` adds
numbers beyond every sane bound (top_k >= 2^63 ...), on by default (`--no-hostile` leaves them out).

Every response is classified: `ok` (an expected success in the OpenAI shape), `refused` (the
expected 4xx with an OpenAI error body {"error": {"message", "type", "param", "code"}}, or a
503 `queue_full`), `aborted` (the client went away on purpose) or `unexpected` (a 5xx, a
connection error or timeout, a stream without `data: [DONE]` or with an error event, a 200 not
in the OpenAI shape, an error body not in the OpenAI shape, a wrong status, a seeded request
whose text changed).

Meanwhile the RSS of the API process and of its engine child is sampled every
`--rss-interval` s. Growth is judged per process on the samples taken under load, split into
five equal time slices: mean of the last fifth minus mean of the second fifth (the first fifth
is warm-up: allocator pools and caches filling) must not exceed `--max-rss-growth-mb`.

At the end the soak waits (at most `--idle-timeout` s) for the gauges
grace_serve_kv_cache_usage_perc, grace_serve_num_requests_running,
grace_serve_num_requests_waiting and grace_serve_api_requests_queued to read 0.

It prints a table (counts by kind and class, latency percentiles, RSS start/peak/end, growth
and slope per process, final gauges), writes a JSON report with `--json`, and exits 1 on any
unexpected failure, a gauge not back to 0, RSS growth beyond the threshold, /health not 200 at
the end, a server-side 5xx, or a request kind never exercised.

Every loop is bounded in count and time; only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GAUGES = (
    "grace_serve_kv_cache_usage_perc",
    "grace_serve_num_requests_running",
    "grace_serve_num_requests_waiting",
    "grace_serve_api_requests_queued",
)
OK, REFUSED, ABORTED, UNEXPECTED = "ok", "refused", "aborted", "unexpected"
CLASSES = (OK, REFUSED, ABORTED, UNEXPECTED)
OWN_SERVER_MAX_REQUEST_BYTES = 1 << 20  # the server the soak starts: a cheap 413
MAX_SSE_LINES = 20_000  # a stream longer than this is broken (bounded read)
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain paged attention in two sentences.",
    "List three uses of a vision-language model.",
    "What is the capital of France?",
    "Give me a short recipe with eggs and rice.",
]
SEEDED_PROMPTS = ["Tell me a story about a lighthouse.", "Name a color and a fruit."]
SEEDS = [7, 1234, 2**31 + 5]

# kind -> weight in the cycle; "expect" of each is set where its Spec is built
KINDS: dict[str, int] = {
    "chat": 3,
    "chat_stream": 3,
    "completion": 2,
    "completion_stream": 2,
    "image_cached": 2,
    "image_cached_stream": 1,
    "image_new_stream": 1,
    "chat_n": 1,
    "completion_multi_stream": 1,
    "chat_logprobs_stream": 1,
    "completion_logprobs": 1,
    "seeded": 2,
    "abort_stream": 1,
    "abort_request": 1,
    "bad_json": 1,
    "unknown_model": 1,
    "too_long_prompt": 1,
    "bad_image": 1,
    "oversized_field": 1,
    "oversized_body": 1,  # only when the server's --max-request-bytes is known
}
HOSTILE_KINDS = {"hostile_numbers": 2}


# -- request specs --------------------------------------------------------------------------


@dataclass
class Spec:
    kind: str
    path: str
    body: Any  # dict -> JSON; bytes -> sent as is
    stream: bool = False
    expect: str = OK  # OK, REFUSED, or "any" (hostile: a refusal or a success)
    status: int | None = None  # the refusal's status, when one is expected
    choices: int = 1  # choices an answer must have
    top_logprobs: int | None = None  # logprobs asked for: every choice must carry them
    abort: str | None = None  # "stream": close after a few chunks; "request": cancel after abort_after s
    abort_after: float = 0.0
    seed_key: tuple | None = None  # seeded: same key, same text
    content_type: str = "application/json"


@dataclass
class Verdict:
    cls: str
    reason: str = ""
    texts: list[str] = field(default_factory=list)


@dataclass
class Result:
    kind: str
    cls: str
    status: int | None
    latency: float
    ttft: float | None = None
    reason: str = ""


def png_data_url(width: int, height: int, seed: int) -> str:
    """A small deterministic PNG (noise over a tint) as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[: height // 2] //= 2
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_msgs(url: str, text: str) -> list[dict[str, Any]]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


class Workload:
    """Builds the Spec of each request kind; varies the details with a counter per kind."""

    def __init__(
        self, model: str, max_model_len: int, max_tokens: int, max_request_bytes: int | None, seed: int
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        self.max_request_bytes = max_request_bytes
        self.rng = random.Random(seed)
        self.turns: Counter[str] = Counter()
        self.cached_images = [
            png_data_url(w, h, seed=i) for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)])
        ]
        self.new_images = 0
        png = base64.b64decode(self.cached_images[0].split(",", 1)[1])
        self.bad_images = [
            "data:image/png;base64,@@@not-base64!!",
            "data:image/png;base64," + base64.b64encode(b"hello, I am text, not pixels" * 4).decode(),
            "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode(),
            "data:text/plain;base64," + base64.b64encode(b"hi").decode(),
        ]

    def kinds(self, hostile: bool) -> dict[str, int]:
        kinds = dict(KINDS)
        if self.max_request_bytes is None or self.max_request_bytes > 8 << 20:
            kinds.pop("oversized_body")  # unknown limit, or too big to send again and again
        if hostile:
            kinds.update(HOSTILE_KINDS)
        return kinds

    def prompt(self) -> str:
        # a random tag keeps most prompts distinct: the prefix cache does not serve everything
        return f"[{self.rng.randrange(10**6)}] {self.rng.choice(PROMPTS)}"

    def chat_body(self, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model, "messages": [{"role": "user", "content": self.prompt()}]}
        body.update({"max_tokens": self.max_tokens, "temperature": 0.7, **fields})
        return body

    def completion_body(self, **fields: Any) -> dict[str, Any]:
        body = {
            "model": self.model,
            "prompt": self.prompt(),
            "max_tokens": self.max_tokens,
            "temperature": 0.7,
        }
        return {**body, **fields}

    def make(self, kind: str) -> Spec:
        turn = self.turns[kind]
        self.turns[kind] += 1
        return BUILDERS[kind](self, turn)


def _stream_fields() -> dict[str, Any]:
    return {"stream": True, "stream_options": {"include_usage": True}}


def _spec_chat(w: Workload, turn: int) -> Spec:
    return Spec("chat", CHAT, w.chat_body())


def _spec_chat_stream(w: Workload, turn: int) -> Spec:
    return Spec("chat_stream", CHAT, w.chat_body(**_stream_fields()), stream=True)


def _spec_completion(w: Workload, turn: int) -> Spec:
    return Spec("completion", COMPLETIONS, w.completion_body())


def _spec_completion_stream(w: Workload, turn: int) -> Spec:
    return Spec("completion_stream", COMPLETIONS, w.completion_body(**_stream_fields()), stream=True)


def _spec_image_cached(w: Workload, turn: int, stream: bool = False) -> Spec:
    url = w.cached_images[turn % len(w.cached_images)]
    body = w.chat_body(
        messages=_image_msgs(url, "Describe this image."), **(_stream_fields() if stream else {})
    )
    return Spec("image_cached_stream" if stream else "image_cached", CHAT, body, stream=stream)


def _spec_image_cached_stream(w: Workload, turn: int) -> Spec:
    return _spec_image_cached(w, turn, stream=True)


def _spec_image_new_stream(w: Workload, turn: int) -> Spec:
    w.new_images += 1
    url = png_data_url(48, 48, seed=1000 + w.new_images)
    body = w.chat_body(messages=_image_msgs(url, "What colors do you see?"), **_stream_fields())
    return Spec("image_new_stream", CHAT, body, stream=True)


def _spec_chat_n(w: Workload, turn: int) -> Spec:
    return Spec("chat_n", CHAT, w.chat_body(n=3), choices=3)


def _spec_completion_multi_stream(w: Workload, turn: int) -> Spec:
    body = w.completion_body(prompt=[w.prompt(), w.prompt()], n=2, **_stream_fields())
    return Spec("completion_multi_stream", COMPLETIONS, body, stream=True, choices=4)


def _spec_chat_logprobs_stream(w: Workload, turn: int) -> Spec:
    body = w.chat_body(logprobs=True, top_logprobs=3, **_stream_fields())
    return Spec("chat_logprobs_stream", CHAT, body, stream=True, top_logprobs=3)


def _spec_completion_logprobs(w: Workload, turn: int) -> Spec:
    return Spec("completion_logprobs", COMPLETIONS, w.completion_body(logprobs=2), top_logprobs=2)


def _spec_seeded(w: Workload, turn: int) -> Spec:
    key = (turn // 2) % (len(SEEDED_PROMPTS) * len(SEEDS))  # each key twice in a row: early comparisons
    p, s = key % len(SEEDED_PROMPTS), key // len(SEEDED_PROMPTS)
    body = {
        "model": w.model,
        "messages": [{"role": "user", "content": SEEDED_PROMPTS[p]}],
        "max_tokens": min(w.max_tokens, 12),
        "temperature": 1.0,
        "seed": SEEDS[s],
    }
    return Spec("seeded", CHAT, body, seed_key=(p, s))


def _spec_abort_stream(w: Workload, turn: int) -> Spec:
    body = w.chat_body(max_tokens=256, ignore_eos=True, **_stream_fields())
    return Spec("abort_stream", CHAT, body, stream=True, abort="stream")


def _spec_abort_request(w: Workload, turn: int) -> Spec:
    body = (
        w.completion_body(max_tokens=256, ignore_eos=True)
        if turn % 2
        else w.chat_body(max_tokens=256, ignore_eos=True)
    )
    path = COMPLETIONS if turn % 2 else CHAT
    return Spec("abort_request", path, body, abort="request", abort_after=w.rng.uniform(0.05, 0.6))


# refusals
def _spec_bad_json(w: Workload, turn: int) -> Spec:
    bodies = [b'{"messages": [', b"[1, 2]", b'{"model": "x", "messages": "hi"', b"\xff\xfe not utf-8"]
    kind = turn % 6
    if kind < len(bodies):
        return Spec("bad_json", CHAT if kind % 2 else COMPLETIONS, bodies[kind], expect=REFUSED, status=400)
    if kind == 4:
        return Spec("bad_json", CHAT, w.chat_body(temperature="hot"), expect=REFUSED, status=400)
    return Spec("bad_json", CHAT, {"model": w.model}, expect=REFUSED, status=400)  # messages missing


def _spec_unknown_model(w: Workload, turn: int) -> Spec:
    if turn % 2:
        return Spec(
            "unknown_model", COMPLETIONS, w.completion_body(model="gpt-17"), expect=REFUSED, status=404
        )
    return Spec("unknown_model", CHAT, w.chat_body(model="no-such-model"), expect=REFUSED, status=404)


def _spec_too_long_prompt(w: Workload, turn: int) -> Spec:
    n = w.max_model_len
    if turn % 3 == 0:  # token ids: exact length, no tokenizing
        body = w.completion_body(prompt=[100] * (n + 8))
        return Spec("too_long_prompt", COMPLETIONS, body, expect=REFUSED, status=400)
    if turn % 3 == 1:  # prompt + max_tokens over the context
        return Spec("too_long_prompt", CHAT, w.chat_body(max_tokens=n), expect=REFUSED, status=400)
    body = w.chat_body(messages=[{"role": "user", "content": "lorem ipsum " * (2 * n)}])
    return Spec("too_long_prompt", CHAT, body, expect=REFUSED, status=400)


def _spec_bad_image(w: Workload, turn: int) -> Spec:
    url = w.bad_images[turn % len(w.bad_images)]
    return Spec(
        "bad_image", CHAT, w.chat_body(messages=_image_msgs(url, "What is this?")), expect=REFUSED, status=400
    )


def _spec_oversized_field(w: Workload, turn: int) -> Spec:
    fields = [
        {"stop": [f"s{i}" for i in range(17)]},
        {"stop": ["x" * 513]},
        {"n": 100},
        {"logprobs": True, "top_logprobs": 50},
        {"messages": [{"role": "user", "content": "hi"}] * 1025},
    ]
    return Spec(
        "oversized_field", CHAT, w.chat_body(**fields[turn % len(fields)]), expect=REFUSED, status=400
    )


def _spec_oversized_body(w: Workload, turn: int) -> Spec:
    assert w.max_request_bytes is not None
    text = b"x" * (w.max_request_bytes + 1)
    body = (
        b'{"model": "' + w.model.encode() + b'", "messages": [{"role": "user", "content": "' + text + b'"}]}'
    )
    return Spec("oversized_body", CHAT, body, expect=REFUSED, status=413)


def _spec_hostile_numbers(w: Workload, turn: int) -> Spec:
    big = 2**63
    variants = [
        (CHAT, {"top_k": big}),
        (COMPLETIONS, {"top_k": big}),
        (CHAT, {"top_k": 2**70}),
        (CHAT, {"seed": 2**64}),
        (COMPLETIONS, {"stop_token_ids": [big]}),
        (CHAT, {"max_tokens": big}),
        (CHAT, {"min_tokens": big, "max_tokens": 4}),
        (CHAT, {"n": big}),
        (COMPLETIONS, {"logprobs": big}),
        (CHAT, {"logit_bias": {str(big): 100}}),
        (CHAT, {"temperature": 1e308, "top_p": 1e-308}),
        (COMPLETIONS, {"prompt": [big, 1, 2]}),
    ]
    path, extra = variants[turn % len(variants)]
    body = (
        w.chat_body(max_tokens=2, temperature=0.9)
        if path == CHAT
        else w.completion_body(max_tokens=2, temperature=0.9)
    )
    return Spec("hostile_numbers", path, {**body, **extra}, expect="any")


BUILDERS = {name: globals()["_spec_" + name] for name in [*KINDS, *HOSTILE_KINDS]}


# -- the classifier (pure: tests feed it fake responses) -------------------------------------


def error_body_problem(body: bytes) -> str | None:
    """None when `body` is an OpenAI error body {"error": {"message", "type", "param", "code"}}."""
    try:
        data = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:120]!r}"
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {body[:120]!r}"
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    if missing:
        return f"error object without {missing}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return "error message/type not non-empty strings"
    if not (err["param"] is None or isinstance(err["param"], str)):
        return "error param neither a string nor null"
    if not (err["code"] is None or isinstance(err["code"], (str, int))):
        return "error code neither a string, an int nor null"
    return None


def _error_code(body: bytes) -> Any:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _usage_problem(usage: Any, choices: int) -> str | None:
    if not isinstance(usage, dict):
        return "no usage"
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if not all(isinstance(x, int) for x in (p, c, t)):
        return f"usage counts not integers: {usage}"
    if p < 1 or c < choices or t != p + c:
        return f"usage inconsistent for {choices} choice(s): {usage}"
    return None


def _logprobs_problem(lp: Any, chat: bool, top: int) -> str | None:
    if not isinstance(lp, dict):
        return "no logprobs"
    if chat:
        content = lp.get("content")
        if not isinstance(content, list) or not content:
            return "logprobs.content empty"
        for e in content:
            if not isinstance(e.get("token"), str) or not isinstance(e.get("logprob"), (int, float)):
                return f"bad logprobs entry {str(e)[:80]}"
            if len(e.get("top_logprobs") or []) != top:
                return f"top_logprobs has {len(e.get('top_logprobs') or [])} entries, asked {top}"
        return None
    tokens, values = lp.get("tokens"), lp.get("token_logprobs")
    if (
        not isinstance(tokens, list)
        or not tokens
        or not isinstance(values, list)
        or len(values) != len(tokens)
    ):
        return "logprobs.tokens / token_logprobs missing or of different lengths"
    return None


def unary_problem(spec: Spec, body: bytes) -> tuple[str | None, list[str]]:
    """(problem or None, texts of the choices) of a non-streamed 200."""
    chat = spec.path == CHAT
    try:
        data = json.loads(body)
        if data.get("object") != ("chat.completion" if chat else "text_completion"):
            return f"object is {data.get('object')!r}", []
        if not isinstance(data.get("id"), str) or not isinstance(data.get("created"), int):
            return "no id or created", []
        choices = data["choices"]
        if sorted(c["index"] for c in choices) != list(range(spec.choices)):
            return f"choice indices {[c['index'] for c in choices]}, expected {spec.choices}", []
        texts = []
        for c in sorted(choices, key=lambda c: c["index"]):
            text = c["message"]["content"] if chat else c["text"]
            if chat and c["message"].get("role") != "assistant":
                return "message role is not assistant", []
            if not isinstance(text, str):
                return "choice text is not a string", []
            if c.get("finish_reason") not in ("stop", "length"):
                return f"finish_reason {c.get('finish_reason')!r}", []
            if spec.top_logprobs is not None:
                problem = _logprobs_problem(c.get("logprobs"), chat, spec.top_logprobs)
                if problem:
                    return problem, []
            texts.append(text)
        return _usage_problem(data.get("usage"), spec.choices), texts
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"not the OpenAI shape: {e!r}: {body[:160]!r}", []


def stream_problem(spec: Spec, body: bytes) -> tuple[str | None, list[str]]:
    """(problem or None, texts) of a streamed 200: SSE `data:` lines of chunks, then [DONE]."""
    chat = spec.path == CHAT
    obj = "chat.completion.chunk" if chat else "text_completion"
    texts: dict[int, str] = {}
    finished: set[int] = set()
    usage = None
    done = False
    lines = body.split(b"\n")
    if len(lines) > MAX_SSE_LINES:
        return f"stream of {len(lines)} lines", []
    try:
        for raw in lines:
            raw = raw.rstrip(b"\r")
            if not raw or raw.startswith(b":"):
                continue
            if done:
                return "data after [DONE]", []
            if not raw.startswith(b"data: "):
                return f"not an SSE data line: {raw[:80]!r}", []
            payload = raw[6:]
            if payload == b"[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                return f"error event: {json.dumps(chunk['error'])[:200]}", []
            if chunk.get("object") != obj:
                return f"chunk object {chunk.get('object')!r}", []
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                i = c["index"]
                piece = (c["delta"].get("content") if chat else c.get("text")) or ""
                if not isinstance(piece, str):
                    return "chunk text is not a string", []
                texts[i] = texts.get(i, "") + piece
                if spec.top_logprobs is not None and piece:
                    problem = _logprobs_problem(c.get("logprobs"), chat, spec.top_logprobs)
                    if problem:
                        return problem, []
                if c.get("finish_reason") is not None:
                    if c["finish_reason"] not in ("stop", "length"):
                        return f"finish_reason {c['finish_reason']!r}", []
                    finished.add(i)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"malformed SSE chunk: {e!r}", []
    if not done:
        return "stream ended without data: [DONE]", []
    if finished != set(range(spec.choices)):
        return f"choices {sorted(finished)} finished, expected {spec.choices}", []
    if spec.body.get("stream_options", {}).get("include_usage"):
        problem = _usage_problem(usage, spec.choices)
        if problem:
            return problem, []
    return None, [texts.get(i, "") for i in range(spec.choices)]


def classify(spec: Spec, status: int, body: bytes) -> Verdict:
    """The class of one complete response to `spec`."""
    if status >= 500:
        if status == 503 and _error_code(body) == "queue_full" and error_body_problem(body) is None:
            return Verdict(REFUSED, "queue_full")  # backpressure, as documented
        return Verdict(UNEXPECTED, f"HTTP {status}: {body[:200]!r}")
    if 400 <= status < 500:
        problem = error_body_problem(body)
        if problem:
            return Verdict(UNEXPECTED, f"HTTP {status} with a non-OpenAI error body: {problem}")
        if spec.expect == OK:
            return Verdict(UNEXPECTED, f"HTTP {status} for a valid request: {body[:200]!r}")
        if spec.status is not None and status != spec.status:
            return Verdict(UNEXPECTED, f"expected HTTP {spec.status}, got {status}: {body[:200]!r}")
        return Verdict(REFUSED)
    if status != 200:
        return Verdict(UNEXPECTED, f"HTTP {status}")
    if spec.expect == REFUSED:
        return Verdict(UNEXPECTED, f"expected HTTP {spec.status}, got 200")
    problem, texts = stream_problem(spec, body) if spec.stream else unary_problem(spec, body)
    return Verdict(UNEXPECTED, problem) if problem else Verdict(OK, texts=texts)


def _carries_text(payload: str) -> bool:
    """Whether an SSE chunk carries generated text (what time to first token waits for)."""
    try:
        choices = json.loads(payload).get("choices") or []
        return any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)
    except (ValueError, AttributeError):
        return False


# -- sending ------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, spec: Spec, timeout: float) -> tuple[Result, Verdict]:
    """Send one request; every wait is bounded by `timeout` (total)."""
    start = time.perf_counter()
    ttft: float | None = None

    def result(v: Verdict, status: int | None) -> tuple[Result, Verdict]:
        return Result(spec.kind, v.cls, status, time.perf_counter() - start, ttft, v.reason), v

    content = spec.body if isinstance(spec.body, bytes) else json.dumps(spec.body).encode()
    headers = {"Content-Type": spec.content_type}

    async def unary() -> tuple[int, bytes]:
        resp = await client.post(spec.path, content=content, headers=headers)
        return resp.status_code, resp.content

    async def streamed() -> tuple[int, bytes, bool]:
        nonlocal ttft
        async with client.stream("POST", spec.path, content=content, headers=headers) as resp:
            if resp.status_code != 200:
                return resp.status_code, await resp.aread(), False
            lines: list[str] = []
            data_lines = 0
            async for line in resp.aiter_lines():
                lines.append(line)
                if ttft is None and line.startswith("data: {") and _carries_text(line[6:]):
                    ttft = time.perf_counter() - start
                data_lines += line.startswith("data: ")
                if spec.abort == "stream" and data_lines >= 3:
                    return 200, b"", True  # leaving the block closes the connection mid-stream
                if len(lines) > MAX_SSE_LINES:
                    break
            return 200, "\n".join(lines).encode(), False

    try:
        if spec.abort == "request":
            try:
                status, body = await asyncio.wait_for(unary(), spec.abort_after)
            except asyncio.TimeoutError:
                return result(Verdict(ABORTED), None)
            return result(classify(spec, status, body), status)
        if spec.stream:
            status, body, aborted = await asyncio.wait_for(streamed(), timeout)
            return result(Verdict(ABORTED) if aborted else classify(spec, status, body), status)
        status, body = await asyncio.wait_for(unary(), timeout)
        return result(classify(spec, status, body), status)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return result(Verdict(UNEXPECTED, f"no complete answer within {timeout:g} s"), None)
    except (httpx.HTTPError, OSError) as e:
        return result(Verdict(UNEXPECTED, f"connection error: {e!r}"[:300]), None)


class SeedBook:
    """Seeded requests: the same (prompt, seed) must give the same text, whatever else runs."""

    def __init__(self) -> None:
        self.texts: dict[tuple, list[str]] = {}
        self.checked = 0

    def check(self, key: tuple, texts: list[str]) -> str | None:
        first = self.texts.setdefault(key, texts)
        if first is texts:
            return None
        self.checked += 1
        return None if first == texts else f"seeded text changed: {first!r} then {texts!r}"[:300]


@dataclass
class Shared:
    """What the clients share: the cycle's counter, the results, the seed book, and a stop
    when the server is gone (many connection errors in a row)."""

    cycle: list[str]
    deadline: float
    turns: Iterator[int] = field(default_factory=itertools.count)
    results: list[Result] = field(default_factory=list)
    seeds: SeedBook = field(default_factory=SeedBook)
    errors_in_a_row: int = 0
    gone: bool = False


GONE_AFTER = 50  # connection errors in a row: the server is down, stop sending


async def client_loop(shared: Shared, work: Workload, client: httpx.AsyncClient, timeout: float) -> None:
    for _ in range(1_000_000):  # bounded; the deadline ends it long before
        if time.monotonic() >= shared.deadline or shared.gone:
            return
        spec = work.make(shared.cycle[next(shared.turns) % len(shared.cycle)])
        res, verdict = await send(client, spec, timeout)
        if res.cls == OK and spec.seed_key is not None:
            problem = shared.seeds.check(spec.seed_key, verdict.texts)
            if problem:
                res.cls, res.reason = UNEXPECTED, problem
        shared.results.append(res)
        if res.status is None and res.reason.startswith("connection error"):
            shared.errors_in_a_row += 1
            shared.gone = shared.gone or shared.errors_in_a_row >= GONE_AFTER
            await asyncio.sleep(0.1)
        elif res.status is not None:
            shared.errors_in_a_row = 0


def make_cycle(kinds: dict[str, int], seed: int) -> list[str]:
    """Every kind once (shuffled), then the extra weight (shuffled). The clients take the
    entries in turn from one shared counter, so the first len(kinds) requests cover every kind."""
    rng = random.Random(seed)
    first = list(kinds)
    rest = [k for k, weight in kinds.items() for _ in range(weight - 1)]
    rng.shuffle(first)
    rng.shuffle(rest)
    return first + rest


# -- server processes and memory -------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def engine_pid(api_pid: int) -> int | None:
    """The engine: the API process's child started by multiprocessing's spawn."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{api_pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
    for child in children:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    return None


def listening_pid(port: int) -> int | None:
    """The process holding the listening socket on 127.0.0.1/0.0.0.0:`port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
    return min(pids) if pids else None  # the parent (API process) is the oldest


class OwnServer:
    """`python -m server --model demo` on a free 127.0.0.1 port, logging to a file."""

    def __init__(self, log_path: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "server", "--model", "demo", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-request-bytes", str(OWN_SERVER_MAX_REQUEST_BYTES), *extra]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout} s; log: {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._log.close()
                return None  # did not stop on SIGTERM
        self._log.close()
        return self.proc.returncode


async def sample_rss(
    pids: dict[str, int], interval: float, stop: asyncio.Event, out: dict[str, list]
) -> None:
    t0 = time.monotonic()
    for _ in range(10_000_000):  # bounded; `stop` ends it
        now = time.monotonic() - t0
        for name, pid in pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                out.setdefault(name, []).append((round(now, 2), round(mb, 1)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return


def rss_summary(samples: list[tuple[float, float]], load: tuple[float, float], max_growth_mb: float) -> dict:
    """Start/peak/end, growth (mean of the last fifth of the load minus the second fifth) and
    slope (least squares after the first fifth, MB/min) of one process's RSS samples."""
    out: dict[str, Any] = {"samples": len(samples)}
    if not samples:
        return {**out, "ok": True, "note": "no samples"}
    out.update(start_mb=samples[0][1], peak_mb=max(m for _, m in samples), end_mb=samples[-1][1])
    t0, t1 = load
    fifth = (t1 - t0) / 5
    second = [m for t, m in samples if t0 + fifth <= t < t0 + 2 * fifth]
    last = [m for t, m in samples if t1 - fifth <= t <= t1]
    after = [(t, m) for t, m in samples if t0 + fifth <= t <= t1]
    if not second or not last or len(after) < 3:
        return {**out, "ok": True, "note": "too few samples under load to judge growth"}
    growth = sum(last) / len(last) - sum(second) / len(second)
    mt = sum(t for t, _ in after) / len(after)
    mm = sum(m for _, m in after) / len(after)
    var = sum((t - mt) ** 2 for t, _ in after)
    slope = sum((t - mt) * (m - mm) for t, m in after) / var * 60 if var else 0.0
    return {
        **out,
        "growth_mb": round(growth, 1),
        "slope_mb_per_min": round(slope, 2),
        "ok": growth <= max_growth_mb,
    }


# -- metrics --------------------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics as {'name{label="v",...}': value}, model labels dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics", timeout=10)).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine")}
            out[
                s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
            ] = s.value
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix)
            and v - before.get(k, 0)}  # fmt: skip


def status_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """HTTP responses the server sent during the soak, by status."""
    out: Counter[str] = Counter()
    for key, d in counter_deltas(before, after, "grace_serve_http_requests_total{").items():
        status = key.split('status="', 1)[1].split('"', 1)[0]
        out[status] += int(d)
    return dict(sorted(out.items()))


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[dict[str, float | None], float, bool]:
    """Poll the gauges until all read 0, at most `timeout` s: (last values, seconds waited, idle)."""
    start = time.monotonic()
    values: dict[str, float | None] = dict.fromkeys(GAUGES)
    for _ in range(100_000):
        with contextlib.suppress(httpx.HTTPError, ValueError):
            m = await scrape(client)
            values = {g: m.get(g) for g in GAUGES}
            if all(v == 0 for v in values.values()):
                return values, time.monotonic() - start, True
        if time.monotonic() - start > timeout:
            break
        await asyncio.sleep(0.5)
    return values, time.monotonic() - start, False


# -- report ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(results: list[Result], kinds: dict[str, int]) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in kinds:
        rs = [r for r in results if r.kind == kind]
        lat = [r.latency * 1000 for r in rs if r.cls in (OK, REFUSED)]
        ttft = [r.ttft * 1000 for r in rs if r.cls == OK and r.ttft is not None]
        by_kind[kind] = {
            "sent": len(rs),
            **{c: sum(r.cls == c for r in rs) for c in CLASSES},
            **{f"p{q}_ms": _round(percentile(lat, q)) for q in (50, 90, 99)},
            "ttft_p50_ms": _round(percentile(ttft, 50)),
        }
    lat = [r.latency * 1000 for r in results if r.cls in (OK, REFUSED)]
    total = {
        "sent": len(results),
        **{c: sum(r.cls == c for r in results) for c in CLASSES},
        **{f"p{q}_ms": _round(percentile(lat, q)) for q in (50, 90, 99)},
    }
    reasons = Counter(f"{r.kind}: {r.reason}" for r in results if r.cls == UNEXPECTED)
    return {"by_kind": by_kind, "total": total, "unexpected_reasons": dict(reasons.most_common(50))}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def coverage_problems(by_kind: dict[str, Any]) -> list[str]:
    """Every kind must have been answered as intended at least once (no vacuous pass)."""
    out = []
    for kind, row in by_kind.items():
        if kind in SUCCESS_KINDS:
            got = row[OK]
        elif kind in REFUSAL_KINDS:
            got = row[REFUSED]
        elif kind.startswith("abort"):
            got = row[ABORTED]
        else:  # hostile: refused or served, as long as the server stays up
            got = row[OK] + row[REFUSED]
        if got == 0:
            out.append(f"kind {kind} never answered as intended ({row['sent']} sent)")
    return out


SUCCESS_KINDS = {"chat", "chat_stream", "completion", "completion_stream", "image_cached", "image_cached_stream",
                 "image_new_stream", "chat_n", "completion_multi_stream", "chat_logprobs_stream",
                 "completion_logprobs", "seeded"}  # fmt: skip
REFUSAL_KINDS = {
    "bad_json",
    "unknown_model",
    "too_long_prompt",
    "bad_image",
    "oversized_field",
    "oversized_body",
}


def print_report(r: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"\ngrace-serve soak: {r['url']}  {r['load_s']:.0f} s of load at concurrency {r['concurrency']}\n\n")
    cols = ["sent", *CLASSES, "p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms"]
    w(f"{'kind':<24}" + "".join(f"{c:>12}" for c in cols) + "\n")
    rows = [*r["by_kind"].items(), ("total", r["total"])]
    for kind, row in rows:
        cells = ["-" if row.get(c) is None else f"{row[c]:g}" for c in cols]
        w(f"{kind:<24}" + "".join(f"{c:>12}" for c in cells) + "\n")
    w(f"\nthroughput: {r['total']['sent'] / max(r['load_s'], 1e-9):.1f} requests/s; "
      f"seeded texts compared: {r['seeded_checks']}\n")  # fmt: skip
    w("\nRSS (MB)     pid    samples    start     peak      end   growth  MB/min  judged\n")
    for name, s in r["rss"].items():
        vals = [s.get(k) for k in ("start_mb", "peak_mb", "end_mb", "growth_mb", "slope_mb_per_min")]
        cells = "".join(f"{'-' if v is None else f'{v:g}':>9}" for v in vals)
        verdict = "ok" if s["ok"] else f"GROWTH > {r['max_rss_growth_mb']:g} MB"
        w(f"{name:<10}{s.get('pid', '-'):>7}{s['samples']:>10}{cells}  {verdict} {s.get('note', '')}\n")
    w(
        f"(growth: mean of the last fifth of the load minus the second fifth; limit {r['max_rss_growth_mb']:g} MB)\n"
    )
    w(f"\ngauges after {r['idle_wait_s']:.1f} s{' (NOT idle)' if not r['idle'] else ''}:\n")
    for g, v in r["gauges"].items():
        w(f"  {g:<40} {v}\n")
    w(f"\nserver HTTP statuses: {r['server_statuses']}\nserver finished reasons: {r['finished_reasons']}\n")
    w(f"prefix-cache hit tokens: {r['prefix_cache_hit_tokens']}\n")
    if r["unexpected_reasons"]:
        w("\nunexpected failures:\n")
        for reason, n in list(r["unexpected_reasons"].items())[:20]:
            w(f"  {n:>5} x {reason}\n")
    w("\n" + ("PASS" if r["passed"] else "FAIL:\n  " + "\n  ".join(r["failures"])) + "\n")


# -- main -----------------------------------------------------------------------------------


async def run_soak(
    args: argparse.Namespace, url: str, api_pid: int | None, max_request_bytes: int | None
) -> dict:
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.request_timeout, headers=headers,
                                 trust_env=False) as client:  # fmt: skip
        version = (await client.get("/version")).json()
        models = (await client.get("/v1/models")).json()
        model = args.model or models["data"][0]["id"]
        work = Workload(model, int(version["max_model_len"]), args.max_tokens, max_request_bytes, args.seed)
        kinds = work.kinds(args.hostile)
        cycle = make_cycle(kinds, args.seed)
        pids = {}
        if api_pid:
            pids["api"] = api_pid
            eng = engine_pid(api_pid)
            if eng:
                pids["engine"] = eng
        before = await scrape(client)

        rss: dict[str, list] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pids, args.rss_interval, stop, rss))
        t_start = time.monotonic()
        shared = Shared(cycle, t_start + args.duration)
        results, seeds = shared.results, shared.seeds
        workers = [client_loop(shared, work, client, args.request_timeout) for _ in range(args.concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), args.duration + 2 * args.request_timeout + 30)
        except asyncio.TimeoutError:
            results.append(Result("soak", UNEXPECTED, None, 0.0, reason="clients did not finish in time"))
        load_s = time.monotonic() - t_start
        if shared.gone:
            results.append(
                Result("soak", UNEXPECTED, None, 0.0, reason="server unreachable: the soak stopped")
            )
        gauges, idle_wait, idle = await wait_idle(client, 3.0 if shared.gone else args.idle_timeout)
        stop.set()
        await sampler
        after: dict[str, float] = {}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            after = await scrape(client)
        health = None
        with contextlib.suppress(httpx.HTTPError):
            health = (await client.get("/health", timeout=10)).status_code

    # RSS samples are relative to the sampler's start, which is the load's start (+ a few ms)
    rss_report = {}
    for name, pid in pids.items():
        rss_report[name] = {"pid": pid, **rss_summary(rss.get(name, []), (0.0, load_s), args.max_rss_growth_mb),
                            "series": rss.get(name, [])}  # fmt: skip
    summary = summarize(results, kinds)
    statuses = status_deltas(before, after)
    server_5xx = sum(n for s, n in statuses.items() if s.startswith("5"))
    client_5xx = sum(1 for r in results if r.status is not None and r.status >= 500)
    finished = {
        k.split('"')[1]: int(v)
        for k, v in counter_deltas(before, after, "grace_serve_request_success_total{").items()
    }
    failures = [] if after else ["/metrics unreadable after the soak"]
    if summary["total"][UNEXPECTED]:
        failures.append(f"{summary['total'][UNEXPECTED]} unexpected failure(s)")
    if server_5xx > client_5xx:
        failures.append(f"the server sent {server_5xx} 5xx response(s), the clients saw {client_5xx}")
    if not idle:
        failures.append(f"gauges not back to 0 after {idle_wait:.0f} s: {gauges}")
    failures += [f"{n} RSS grew {s['growth_mb']} MB" for n, s in rss_report.items() if not s["ok"]]
    if health != 200:
        failures.append(f"/health answered {health} after the soak")
    if not pids:
        failures.append("no server process found to sample RSS from (pass --server-pid)")
    failures += coverage_problems(summary["by_kind"])
    return {
        "url": url,
        "duration_s": args.duration,
        "load_s": round(load_s, 1),
        "concurrency": args.concurrency,
        "hostile": args.hostile,
        "model": model,
        "max_model_len": work.max_model_len,
        **summary,
        "seeded_checks": seeds.checked,
        "rss": rss_report,
        "max_rss_growth_mb": args.max_rss_growth_mb,
        "gauges": gauges,
        "idle": idle,
        "idle_wait_s": round(idle_wait, 1),
        "health_after": health,
        "server_statuses": statuses,
        "finished_reasons": finished,
        "prefix_cache_hit_tokens": int(
            counter_deltas(before, after, "grace_serve_prefix_cache_hits_total").get("", 0)
        ),
        "failures": failures,
        "passed": not failures,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="a running server, http://127.0.0.1:PORT (default: start a demo server)")
    ap.add_argument("--server-pid", type=int, help="the API process of --url (default: found from its port)")
    ap.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for the server the soak starts"
    )
    ap.add_argument(
        "--server-log", type=Path, help="log file of the server the soak starts (default: a temp file)"
    )
    ap.add_argument("--max-request-bytes", type=int,
                    help="the --url server's --max-request-bytes, to send bodies just over it (413); "
                         f"the server the soak starts uses {OWN_SERVER_MAX_REQUEST_BYTES}")  # fmt: skip
    ap.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load (default 60; 1800 for the full soak)"
    )
    ap.add_argument(
        "--concurrency", type=int, default=32, help="concurrent clients (default 32: saturates the demo)"
    )
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of ordinary requests (default 16)")
    ap.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds one request may take (default 120)"
    )
    ap.add_argument(
        "--idle-timeout", type=float, default=30.0, help="seconds to wait for the gauges to read 0"
    )
    ap.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples (default 2)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                    help="per process: mean RSS of the last fifth of the load minus the second fifth (default 64)")  # fmt: skip
    ap.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                    help="also send numbers beyond every bound (top_k >= 2^63, huge seeds, token ids, max_tokens, n); "
                         "each must be refused or served while the server stays up (default: on; top_k = 2^63 once "
                         "ended the engine)")  # fmt: skip
    ap.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    ap.add_argument(
        "--api-key",
        default=os.environ.get("GRACE_SERVE_API_KEY"),
        help="bearer token (env GRACE_SERVE_API_KEY)",
    )
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    if args.url:
        host = urlparse(args.url).hostname
        if host != "127.0.0.1":
            ap.error(f"--url must be on 127.0.0.1, got {host!r}")
    if args.duration <= 0 or args.concurrency < 1 or args.rss_interval <= 0:
        ap.error("--duration, --concurrency and --rss-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    if args.url:
        url = args.url.rstrip("/")
        api_pid = args.server_pid or listening_pid(urlparse(url).port or 80)
        max_request_bytes = args.max_request_bytes
    else:
        log = args.server_log or Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        server = OwnServer(log, args.server_arg)
        print(f"starting a demo server on {server.url} (log: {log})", flush=True)
        try:
            server.wait_ready(180)
        except RuntimeError:
            server.stop()
            raise
        url, api_pid, max_request_bytes = server.url, server.proc.pid, OWN_SERVER_MAX_REQUEST_BYTES
    try:
        report = asyncio.run(run_soak(args, url, api_pid, max_request_bytes))
    finally:
        rc = server.stop() if server else None
    if server:
        report["server_log"] = str(server.log_path)
        report["server_exit"] = rc
        if rc != 0:
            report["failures"].append(f"the server exited with {rc} after SIGTERM (expected 0)")
            report["passed"] = False
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
