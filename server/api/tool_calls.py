"""Qwen tool-call text <-> OpenAI tool_calls.

Qwen3-VL writes each call as a block (its chat template asks for exactly this):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The rules, shared by parse_tool_calls and ToolCallStream (one scanner, `_Scanner`, so the two
cannot disagree however the text is split into deltas):

- A block runs from `<tool_call>` to the first `</tool_call>` that is not inside a JSON string.
  Strings are tracked only inside braces, so a stray quote in a malformed block cannot hide
  its close tag; a `</tool_call>` inside an argument's string value does not end the block.
- A block is a call when its body (between the tags) is one JSON object with a non-empty
  string "name" and "arguments" that is an object, a string holding a JSON object, null or
  absent (both: `{}`). Any other block stays in the content verbatim, tags included: text is
  never lost and nothing raises.
- A block still open when the text ends is a call if its body already is one (the model
  stopped right after the JSON), else content.
- `arguments` is always `json.dumps(obj, ensure_ascii=False)` of the parsed object: valid
  JSON, the same in both paths (the model's own spacing is not kept; NaN/Infinity refused).
- content is the text outside the calls, `str.strip()`ped, None when that is empty. Streamed
  content deltas concatenate to exactly that string ("" for None).

Streaming holds back only what may still change meaning: a tail that could be the start of
`<tool_call>`, trailing whitespace (it is sent once more content follows, dropped at the end,
which is what the strip does), and an open block. A call is sent when its block closes, as
two deltas: the header (index, id, type, name, arguments "") and then its whole arguments
string. Sending the name earlier would commit to a call before the block is known to parse;
OpenAI clients concatenate arguments pieces, so one piece is as valid as many.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass
class ToolCall:
    id: str  # "call_" + 24 random hex chars
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI returns it


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The model's whole output -> (content outside the tool-call blocks, stripped, None if empty;
    the calls). A block whose JSON does not parse, or lacks a string "name", stays in the
    content as text (never lost, never an exception)."""
    scanner = _Scanner()
    events = scanner.feed(text) + scanner.finish()
    content = "".join(e for e in events if isinstance(e, str)).strip()
    return content or None, [e for e in events if isinstance(e, ToolCall)]


class ToolCallStream:
    """Incremental twin of parse_tool_calls for streaming: feed the text deltas as they come.

    feed() and finish() return OpenAI chat.completion.chunk `delta` dicts, in order:
    {"content": ...} for text outside blocks; per call, once its block closes,
    {"tool_calls": [{"index": i, "id", "type": "function", "function": {"name", "arguments": ""}}]}
    then {"tool_calls": [{"index": i, "function": {"arguments": <the whole arguments JSON>}}]}.
    """

    def __init__(self) -> None:
        self._scanner = _Scanner()
        self._calls: list[ToolCall] = []
        self._started = False  # some content sent: leading whitespace is behind us
        self._space = ""  # trailing whitespace held back (sent only if more content follows)

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._scanner.feed(text), final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self._scanner.finish(), final=True)

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _deltas(self, events: list[str | ToolCall], final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, ToolCall):
                i = len(self._calls)
                self._calls.append(e)
                fn = {"name": e.name, "arguments": ""}
                out.append({"tool_calls": [{"index": i, "id": e.id, "type": "function", "function": fn}]})
                out.append({"tool_calls": [{"index": i, "function": {"arguments": e.arguments}}]})
                continue
            text = self._space + e if self._started else e.lstrip()
            body = text.rstrip()
            self._space = text[len(body) :]
            if body:
                self._started = True
                if out and "content" in out[-1]:
                    out[-1]["content"] += body  # one delta per run of content
                else:
                    out.append({"content": body})
        if final:
            self._space = ""  # the strip drops trailing whitespace
        return out


def _as_call(body: str) -> ToolCall | None:
    """A block's body -> the call it holds, or None when it holds none."""
    try:
        obj = json.loads(body, parse_constant=_refuse)
        if not isinstance(obj, dict):
            return None
        name, args = obj.get("name"), obj.get("arguments")
        if not isinstance(name, str) or not name:
            return None
        if args is None:
            args = {}
        elif isinstance(args, str):  # some models double-encode: '"arguments": "{\"a\": 1}"'
            args = json.loads(args, parse_constant=_refuse)
        if not isinstance(args, dict):
            return None
        return ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
        return None


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


class _Scanner:
    """Text in any pieces -> content strings and ToolCalls, the same for every split.

    Outside a block it holds back only a tail that is a proper prefix of `<tool_call>`. Inside
    one it keeps the block's text and a resumable scan state (brace depth, in a string, after a
    backslash), so each delta is looked at once."""

    def __init__(self) -> None:
        self._buf = ""  # outside: the held tail; inside: the block from its `<tool_call>`
        self._inside = False
        self._pos = 0  # inside: next char of _buf to scan
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        while True:
            if not self._inside:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = _partial_tail(self._buf, OPEN)
                    out.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                self._inside, self._pos = True, len(OPEN)
                self._depth, self._in_string, self._escaped = 0, False, False
            end = self._scan()
            if end is None:
                break
            block, self._buf, self._inside = self._buf[:end], self._buf[end:], False
            call = _as_call(block[len(OPEN) : -len(CLOSE)])
            out.append(call if call is not None else block)
        return [e for e in out if e != ""]

    def finish(self) -> list[str | ToolCall]:
        rest, self._buf = self._buf, ""
        if not self._inside:
            return [rest] if rest else []
        self._inside = False
        call = _as_call(rest[len(OPEN) :])
        return [call if call is not None else rest]

    def _scan(self) -> int | None:
        """Advance over the open block; the end of its close tag, or None until it is seen."""
        buf, i, n = self._buf, self._pos, len(self._buf)
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        end = None
        while i < n:
            c = buf[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == "<":
                if buf.startswith(CLOSE, i):
                    end = i + len(CLOSE)
                    break
                if n - i < len(CLOSE) and CLOSE.startswith(buf[i:]):
                    break  # maybe the close tag: decide when more text comes
            elif c == "{":
                depth += 1
            elif c == "}":
                depth = max(depth - 1, 0)
            elif c == '"' and depth > 0:
                in_string = True
            i += 1
        self._pos, self._depth, self._in_string, self._escaped = i, depth, in_string, escaped
        return end


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
