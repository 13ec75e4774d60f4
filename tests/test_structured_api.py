"""Structured outputs and tool calls as OpenAI SDK users ask for them, end to end against the
demo server on 127.0.0.1. The demo model is random: only the grammar makes its output valid,
so every check here fails without it (schemas are bounded so that it can finish)."""

from __future__ import annotations

import concurrent.futures
import enum
import json

import httpx
import pytest
from api_server import ServerProcess, kv_empty, wait_until

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("structured"), "--max-model-len", "2048", "--max-num-seqs", "16"
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    color: Color


class Owner(pydantic.BaseModel):
    nickname: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    pets: list[Pet] = pydantic.Field(max_length=2)
    favourite: Color | None


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "mood": {"enum": ["happy", "sad", "meh"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["city", "mood", "tags", "score"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            # closed: with extra properties allowed the random model invents keys up to max_tokens
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_parse_with_a_pydantic_model(client):
    done = client.chat.completions.parse(
        model="demo", messages=ASK, response_format=Owner, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Owner)
    assert choice.message.refusal is None


def test_strict_json_schema_in_20_seeded_runs_and_streamed(client):
    def run(seed: int) -> None:
        r = client.chat.completions.create(
            model="demo", messages=ASK, response_format=_response_format(SCHEMA), max_tokens=MAX_TOKENS,
            temperature=1.0, seed=seed,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", (seed, r.choices[0])
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:  # batched in the engine, as real traffic is
        list(pool.map(run, range(20)))
    pieces = []
    for chunk in client.chat.completions.create(model="demo", messages=ASK, response_format=_response_format(SCHEMA),
                                                max_tokens=MAX_TOKENS, temperature=1.0, seed=3, stream=True):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)


def test_json_object(client):
    r = client.chat.completions.create(model="demo", messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # an object the random model never closes ends at length
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_vllm_guided_choice_and_regex(http):
    for body, check in (
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, lambda t: len(t) == 6 and t[3] == "-"),
    ):
        r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 20, **body})
        assert r.status_code == 200, r.text
        assert check(r.json()["choices"][0]["message"]["content"]), r.json()


def _call_args(call) -> dict:
    args = json.loads(call.function.arguments)
    tool = next(t for t in (WEATHER, TIME) if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def _streamed(client, **kw) -> tuple[str, list[tuple[str, dict]], str | None]:
    """A stream reassembled: (content, [(name, arguments)], finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert slot["id"] is None, "a call's id is sent once"
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                slot["arguments"] += (tc.function and tc.function.arguments) or ""
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_required_and_named_streamed_equal(client, choice):
    # one call: with parallel calls allowed the random model may chain calls up to max_tokens
    kw = dict(model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=MAX_TOKENS,
              parallel_tool_calls=False,
              temperature=0)  # fmt: skip
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.tool_calls, c.message
    for call in c.message.tool_calls:
        _call_args(call)
        assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert [t.function.name for t in c.message.tool_calls] == ["get_time"]
    content, streamed, finish = _streamed(client, **kw)
    assert finish == "tool_calls"
    assert streamed == [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    assert content == (c.message.content or "")


def test_a_tool_call_cut_by_max_tokens_ends_at_length(client):
    """max_tokens cuts a required call: just before its EOS and close tag (the JSON is complete:
    still a call), and inside its JSON (no call: the text stays content); finish_reason is
    `length` either way, and the stream reassembles to the same."""
    kw = dict(model="demo", messages=ASK, tools=[TIME], tool_choice="required", parallel_tool_calls=False,
              temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kw, max_tokens=MAX_TOKENS)
    assert whole.choices[0].finish_reason == "tool_calls"
    n = whole.usage.completion_tokens  # the call's tokens, </tool_call> and the EOS included
    call = whole.choices[0].message.tool_calls[0]
    for cut, is_call in ((2, True), (8, False)):
        r = client.chat.completions.create(**kw, max_tokens=n - cut)
        c = r.choices[0]
        assert c.finish_reason == "length", (cut, c)
        got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
        if is_call:
            assert (
                got == [(call.function.name, json.loads(call.function.arguments))] and not c.message.content
            )
        else:
            assert got == [] and c.message.content.startswith("<tool_call>"), c.message
        assert _streamed(client, **kw, max_tokens=n - cut) == (c.message.content or "", got, "length")


def test_agent_loop_tool_result_then_answer(client):
    first = client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False,
                                           max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "clear"})},
    ]
    final = client.chat.completions.create(model="demo", messages=history, tools=[WEATHER], max_tokens=24,
                                           temperature=0)  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.choices[0].message.role == "assistant"


def test_an_unbounded_schema_ends_at_length(client):
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    r = client.chat.completions.create(model="demo", messages=ASK, response_format=_response_format(schema),
                                       max_tokens=8, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_logit_bias_forces_and_forbids(http):
    base = {"messages": ASK, "max_tokens": 6, "temperature": 0}
    r = http.post("/v1/chat/completions", json={**base, "logit_bias": {"300": 100}})
    assert r.status_code == 200, r.text
    assert (
        r.json()["choices"][0]["message"]["content"]
        == http.post("/detokenize", json={"tokens": [300] * 6}).json()["prompt"]
    )
    plain = http.post("/v1/chat/completions", json={**base, "logprobs": True}).json()
    first = plain["choices"][0]["logprobs"]["content"][0]
    ids = http.post("/tokenize", json={"prompt": first["token"]}).json()["tokens"]
    banned = http.post(
        "/v1/chat/completions", json={**base, "logprobs": True, "logit_bias": {str(ids[0]): -100}}
    )
    assert banned.json()["choices"][0]["logprobs"]["content"][0]["token"] != first["token"]


def test_logprob_bytes_join_back_to_the_text_and_refusal_is_null(http):
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "日本語 🙂 é"}],
            "max_tokens": 24,
            "temperature": 1.0,
            "seed": 1,
            "logprobs": True,
        },
    )
    choice = r.json()["choices"][0]
    assert choice["message"]["refusal"] is None and choice["logprobs"]["refusal"] is None
    # special tokens the text leaves out (the stop token among them) have bytes null
    joined = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"] if e["bytes"] is not None)
    # (a character the output leaves unfinished is U+FFFD in the text, its raw bytes here)
    assert joined.decode("utf-8", errors="replace") == choice["message"]["content"]


BAD = [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                },
            }
        },
        "response_format",
    ),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    # no text satisfies these: they compile, and erred only at the first mask (an empty 200)
    ({"response_format": _response_format({"$ref": "#"})}, "response_format"),
    ({"structured_outputs": {"grammar": "start: x\nx: x"}}, "structured_outputs"),
    ({"guided_regex": "[^\\x00-\\x{10FFFF}]"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages[1].tool_call_id"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": _response_format(SCHEMA), "guided_regex": "a+"}, "guided_regex"),
    # tool_choice wins over response_format, but not over a third constraint (it was dropped)
    (
        {
            "tools": [WEATHER],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
            "guided_regex": "abc",
        },
        "guided_regex",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_structured_requests_are_400_with_param(server, http, extra, param):
    """Each tried alone: an uncompilable schema or regex, a schema, grammar or regex no text
    satisfies, a nameless tool, tool_choice naming a
    missing function or required without tools, a tool message without tool_call_id,
    logit_bias out of the vocabulary or above 100, a deprecated field, two constraints, three."""
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err


RECURSIVE_TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    },
}
FAILS_WHILE_DECODING = [
    {"structured_outputs": {"regex": "a{1000000}"}},  # llguidance: too many expressions
    {"tools": [RECURSIVE_TOOL], "tool_choice": "required"},  # no text satisfies it: too many items
]


@pytest.mark.parametrize("extra", FAILS_WHILE_DECODING, ids=["huge repetition", "recursive required"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_that_fails_while_decoding_is_the_requests_400(server, http, extra, stream):
    """Found by fuzzing: these compile, then llguidance gives up a token or two in; they were
    500 engine_request_failed. Now 400 structured_output_failed (in a stream the error event,
    then [DONE]), the engine serves on and frees the request's KV blocks. The streamed run of
    each comes second: it once met the engine's cached grammar whose lexer the first run had
    exhausted, and came back an empty 200 "stop" (the engine now forgets such a grammar)."""
    body = {"messages": ASK, "max_tokens": 16, "stream": stream, **extra}
    r = http.post("/v1/chat/completions", json=body)
    if stream:
        assert r.status_code == 200, r.text
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
    else:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "structured_output_failed", err
    assert "grammar" in err["message"]
    assert http.get("/health").status_code == 200
    assert wait_until(lambda: kv_empty(server.url), 10)


def test_best_of_is_refused_unless_it_equals_n(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    assert (
        http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 1}).status_code == 200
    )


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprob_tokens_join_back_to_the_text(http, stream):
    """Single-token decodes show U+FFFD for a token holding part of a character and name the
    special tokens the text skips: the tokens did not join back to the text and text_offset
    drifted. Tried on random output seeded to run through multi-byte characters."""
    body = {"prompt": "日本語 🙂 é 中文", "max_tokens": 40, "temperature": 1.0, "seed": 5, "logprobs": 2}
    if not stream:
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
        tokens, offsets = lp["tokens"], lp["text_offset"]
    else:
        text, tokens, offsets = "", [], []
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    c = json.loads(line[6:])["choices"][0]
                    text += c["text"]
                    if c["logprobs"]:
                        tokens += c["logprobs"]["tokens"]
                        offsets += c["logprobs"]["text_offset"]
    assert "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_responses_and_chunks_validate_against_the_sdk_types(http):
    """Every shape these features produce, validated (not merely constructed, as the SDK does)
    against the official openai package's response types: chat with logprobs, tool calls and
    a schema, completions with logprobs, and the stream chunks of each."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chats = [
        {"messages": ASK, "max_tokens": 8, "logprobs": True, "top_logprobs": 2},
        {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
         "max_tokens": MAX_TOKENS, "temperature": 0},
        {"messages": ASK, "response_format": _response_format(SCHEMA), "max_tokens": MAX_TOKENS, "seed": 2},
    ]  # fmt: skip
    for body in chats:
        full = http.post("/v1/chat/completions", json=body).json()
        ChatCompletion.model_validate(full, strict=False)
        assert set(full["choices"][0]["message"]) >= {"role", "content", "refusal"}
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}) as r:  # fmt: skip
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
    body = {"prompt": "hello", "max_tokens": 8, "logprobs": 2}
    Completion.model_validate(http.post("/v1/completions", json=body).json())
