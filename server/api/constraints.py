"""A request's output constraints -> the engine's StructuredOutput, and the checks that refuse
what cannot be honoured before anything reaches the engine.

Sources, at most one per request: `response_format` (OpenAI), vLLM's `structured_outputs`
object or its older `guided_*` fields, and `tool_choice` "required" or a named function (the
call is enforced by the grammar, as vLLM does, so even a model that would never call a tool
answers with a valid call). With tool_choice "auto", tools are offered and the output is
parsed for calls, unconstrained; a response_format then still applies.
"""

from __future__ import annotations

import json
from typing import Any

from server.engine.structured import StructuredOutput

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice


def tool_choice_mode(req: ChatCompletionRequest) -> str:
    """ "none", "auto", "required" or "named" (OpenAI's default: auto with tools, else none)."""
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        return "named"
    if choice is None:
        return "auto" if req.tools else "none"
    return choice


def check_tool_messages(messages: list[ChatMessage]) -> None:
    """400s for tool-call history a chat cannot have (chat completions and /tokenize alike)."""
    for i, m in enumerate(messages):
        if m.role == "tool" and not m.tool_call_id:
            raise bad_request("a 'tool' message needs the 'tool_call_id' of the call it answers",
                              f"messages[{i}].tool_call_id")  # fmt: skip
        if m.tool_calls and m.role != "assistant":
            raise bad_request("only 'assistant' messages carry 'tool_calls'", f"messages[{i}].tool_calls")


def check_tools(req: ChatCompletionRequest) -> None:
    """400s for tool fields that cannot work together (each names its param)."""
    check_tool_messages(req.messages)
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise bad_request(f"two tools are named {dup!r}: tool names must be unique", "tools")
    mode = tool_choice_mode(req)
    if mode in ("required", "named") and not req.tools:
        raise bad_request(f"tool_choice {'naming a function' if mode == 'named' else repr(mode)} needs 'tools'",
                          "tool_choice")  # fmt: skip
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(
            f"tool_choice names the function {req.tool_choice.function.name!r}, which is not in 'tools'",
            "tool_choice",
        )
    for i, t in enumerate(req.tools or []):
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise bad_request("a function's parameters must be a JSON schema of an object",
                              f"tools[{i}].function.parameters")  # fmt: skip


def _tool_calls(req: ChatCompletionRequest) -> StructuredOutput:
    tools = req.tools or []
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == req.tool_choice.function.name]
    spec = {
        "tools": [
            {
                "name": t.function.name,
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in tools
        ],
        "parallel": req.parallel_tool_calls and not isinstance(req.tool_choice, NamedToolChoice),
    }
    return StructuredOutput("tool_calls", json.dumps(spec, sort_keys=True))


def _schema_text(value: dict[str, Any] | str, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"not a JSON schema: {e}", param) from e
    if not isinstance(value, dict):
        raise bad_request("a JSON schema must be an object", param)
    return json.dumps(value, sort_keys=True)


def structured_output(
    req: ChatCompletionRequest | CompletionRequest,
) -> tuple[StructuredOutput | None, str | None]:
    """The request's constraint and the param it came from (None, None: unconstrained)."""
    found: list[tuple[StructuredOutput, str]] = []
    if isinstance(req, ChatCompletionRequest):
        if tool_choice_mode(req) in ("required", "named"):
            found.append((_tool_calls(req), "tool_choice"))
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            found.append((StructuredOutput("json_object"), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None and rf.json_schema.json_schema is not None
            found.append((StructuredOutput("json_schema", _schema_text(rf.json_schema.json_schema,
                                                                       "response_format.json_schema.schema")),
                          "response_format"))  # fmt: skip
    so = req.structured_outputs
    if so is not None:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
        given += ["json_object"] if so.json_object else []
        if len(given) != 1:
            raise bad_request("structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
                              "structured_outputs")  # fmt: skip
        found.append((_from_fields(given[0].rstrip("_"), getattr(so, given[0]), "structured_outputs"),
                      "structured_outputs"))  # fmt: skip
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append((_from_fields(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1 and (found[0][1], found[1][1]) == ("tool_choice", "response_format"):
        del found[1]  # a required / named tool call wins over response_format (docs/API.md)
    if len(found) > 1:
        (_, a), (_, b) = found[:2]
        raise bad_request(f"{a} and {b} both constrain the output: send one", b)
    return found[0] if found else (None, None)


def _from_fields(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json_schema", _schema_text(value, param))
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "choice":
        if not all(isinstance(c, str) and c for c in value):
            raise bad_request("choices must be non-empty strings", param)
        return StructuredOutput("choice", json.dumps(list(value)))
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string", param)
    return StructuredOutput(kind, value)
