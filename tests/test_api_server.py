"""The HTTP server end to end: `python -m server --model demo` in a subprocess on 127.0.0.1,
driven by the official OpenAI SDK, httpx and curl."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from api_server import REPO, ServerProcess, data_url, image_bytes, kv_empty, scrape, wait_until

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MODEL = "demo"  # the default served name: the --model value
MAX_MODEL_LEN = 4096  # long enough that a disconnect always lands mid-generation
SERVER_ARGS = (
    "--api-key", API_KEY,
    "--max-model-len", str(MAX_MODEL_LEN),
    "--max-num-seqs", "8",
    "--max-request-bytes", "2000000",
    "--max-image-bytes", "500000",
    "--max-images-per-request", "4",
    "--max-image-pixels", "4000000",
    "--allowed-media-domains", "localhost", "10.0.0.1",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("api"), *SERVER_ARGS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"server exited with {code}:\n{srv.log_text()[-3000:]}"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


PNG = data_url(image_bytes("PNG", (64, 48), seed=1))
JPEG = data_url(image_bytes("JPEG", (80, 64), seed=2), "image/jpeg")


def _image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _greedy(client, messages, max_tokens: int = 12, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


# -- the OpenAI SDK -----------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "grace-serve"


def test_chat_png_non_streaming(client, http):
    messages = _image_message("What is in this image?", PNG)
    r = _greedy(client, messages)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    # the prompt is what /tokenize says (image tokens included), more than the text alone
    tok = http.post("/tokenize", json={"messages": messages}).json()
    assert r.usage.prompt_tokens == tok["count"]
    text_only = http.post(
        "/tokenize", json={"messages": [{"role": "user", "content": "What is in this image?"}]}
    )
    assert tok["count"] > text_only.json()["count"]


def test_chat_jpeg_streaming_matches_non_streaming(client):
    messages = _image_message("Describe it.", JPEG)
    full = _greedy(client, messages, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None
    assert text == full.choices[0].message.content


def test_two_images_in_one_message(client, http):
    messages = _image_message("Compare the two images.", PNG, JPEG)
    r = _greedy(client, messages, max_tokens=8)
    one = _greedy(client, _image_message("Compare the two images.", PNG), max_tokens=8)
    assert r.usage.prompt_tokens > one.usage.prompt_tokens
    assert r.usage.prompt_tokens == http.post("/tokenize", json={"messages": messages}).json()["count"]


def test_n_two_choices(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, n=2, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens >= 2
    greedy = _greedy(client, [{"role": "user", "content": "Say something."}], max_tokens=8, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_stop_string_cuts_the_text(client):
    messages = [{"role": "user", "content": "Tell me a long story."}]
    base = (
        _greedy(client, messages, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    )
    assert len(base) >= 8, base
    stop = base[4:7]
    cut = _greedy(client, messages, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == base[: base.find(stop)]


def test_seed_reproducibility(client):
    messages = [{"role": "user", "content": "Pick random words."}]

    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_logprobs_and_top_logprobs(client):
    r = _greedy(client, [{"role": "user", "content": "Hi"}], max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top token


def test_stream_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert 1 <= last.usage.completion_tokens <= 8


def test_greedy_text_equals_offline_llm_chat(client):
    from server import LLM, SamplingParams

    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
        _image_message("What is in this image?", PNG),
    ]
    llm = LLM("demo", device="cpu", max_model_len=MAX_MODEL_LEN)
    for messages in conversations:
        offline = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
        served = _greedy(client, messages, max_tokens=16).choices[0]
        assert served.message.content == offline.text
        assert served.finish_reason == offline.finish_reason


def test_completions_endpoint(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_cached_tokens_count_only_what_an_earlier_request_computed(http):
    """Found by fuzzing: a prompt never seen before with n=2 reported 592 of its 600 tokens
    cached (the second sibling reuses the first's blocks). Now none; asked again, the prompt's
    full blocks are."""
    prompt = [7 + (i * 37) % 250 for i in range(600)]  # 600 ids no other test sends
    body = {"prompt": prompt, "max_tokens": 1, "n": 2, "temperature": 0.8}
    first = http.post("/v1/completions", json=body).json()["usage"]
    assert (first.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0, first
    again = http.post("/v1/completions", json=body).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= 512, again


def test_completions_with_a_list_of_prompts(client, http):
    """Several prompts (strings or token lists) in one request: choice i*n + j is prompt i's
    j-th choice, equal to asking for that prompt alone; usage sums them; streaming carries the
    same texts under the same indices; a bad prompt anywhere refuses the whole request."""
    prompts = ["Once upon a time", "The red cat", "Two birds"]
    kw = dict(model=MODEL, max_tokens=6, temperature=0.8, seed=3, n=2)
    r = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    assert [c.text for c in r.choices] == [c.text for a in alone for c in a.choices]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(6)] == [c.text for c in r.choices]
    ids = http.post("/tokenize", json={"prompt": "The red cat"}).json()["tokens"]
    mixed = client.completions.create(prompt=[ids, [5, 6, 7]], model=MODEL, max_tokens=4, temperature=0)
    assert (
        mixed.choices[0].text
        == client.completions.create(prompt="The red cat", model=MODEL, max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    for bad, why in ((["fine", ""], "must not be empty"), ([[5, 6], [10**9]], "out of range"), ([], "empty")):
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": bad, "max_tokens": 2})
        assert resp.status_code == 400 and why in resp.json()["error"]["message"], resp.text
        assert resp.json()["error"]["param"] == "prompt"
    too_many = http.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 65, "max_tokens": 1})
    assert too_many.status_code == 400 and "at most 64 prompts" in too_many.json()["error"]["message"]


# -- the README examples, run verbatim (only the base URL is swapped for the test server's) -------


def _readme_block(lang: str, must_contain: str) -> str:
    """The README's fenced `lang` code block that contains `must_contain` (read, not copied,
    so the documented example is the tested one)."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S):
        if must_contain in block:
            return block
    raise AssertionError(f"README.md has no {lang} block with {must_contain!r}")


README_CURL = _readme_block("bash", "/v1/chat/completions")
README_SDK = _readme_block("python", "from openai import OpenAI")
README_STRUCTURED = _readme_block("python", "chat.completions.parse(")


def _run_example(tmp_path, cmd: list[str]) -> str:
    (tmp_path / "cat.png").write_bytes(image_bytes("PNG", (64, 48), seed=3))
    env = {**os.environ, "GRACE_SERVE_API_KEY": API_KEY}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("base64") is None, reason="needs curl and base64"
)
def test_readme_curl_example(server, tmp_path):
    """curl, as a subprocess, with a base64 image."""
    script = README_CURL.replace("http://127.0.0.1:8000", server.url)
    r = json.loads(_run_example(tmp_path, ["bash", "-c", script]))
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["prompt_tokens"] > 20  # the image is in the prompt
    assert 1 <= r["usage"]["completion_tokens"] <= 32


def test_readme_openai_sdk_example(server, tmp_path):
    script = README_SDK.replace("http://127.0.0.1:8000", server.url)
    out = _run_example(tmp_path, [sys.executable, "-c", script])
    assert out.count("\n") >= 2  # the full reply, then the streamed one


def test_readme_structured_outputs_example(server, tmp_path):
    """parse() with a pydantic model and a required tool call, on the random demo model."""
    script = README_STRUCTURED.replace("http://127.0.0.1:8000", server.url)
    parsed, call = _run_example(tmp_path, [sys.executable, "-c", script]).splitlines()
    assert parsed.startswith("name=") and " country=" in parsed, parsed  # a City's repr
    assert call.startswith("get_weather {'city': ") and call.endswith(("'unit': 'c'}", "'unit': 'f'}")), call


# -- other endpoints --------------------------------------------------------------------------------


def test_public_endpoints_and_request_id(server, http):
    anon = httpx.Client(base_url=server.url, timeout=10)
    assert anon.get("/health").json() == {"status": "ok"}
    head = anon.head("/health")  # load balancers probe with HEAD (it was a 405)
    assert head.status_code == 200 and head.content == b""
    assert anon.get("/metrics").status_code == 200
    version = anon.get("/version").json()
    assert version["model"] == MODEL
    in_use = version["kernel_backend"]["in_use"]
    assert version["kernel_backend"]["requested"] == "auto" and in_use in ("triton", "reference")
    assert scrape(server.url)[f'grace_serve_kernel_backend_info{{backend="{in_use}"}}'] == 1
    assert anon.get("/openapi.json").json()["paths"]["/v1/chat/completions"]
    r = http.get("/v1/models", headers={"X-Request-Id": "trace-abc.1"})
    assert r.headers["x-request-id"] == "trace-abc.1"
    assert len(http.get("/v1/models").headers["x-request-id"]) == 32  # generated when absent
    tokens = http.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "hello world"


# -- metrics and disconnects --------------------------------------------------------------------------


def _chat_metric_key(status: int) -> str:
    return f'grace_serve_http_requests_total{{method="POST",path="/v1/chat/completions",status="{status}"}}'


def _successes(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("grace_serve_request_success_total{"))


def test_metrics_agree_with_what_was_sent(server, client):
    assert wait_until(lambda: kv_empty(server.url))
    before = scrape(server.url)
    usages = []
    for i in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5 + i
        )
        usages.append(r.usage)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_image_message("and this?", PNG),
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages.append(list(stream)[-1].usage)

    def delta(m: dict[str, float], key: str) -> float:
        return m.get(key, 0.0) - before.get(key, 0.0)

    key_200 = _chat_metric_key(200)
    assert wait_until(lambda: delta(scrape(server.url), key_200) == 3, timeout=5)
    after = scrape(server.url)
    assert delta(after, "grace_serve_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(after, "grace_serve_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert _successes(after) - _successes(before) == 3
    for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_prompt_tokens"):
        assert delta(after, f"grace_serve_{hist}_count") == 3, hist
    assert delta(after, "grace_serve_request_generation_tokens_sum") == sum(
        u.completion_tokens for u in usages
    )
    assert delta(after, "grace_serve_image_preprocess_seconds_count") == 1
    assert delta(after, "grace_serve_iteration_tokens_total_count") >= 3
    assert after["grace_serve_kv_cache_usage_perc"] == 0


def test_disconnect_mid_stream_aborts(server):
    aborted = 'grace_serve_request_success_total{finished_reason="abort"}'
    before = scrape(server.url).get(aborted, 0.0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write forever."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.url, timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk, blank, a few content chunks
        assert any('"content"' in line for line in got)
        running = scrape(server.url)
        assert running["grace_serve_kv_cache_usage_perc"] > 0
    # the client is gone: the request must be aborted in the engine and its KV freed
    assert wait_until(lambda: scrape(server.url).get(aborted, 0.0) == before + 1, timeout=10)
    assert wait_until(lambda: kv_empty(server.url), timeout=10)


def test_disconnect_aborts_every_prompt_of_a_list(server):
    """A client leaving a streamed 3-prompt completion aborts all three engine requests."""
    aborted = 'grace_serve_request_success_total{finished_reason="abort"}'
    before = scrape(server.url).get(aborted, 0.0)
    body = {"model": MODEL, "prompt": ["Write", "forever", "please"], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(12)]
        assert sum('"text"' in line for line in got) >= 3
    assert wait_until(lambda: scrape(server.url).get(aborted, 0.0) == before + 3, timeout=10)
    assert wait_until(lambda: kv_empty(server.url), timeout=10)


def test_disconnect_non_streaming_aborts(server):
    aborted = 'grace_serve_request_success_total{finished_reason="abort"}'
    before = scrape(server.url).get(aborted, 0.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write forever."}], "max_tokens": 4000,
            "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(60, read=1.0),
        )
    assert wait_until(lambda: scrape(server.url).get(aborted, 0.0) == before + 1, timeout=10)
    assert wait_until(lambda: kv_empty(server.url), timeout=10)
    assert time.monotonic() - t0 < 8  # aborted: 4000 tokens take far longer on CPU
