"""Locust load test for grace-serve's /v1/chat/completions.

    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

Each user mixes text-only and image chats (generated JPEG images of several sizes), streamed
and not, in a fixed 3:3:2:2 cycle. A request fails on any non-200 status, a malformed JSON body, or a malformed SSE
stream (a line that is not `data: ...`, a chunk that is not JSON, an error event, no
finish_reason, no final `data: [DONE]`). Streamed requests report their full duration (not
the time to the response headers), and their time to first token as a separate entry of
request type "TTFT" (the first chunk that carries text, as in the server's TTFT histogram).

Environment (all optional):
    GRACE_LOCUST_MODEL        model name to send (default: the first of GET /v1/models)
    GRACE_LOCUST_MAX_TOKENS   max_tokens per request (default 24)
    GRACE_LOCUST_IMAGE_SIZES  image sizes, WxH comma-separated (default 64x64,256x256,640x480)
    GRACE_SERVE_API_KEY / OPENAI_API_KEY   sent as a bearer token when set
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task
from PIL import Image

CHAT = "/v1/chat/completions"
MAX_TOKENS = int(os.environ.get("GRACE_LOCUST_MAX_TOKENS", "24"))
API_KEY = os.environ.get("GRACE_SERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
IMAGE_VARIANTS = 4  # distinct images per size: some encoder-cache reuse, not all hits

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain paged attention in two sentences.",
    "List three uses of a vision-language model.",
    "What is the capital of France? Answer briefly.",
    "Summarize the plot of a heist movie you invent.",
    "Give me a short recipe with eggs and rice.",
]
IMAGE_QUESTIONS = ["Describe this image.", "What colors do you see?", "Is there any text in this picture?"]


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, _, h = item.strip().lower().partition("x")
        out.append((int(w), int(h)))
    return out


def _jpeg_data_url(width: int, height: int, seed: int) -> str:
    """Random colored noise with a gradient: deterministic per seed, not trivially compressible."""
    rng = random.Random(seed)
    img = Image.effect_noise((width, height), 64).convert("RGB")
    tint = Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    img = Image.blend(img, tint, 0.5)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_SIZES = _sizes(os.environ.get("GRACE_LOCUST_IMAGE_SIZES", "64x64,256x256,640x480"))
# Made once at import (every user shares them): encoding images is not what we measure.
IMAGES = {size: [_jpeg_data_url(*size, seed=i) for i in range(IMAGE_VARIANTS)] for size in IMAGE_SIZES}

_model: str | None = os.environ.get("GRACE_LOCUST_MODEL") or None
# Request kinds, text : text streamed : image : image streamed = 3 : 3 : 2 : 2. Each user walks
# this cycle from its own offset (not a random pick), so even a short run with few users sends
# every kind.
KINDS = ["text", "image", "text_stream", "image_stream", "text", "text_stream",
         "image", "text", "image_stream", "text_stream"]  # fmt: skip
_user_numbers = itertools.count()


class ChatUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.turn = next(_user_numbers)  # each user starts the cycle at its own place
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        global _model
        if _model is None:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                try:
                    _model = resp.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError):
                    resp.failure(f"cannot read the model from /v1/models: HTTP {resp.status_code}")

    # -- the task: one request of the next kind in this user's cycle ------------------------

    @task
    def next_request(self) -> None:
        kind = KINDS[self.turn % len(KINDS)]
        self.turn += 1
        stream = kind.endswith("_stream")
        if kind.startswith("text"):
            self.chat(self.text_messages(), stream, "chat text" + (" stream" if stream else ""))
        else:
            w, h = random.choice(IMAGE_SIZES)
            self.chat(
                self.image_messages((w, h)), stream, f"chat image {w}x{h}" + (" stream" if stream else "")
            )

    # -- request bodies ----------------------------------------------------------------------

    @staticmethod
    def text_messages() -> list[dict[str, Any]]:
        # a random tag keeps prompts distinct, so the prefix cache does not serve everything
        prompt = f"[{random.randrange(10**6)}] {random.choice(PROMPTS)}"
        return [{"role": "user", "content": prompt}]

    @staticmethod
    def image_messages(size: tuple[int, int]) -> list[dict[str, Any]]:
        url = random.choice(IMAGES[size])
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": random.choice(IMAGE_QUESTIONS)},
        ]
        return [{"role": "user", "content": content}]

    def chat(self, messages: list[dict[str, Any]], stream: bool, name: str) -> None:
        body: dict[str, Any] = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.7}
        if _model:
            body["model"] = _model
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            self._streamed(body, name)
        else:
            self._unary(body, name)

    def _unary(self, body: dict[str, Any], name: str) -> None:
        with self.client.post(CHAT, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                data = resp.json()
                choice = data["choices"][0]
                ok = isinstance(choice["message"]["content"], str) and choice["finish_reason"] is not None
                ok = ok and data["usage"]["completion_tokens"] >= 1
            except (ValueError, KeyError, IndexError, TypeError) as e:
                resp.failure(f"malformed response: {e!r}")
                return
            if not ok:
                resp.failure("response without content, finish_reason or completion tokens")
            else:
                resp.success()

    def _streamed(self, body: dict[str, Any], name: str) -> None:
        start = time.perf_counter()
        with self.client.post(CHAT, json=body, name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            ttft, nbytes, error = _read_sse(resp, start)
            # locust timed this request up to its headers; report the whole stream instead
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = nbytes
            if error:
                resp.failure(error)
            else:
                resp.success()
        if ttft is not None and not error:
            events.request.fire(
                request_type="TTFT",
                name=name,
                response_time=ttft * 1000,
                response_length=0,
                exception=None,
                context={},
            )


def _read_sse(resp: Any, start: float) -> tuple[float | None, int, str | None]:
    """Read a chat SSE stream to its end: (TTFT seconds or None, bytes read, error or None)."""
    ttft: float | None = None
    nbytes = 0
    done = finished = False
    try:
        for raw in resp.iter_lines():
            nbytes += len(raw) + 1
            if not raw or raw.startswith(b":"):  # event separator / SSE comment
                continue
            if done:
                return ttft, nbytes, "data after [DONE]"
            if not raw.startswith(b"data: "):
                return ttft, nbytes, f"not an SSE data line: {raw[:80]!r}"
            payload = raw[len(b"data: ") :]
            if payload == b"[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                return ttft, nbytes, f"error event: {json.dumps(chunk['error'])[:200]}"
            if chunk.get("object") != "chat.completion.chunk":
                return ttft, nbytes, f"unexpected object {chunk.get('object')!r}"
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                finished = finished or choice.get("finish_reason") is not None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return ttft, nbytes, f"malformed SSE chunk: {e!r}"
    except Exception as e:  # a broken connection mid-stream is a failed request, not a crash
        return ttft, nbytes, f"stream broken: {e!r}"
    if not done:
        return ttft, nbytes, "stream ended without data: [DONE]"
    if not finished:
        return ttft, nbytes, "no choice had a finish_reason"
    return ttft, nbytes, None
