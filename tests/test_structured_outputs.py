"""Grammar-constrained decoding and logit_bias in the engine, on the random demo model: the
output of a constrained run always parses and validates, whatever the weights."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from server.engine import sampler
from server.engine.core import EngineRequest, RequestRejected
from server.engine.llm import LLM
from server.engine.messages import Fault, FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.structured import (
    PARALLEL_FILL_ROWS,
    GrammarCompiler,
    GrammarState,
    StructuredOutput,
    StructuredOutputError,
    _apply_on_device,
    _apply_on_host,
    apply_bitmask,
    fill_bitmask,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "name", "tags", "ok"],
    "additionalProperties": False,
}
SO = StructuredOutput("json_schema", json.dumps(SCHEMA))
TOOLS = {
    "tools": [
        {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo"]},
                    "days": {"type": "integer", "maximum": 9},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
        {
            "name": "stop",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    ],
    "parallel": True,
}
PROMPTS = ["Describe the sky", "A small tree"]


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM(str(demo_dir("w8")), device="cpu", max_model_len=512)


def _params(so: StructuredOutput = SO, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 80)
    return SamplingParams(structured=so, **kw)


def _valid(text: str, schema: dict = SCHEMA) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_json_schema_greedy_seeded_and_siblings_validate(llm):
    greedy = llm.generate(PROMPTS, _params(temperature=0))
    seeded = llm.generate(PROMPTS, _params(temperature=1.0, seed=7, n=2))
    again = llm.generate(PROMPTS, _params(temperature=1.0, seed=7, n=2))
    for out in greedy + seeded:
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            assert _valid(c.text), c.text
    assert [[c.text for c in o.outputs] for o in seeded] == [[c.text for c in o.outputs] for o in again]
    assert {c.text for o in seeded for c in o.outputs} != {c.text for o in greedy for c in o.outputs}


def test_logprobs_stay_raw_under_a_grammar(llm):
    """Logprobs come from the unconstrained distribution (as before), one per token."""
    out = llm.generate(PROMPTS[0], _params(temperature=0, logprobs=2))[0].outputs[0]
    assert _valid(out.text) and len(out.logprobs) == len(out.token_ids)
    assert all(lp.logprob <= 0.0 for lp in out.logprobs)


def test_json_object_regex_choice(llm):
    """json_object has no bound: the random model finishes some runs, and those parse."""
    outs = llm.generate(
        PROMPTS,
        [
            _params(StructuredOutput("json_object"), temperature=1.0, seed=2, n=4, max_tokens=40),
            _params(StructuredOutput("regex", r"[a-d]{2,5}-[0-9]{1,2}"), temperature=1.0, seed=1),
        ],
    )
    done = [c.text for c in outs[0].outputs if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(t), dict) for t in done)
    assert re.fullmatch(r"[a-d]{2,5}-[0-9]{1,2}", outs[1].outputs[0].text)
    choices = ["sunny", "rain", "no idea"]
    for seed in range(3):
        out = llm.generate(
            PROMPTS[0], _params(StructuredOutput("choice", json.dumps(choices)), temperature=1.0, seed=seed)
        )
        assert out[0].outputs[0].text in choices and out[0].outputs[0].finish_reason == "stop"


def test_tool_calls_are_valid_blocks(llm):
    so = StructuredOutput("tool_calls", json.dumps(TOOLS))
    outs = llm.generate(
        PROMPTS, _params(so, temperature=1.0, seed=3, n=2, max_tokens=120, skip_special_tokens=False)
    )
    schemas = {t["name"]: t["parameters"] for t in TOOLS["tools"]}
    block = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            calls = block.findall(c.text)
            assert calls and "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in calls) == c.text
            for body in calls:
                call = json.loads(body)
                assert list(call) == ["name", "arguments"]
                jsonschema.validate(call["arguments"], schemas[call["name"]])


# A tool's parameters as clients write them: a "$ref" into the schema itself, a `const` that
# holds a "$ref"-shaped value (data, not a reference), no "type" (OpenAI takes it for an
# object), an anyOf whose other branch is not an object.
ODD_PARAMETERS = [
    {
        "type": "object",
        "properties": {
            "n": {"enum": [3, 4]},
            "b": {"$ref": "#/properties/n"},
            "k": {"const": {"$ref": "#/properties/n"}},
        },
        "required": ["n", "b", "k"],
        "additionalProperties": False,
    },
    {"properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False},
    {
        "anyOf": [
            {
                "type": "object",
                "properties": {"y": {"enum": ["p", "q"]}},
                "required": ["y"],
                "additionalProperties": False,
            },
            {"type": "string"},
        ]
    },
]


@pytest.mark.parametrize("parameters", ODD_PARAMETERS)
def test_tool_call_arguments_follow_the_tools_own_schema(llm, parameters):
    """Its "#/..." pointers resolve inside the parameters (they used to point into the call
    block's wrapper: "#/properties/name" gave the tool's name), and the arguments are an object."""
    so = StructuredOutput("tool_calls", json.dumps({"tools": [{"name": "f", "parameters": parameters}]}))
    outs = llm.generate(PROMPTS, _params(so, temperature=1.0, seed=5, n=3, max_tokens=120))
    for c in (c for out in outs for c in out.outputs):
        assert c.finish_reason == "stop", c
        call = json.loads(re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", c.text, re.S)[1])
        assert call["name"] == "f" and isinstance(call["arguments"], dict), call
        jsonschema.validate(call["arguments"], parameters)


def test_a_tool_pointer_outside_its_parameters_is_refused(llm, demo_dir):
    compiler = GrammarCompiler(demo_dir("w8") / "tokenizer.json", llm.config.text.vocab_size, [0])
    params = {"type": "object", "properties": {"q": {"$ref": "#/properties/arguments"}}}
    so = StructuredOutput("tool_calls", json.dumps({"tools": [{"name": "f", "parameters": params}]}))
    with pytest.raises(StructuredOutputError, match="does not exist"):
        compiler.check(so)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_preemption_and_async_scheduling_keep_outputs_valid_and_equal(llm, demo_dir, async_scheduling):
    """A tiny KV pool forces preemption (recompute keeps the outputs, so the matchers
    stay valid), under async scheduling (step N collected before step N+1 is sampled)
    and sync: same outputs."""
    params = _params(temperature=1.0, seed=11, max_tokens=60)
    prompts = [p + f" {i}" * 20 for i in range(6) for p in PROMPTS[:1]]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params)]
    tight = LLM(
        str(demo_dir("w8")),
        device="cpu",
        max_model_len=192,
        num_kv_blocks=16,
        async_scheduling=async_scheduling,
    )
    got = [o.outputs[0].text for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == expected and all(_valid(t) for t in got)


def test_unbounded_grammar_ends_with_length(llm):
    so = StructuredOutput(
        "json_schema", json.dumps({"type": "object", "properties": {"s": {"type": "string"}}})
    )
    out = llm.generate(PROMPTS[0], _params(so, temperature=1.0, seed=0, max_tokens=6))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6


@pytest.mark.parametrize(
    ("so", "message"),
    [
        (
            StructuredOutput("json_schema", '{"type": "object", "propertyNamez": {}}'),
            "keyword 'propertyNamez'",
        ),
        (StructuredOutput("json_schema", '{"type": "strng"}'), "invalid JSON schema"),
        # draft 4's boolean bound was taken unchecked (found by fuzzing)
        (
            StructuredOutput("json_schema", '{"type": "number", "minimum": 5, "exclusiveMinimum": true}'),
            "exclusiveMinimum must be a number",
        ),
        (StructuredOutput("json_schema", "{nope"), "not valid JSON"),
        (StructuredOutput("regex", "a[b"), "invalid regex"),
        (StructuredOutput("choice", "[]"), "choice"),
        (StructuredOutput("grammar", "start: undefined_rule"), "invalid grammar"),
        (StructuredOutput("tool_calls", '{"tools": []}'), "tool_calls"),
    ],
)
def test_invalid_specs_raise_from_check(llm, demo_dir, so, message):
    compiler = GrammarCompiler(demo_dir("w8") / "tokenizer.json", llm.config.text.vocab_size, [0])
    with pytest.raises(StructuredOutputError, match=re.escape(message)):
        compiler.check(so)


def test_a_bad_grammar_in_the_engine_fails_only_its_request(llm):
    """The engine compiles in the background: a spec the API did not check ends its request
    with "error", and the request beside it is served."""
    outs = llm.generate(PROMPTS, [_params(StructuredOutput("regex", "(")), _params(temperature=0)])
    assert outs[0].outputs[0].finish_reason == "error"
    assert _valid(outs[1].outputs[0].text)


def test_logit_bias(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    target = 300 if base[0] != 300 else 301
    forced = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logit_bias={target: 100}))
    assert forced[0].outputs[0].token_ids == [target] * 4
    banned = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logit_bias={base[0]: -100}))
    assert base[0] not in banned[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={i: 1.0 for i in range(1025)})
    vocab = llm.config.text.vocab_size
    with pytest.raises(RequestRejected, match="logit_bias token id"):
        llm.engine.add_request(EngineRequest("lb", [1, 2], SamplingParams(logit_bias={vocab: 1.0})))


def test_without_the_mask_the_validity_check_fails(llm, monkeypatch):
    """The control: with the device mask a no-op the same runs do not validate (so the
    tests above can fail)."""
    monkeypatch.setattr(sampler, "apply_grammars", lambda logits, rows: None)
    outs = llm.generate(PROMPTS, _params(temperature=1.0, seed=7, n=2))
    assert not all(_valid(c.text) and c.finish_reason == "stop" for o in outs for c in o.outputs)


def test_mask_apply_paths_agree():
    """The CPU (numpy, row by row, both branches) and device (torch ops) paths set token
    32w + b of each constrained row to -inf iff bit b of word w is 0, cut the padding bits
    past the vocabulary, and leave unconstrained rows alone."""
    vocab = 150
    mask = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    mask[1, 1:] = 0  # few allowed tokens: the host path's fill-and-restore branch
    mask[2, :] = -1  # few forbidden tokens: the host path's -inf-at-those-tokens branch
    mask[2, 3] = 0x7FFF_FFEE  # tokens 96, 100 and 127 forbidden
    logits = torch.randn(5, vocab)
    rows = [1, 3, 4]
    host, dev = logits.clone(), logits.clone()
    _apply_on_host(host.numpy(), rows, mask.numpy())
    _apply_on_device(dev, rows, mask)
    assert torch.equal(host, dev)
    assert torch.equal(host[[0, 2]], logits[[0, 2]])
    assert torch.isinf(host[4]).nonzero().flatten().tolist() == [96, 100, 127]
    for j, r in enumerate(rows):
        for t in range(vocab):
            allowed = (int(mask[j, t // 32]) >> (t % 32)) & 1
            assert (host[r, t] == float("-inf")) == (not allowed)
    everything, ref = logits.clone(), logits.clone()  # all rows, through the public entry point
    apply_bitmask(everything, [0, 1], mask[:2])
    _apply_on_device(ref, [0, 1], mask[:2])
    assert torch.equal(everything, ref)


def test_one_thread_and_the_pool_fill_the_same_masks(llm):
    """A batch of matchers at different points of a schema: the fill on the calling thread
    (CPU logits, and any small batch) and llguidance's pool (a large batch beside a GPU: the
    device only picks the path) write the same bits, row by row, step after step."""
    vocab = llm.config.text.vocab_size
    compiled = llm.engine.grammar_compiler.compile(SO)
    states = [GrammarState(compiled) for _ in range(PARALLEL_FILL_ROWS)]
    g = torch.Generator().manual_seed(0)
    distinct = 0
    for _ in range(12):
        one = fill_bitmask(states, vocab, torch.device("cpu"))
        pool = fill_bitmask(states, vocab, torch.device("cuda"))
        assert torch.equal(one, pool)
        distinct = max(distinct, len({tuple(r) for r in one.tolist()}))
        logits = torch.randn(len(states), vocab, generator=g)
        apply_bitmask(logits, list(range(len(states))), one)
        for s, t in zip(states, logits.argmax(-1).tolist()):
            if not s.matcher.is_stopped():
                assert s.advance(t)
    assert distinct > 1  # the rows walked apart: a row mixed up with another would show


def test_a_token_the_grammar_forbids_is_refused_and_stays_refused(llm):
    """What the engine's collect relies on to fail such a request: advance is False for a
    token outside the mask (tried: one the first mask forbids), with the matcher's message,
    and every later token is refused too."""
    vocab = llm.config.text.vocab_size
    state = GrammarState(llm.engine.grammar_compiler.compile(SO))
    allowed = fill_bitmask([state], vocab, torch.device("cpu"))[0]
    forbidden = next(t for t in range(vocab) if not (int(allowed[t // 32]) >> (t % 32)) & 1)
    allowed_token = next(t for t in range(vocab) if (int(allowed[t // 32]) >> (t % 32)) & 1)
    assert not state.advance(forbidden)
    assert state.error
    assert not state.advance(allowed_token)


def test_a_template_whose_lexer_gave_up_fails_its_next_request_and_is_compiled_afresh(llm):
    """llguidance's lexer state is shared by every copy of a compiled grammar: once a{1000000}
    makes it give up (one token in), every later copy errs at its first mask, allowing only
    EOS, which it consumes with True (an empty 200 "stop" before). The engine fails such a
    request as the grammar's fault and forgets the template, so the next compile is fresh."""
    so = StructuredOutput("regex", "a{1000000}")
    compiler, vocab = llm.engine.grammar_compiler, llm.config.text.vocab_size
    exhausted = compiler.compile(so)
    state = GrammarState(exhausted)
    mask = fill_bitmask([state], vocab, torch.device("cpu"))[0]
    first = next(t for t in range(vocab) if (int(mask[t // 32]) >> (t % 32)) & 1)
    assert not state.advance(first) and "too many" in state.error
    engine = llm.engine
    engine.add_request(EngineRequest("exhausted", [1, 2, 3], SamplingParams(max_tokens=4, structured=so)))
    outs = []
    deadline = time.monotonic() + 30  # bounded in time, not steps: the compile is on a thread
    while engine.has_unfinished() and time.monotonic() < deadline:
        outs += [o for o in engine.step() if o.request_id == "exhausted"]
    assert [(o.finish_reason, o.fault) for o in outs] == [(FinishReason.ERROR, Fault.GRAMMAR)], outs
    assert "too many" in outs[0].error
    assert compiler.compile(so) is not exhausted


def test_a_step_with_only_a_compile_pending_waits_for_it_instead_of_spinning(llm, monkeypatch):
    """A compile that takes 60 ms, nothing else to run: each step waits up to 2 ms for it, so
    the request is admitted within ~30 steps (a step that returned at once spun thousands of
    times against the compile thread)."""
    engine = llm.engine
    compile_now = engine._compile

    def slow_compile(so: StructuredOutput):
        time.sleep(0.06)
        return compile_now(so)

    monkeypatch.setattr(engine, "_compile", slow_compile)
    so = StructuredOutput("regex", "[ab]{3}")
    engine.add_request(EngineRequest("slow", [1, 2, 3], SamplingParams(max_tokens=4, structured=so)))
    steps, deadline = 0, time.monotonic() + 30
    while engine._compiling and time.monotonic() < deadline:
        engine.step()
        steps += 1
    assert not engine._compiling and 1 <= steps <= 31, steps
    while engine.has_unfinished() and time.monotonic() < deadline:
        engine.step()
    assert not engine.has_unfinished()


def test_structured_bench_pieces_and_alternating_runs(llm):
    """The --structured bench's two measurements run end to end at tiny sizes: every mask
    piece is timed, and the alternating runs decode every step they should (both kinds)."""
    from server.engine import bench

    masks = bench.mask_cost(batch=2, vocab=600, device=torch.device("cpu"), steps=3)
    assert all(masks[f"{k}_ms_per_step"] > 0 for k in ("fill", "apply", "advance", "tail"))
    ab = bench.structured_ab(llm.engine, batch=2, decode_tokens=4, repeats=2)
    # each run decodes max_tokens - 1 tokens per row (the first comes with the prefill); a
    # constrained row whose grammar compile finished a step early decodes one of them untimed
    assert ab["tokens_none"] == 2 * 2 * 3 and 2 * 2 * 2 <= ab["tokens_json"] <= 2 * 2 * 3, ab
    assert ab["none_ms_per_step"] > 0 and ab["json_ms_per_step"] > 0
