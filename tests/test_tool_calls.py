"""Tool calls: the demo chat template renders them like Qwen3-VL's own, and the model's
<tool_call> blocks parse into OpenAI tool_calls the same whether whole or streamed."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from server.api.tool_calls import ToolCall, ToolCallStream, new_call_id, parse_tool_calls
from server.model.demo import CHAT_TEMPLATE
from server.model.model_config import ModelConfig
from server.model.processor import Processor

REAL_TEMPLATE_FILE = Path(__file__).parent / "data" / "qwen3_vl_2b_instruct_chat_template.jinja"
_SOURCE_COMMENT = re.compile(r"\A\{#-.*?-#\}\n")  # the vendored file's first line: where it came from

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


# -- the chat template -----------------------------------------------------------------------


def test_demo_template_is_the_real_one_verbatim():
    real = REAL_TEMPLATE_FILE.read_text()
    assert _SOURCE_COMMENT.match(real)
    assert _SOURCE_COMMENT.sub("", real) == CHAT_TEMPLATE


@pytest.fixture(scope="module")
def processors(demo_dir, tmp_path_factory) -> tuple[Processor, Processor]:
    """(demo checkpoint, the same checkpoint with the vendored real template file)."""
    demo = demo_dir("w8")
    real = tmp_path_factory.mktemp("real-template") / "ckpt"
    shutil.copytree(demo, real)
    shutil.copy(REAL_TEMPLATE_FILE, real / "chat_template.jinja")
    cfg = ModelConfig.from_file(demo / "config.json")
    return Processor(demo, cfg), Processor(real, cfg)


CONVERSATIONS = {
    "tools_with_system": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}],
        [WEATHER, TIME],
    ),
    "tools_without_system": ([{"role": "user", "content": "What time is it?"}], [TIME]),
    "system_as_parts": (
        [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            },
            {"role": "user", "content": "hi"},
        ],
        None,
    ),
    "calls_and_results": (
        [
            {"role": "user", "content": "Weather in Paris and Lyon, and the time?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 19}'},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {}}}],
            },
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "21 °C, 19 °C, noon."},
            {"role": "user", "content": "thanks"},
        ],
        [WEATHER, TIME],
    ),
    "text_and_image": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image"},
                    {"type": "text", "text": "!"},
                ],
            }
        ],
        None,
    ),
    "image_in_tool_result": (
        [
            {"role": "user", "content": "Take a photo."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "photo", "arguments": {}}}],
            },
            {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "a photo"}]},
        ],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_demo_template_renders_like_the_real_one(processors, name, add_generation_prompt):
    demo, real = processors
    messages, tools = CONVERSATIONS[name]
    kwargs = {"tools": tools} if tools else {}
    ours = demo.render_chat(messages, add_generation_prompt, **kwargs)
    assert ours == real.render_chat(messages, add_generation_prompt, **kwargs)


def test_what_the_template_renders(processors):
    demo, _ = processors
    messages = CONVERSATIONS["calls_and_results"][0]
    text = demo.render_chat(messages[:5], tools=[TIME])
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TIME, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments"
        " within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Lyon, and the time?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 19}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    image = demo.render_chat(CONVERSATIONS["text_and_image"][0])
    assert (
        image
        == "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|>!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_tags_are_added_tokens_kept_by_decode(processors):
    demo, _ = processors
    tok = demo.tokenizer
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"):
        ids = demo.encode(f"a{tag}b")
        assert tok.token_to_id(tag) in ids, tag
        assert demo.decode(ids, skip_special_tokens=True) == f"a{tag}b"  # not special: kept
    assert demo.decode(demo.encode("x<|im_end|>"), skip_special_tokens=True) == "x"


def test_transformers_renders_tools_the_same(processors, demo_dir):
    from transformers import AutoTokenizer

    demo, _ = processors
    hf = AutoTokenizer.from_pretrained(str(demo_dir("w8")))
    for name in ("tools_with_system", "calls_and_results"):
        messages, tools = CONVERSATIONS[name]
        ref = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert demo.render_chat(messages, tools=tools) == ref
        assert demo.encode(ref) == hf.encode(ref, add_special_tokens=False)


# -- parsing ---------------------------------------------------------------------------------


def _call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_ids():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_plain_text_is_content():
    assert parse_tool_calls("  Hello there.\n") == ("Hello there.", [])
    assert parse_tool_calls(" \n ") == (None, [])
    assert parse_tool_calls("") == (None, [])


def test_calls_and_content():
    text = "Let me check.\n" + _call("get_weather", '{"city": "Paris"}') + "\n" + _call("get_time", "{}")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),
    ]
    assert all(isinstance(c, ToolCall) and c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ('{"name": "f", "arguments": {"a": 1}}', '{"a": 1}'),
        (
            '{"name":"f","arguments":{"a":[1,2],"b":{"c":null}}}',
            '{"a": [1, 2], "b": {"c": null}}',
        ),  # respaced
        ('{"name": "f"}', "{}"),
        ('{"name": "f", "arguments": null}', "{}"),
        ('{"name": "f", "arguments": "{\\"a\\": \\"é\\"}"}', '{"a": "é"}'),  # double-encoded
        ('{"name": "f", "arguments": {"s": "\\u00e9 中文 🙂"}}', '{"s": "é 中文 🙂"}'),  # no \u escapes
        (
            '{"name": "f", "arguments": {"s": "</tool_call> }{ \\" <tool_call>"}}',
            '{"s": "</tool_call> }{ \\" <tool_call>"}',
        ),
        ('{"name": "f", "arguments": {"s": "<\\/tool_call>"}}', '{"s": "</tool_call>"}'),
        ('{"arguments": {}, "name": "f", "id": 3}', "{}"),  # key order and extra keys do not matter
    ],
)
def test_arguments_are_the_parsed_object_reserialized(body, arguments):
    content, calls = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("f", arguments)]
    assert json.loads(calls[0].arguments) == json.loads(arguments)


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # a brace short
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',
        '<tool_call>\n["f", {}]\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}} trailing\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}}{"name": "g"}\n</tool_call>',
        "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",  # json recursion: refused, not raised
        '<tool_call> she said "hi </tool_call>',  # a quote outside braces cannot hide the close tag
        "<tool_call></tool_call>",
    ],
)
def test_malformed_blocks_stay_in_the_content(block):
    text = "before " + block + " after " + _call("g", "{}")
    content, calls = parse_tool_calls(text)
    assert content == "before " + block + " after"
    assert [c.name for c in calls] == ["g"]


def test_unterminated_block():
    # the JSON is complete: a call (the model stopped before the close tag)
    content, calls = parse_tool_calls('Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert content == "Hi" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    # cut off inside the JSON: content, verbatim
    text = 'Hi <tool_call>\n{"name": "f", "arguments": {"a": "</tool_call>'
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("Hi <tool_") == ("Hi <tool_", [])


def test_close_tag_inside_a_string_does_not_end_the_block():
    text = _call("f", '{"html": "<b>x</b></tool_call>", "n": {"m": "}"}}') + " done"
    content, calls = parse_tool_calls(text)
    assert content == "done"
    assert json.loads(calls[0].arguments) == {"html": "<b>x</b></tool_call>", "n": {"m": "}"}}


# -- streaming -------------------------------------------------------------------------------


def _stream(pieces: list[str]) -> tuple[str, list[dict], list[str], ToolCallStream]:
    """Run a stream; (content, per-call {id, name, arguments} from the deltas, ids seen, stream)."""
    stream = ToolCallStream()
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
    content, calls, ids = "", [], []
    for d in deltas:
        assert len(d) == 1 and set(d) <= {"content", "tool_calls"}, d
        if "content" in d:
            assert d["content"], "no empty content deltas"
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if "id" in tc:  # the header: once per call, in index order
            assert tc["index"] == len(calls) and tc["type"] == "function"
            assert tc["function"]["arguments"] == ""
            ids.append(tc["id"])
            calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, calls, ids, stream


def _random_split(text: str, rng: random.Random) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text) // 2))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _assert_stream_matches(text: str, pieces: list[str]) -> None:
    content, calls = parse_tool_calls(text)
    s_content, s_calls, ids, stream = _stream(pieces)
    assert s_content == (content or ""), pieces  # exactly the stripped content
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments) for c in calls], pieces
    assert len(set(ids)) == len(ids) == len(calls)
    assert [(c.id, c.name, c.arguments) for c in stream.calls] == [
        (c["id"], c["name"], c["arguments"]) for c in s_calls
    ]
    for c in s_calls:
        assert isinstance(json.loads(c["arguments"]), dict)


OUTPUTS = [
    "",
    "   ",
    "Just text, no tools. 中文 🙂\n",
    "  lead and trail  \n\n",
    _call("get_weather", '{"city": "Paris"}'),
    "Sure, checking.\n" + _call("get_weather", '{"city": "Zürich"}') + "\n" + _call("get_time", "{}") + "\n",
    "A "
    + _call("f", '{"a": {"b": {"c": [1, {"d": "}}}"}]}}}')
    + " B\n\n C "
    + _call("g", '{"q": "\\"</tool_call>\\""}'),
    _call("f", '{"s": "<tool_call> inside a string"}') + "<tool_ca" + "ll> not a call",
    "x <tool_call>\nnot json\n</tool_call> y " + _call("h", '{"emoji": "🙂🙂", "cjk": "日本語"}') + " z",
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> then ' + _call("g", "{}"),
    "text <tool_call>\n" + '{"name": "f", "arguments": {"a": "unterminated',
    'text <tool_call>\n{"name": "f", "arguments": {"done": true}}\n',
    "<<tool_call>" + _call("f", "{}") + "<</tool_call>>",
    "a < b <tool < c <tool_call" + " " + "<\n" + _call("f", '{"lt": "<", "gt": ">"}') + " </tool_call> stray",
    _call("f", '"{\\"a\\": 1}"') + _call("g", "null"),
    "\n\n" + _call("f", "{}") + "\n\n",
]


@pytest.mark.parametrize("i", range(len(OUTPUTS)))
def test_stream_matches_parse_for_any_split(i):
    text = OUTPUTS[i]
    _assert_stream_matches(text, [text])
    _assert_stream_matches(text, list(text))  # one character at a time
    rng = random.Random(i)
    for _ in range(200):
        _assert_stream_matches(text, _random_split(text, rng))


def test_stream_matches_parse_on_random_outputs():
    """Random mixtures of text, calls and broken blocks, randomly split."""
    rng = random.Random(1234)
    atoms = [
        "hello ",
        " ",
        "\n",
        "é中🙂",
        "<",
        "<tool",
        "</tool_call>",
        "{",
        "}",
        '"',
        "\\",
        "<tool_call>",
        "<tool_call>\n",
        _call("f", '{"k": "v"}'),
        _call("g", '{"n": [1, {"m": "}{"}], "s": "a\\"b</tool_call>"}'),
        '<tool_call>{"name": "bad"',
        "<tool_call>junk</tool_call>",
    ]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        _assert_stream_matches(text, _random_split(text, rng))
        _assert_stream_matches(text, list(text))


def test_stream_sends_content_early_and_holds_only_a_possible_tag():
    s = ToolCallStream()
    assert s.feed("Hello") == [{"content": "Hello"}]
    assert s.feed(" wor") == [{"content": " wor"}]
    assert s.feed("ld <tool_") == [{"content": "ld"}]  # " <tool_" held: the space may be trailing
    assert s.feed("callx") == [{"content": " <tool_callx"}]
    assert s.feed('\n<tool_call>{"name": "f", ') == []
    assert s.feed('"arguments": {"a": 1}}</tool_call>') == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": s.calls[0].id,
                    "type": "function",
                    "function": {"name": "f", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
    ]
    assert s.feed("\n") == []
    assert s.finish() == []  # trailing whitespace: stripped
    assert [c.name for c in s.calls] == ["f"]
