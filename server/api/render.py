"""The endpoint halves of a request (lifecycle.py runs the shared part): chat's messages,
deltas, tool calls and refusal; completions' text, prompt lists and logprob tokens; both
logprobs shapes."""

from __future__ import annotations

import collections
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from server.engine.client import SequenceDelta
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.messages import FinishReason
from server.engine.outputs import Logprob
from server.engine.sampling_params import SamplingParams
from server.model.processor import PromptInputs

from .constraints import tool_choice_mode
from .prompts import chat_inputs, check_structured_output, completion_inputs, fit_to_context
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import ServerState
from .tool_calls import ToolCallStream, parse_tool_calls

Prepared = list[tuple[PromptInputs, SamplingParams]]  # one engine request per entry


_LOGPROB_FLOOR = -9999.0  # JSON has no -inf


class TokenText:
    """Token id -> its text, cached (logprobs name every alternative)."""

    def __init__(self, state: ServerState) -> None:
        self.processor = state.processor
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.processor.decode([token_id], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return max(float(value), _LOGPROB_FLOOR)


def chat_logprobs(tok: TokenText, lps: list[Logprob], top: int, skip_special: bool = True) -> dict[str, Any]:
    """`bytes`: the token's own bytes, so that joined they give the text back exactly; null for
    a special token the text leaves out (skip_special_tokens), as OpenAI allows."""
    proc = tok.processor

    def entry(tid: int, lp: float) -> dict[str, Any]:
        skipped = skip_special and tid in proc.special_ids
        return {
            "token": tok(tid),
            "logprob": _lp(lp),
            "bytes": None if skipped else list(proc.token_bytes(tid)),
        }

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top_logprobs[:top]]}
            for lp in lps
        ],
        "refusal": None,
    }


class TokenPieces:
    """Each token's share of a choice's text, in order: "" for a token that only starts a
    character (the token completing it carries the character) or that the text skips (a
    special token under skip_special_tokens). Joined they are the text, so `text_offset` is
    exact (single-token decodes show U+FFFD for partial characters and name skipped tokens)."""

    def __init__(self, state: ServerState, skip_special_tokens: bool) -> None:
        self._detok = IncrementalDetokenizer(state.processor, skip_special_tokens=skip_special_tokens)

    def next(self, token_id: int, last: bool = False) -> str:
        self._detok.add_tokens([token_id])
        if last:  # the text ends with whatever is left (a partial character as U+FFFD)
            self._detok.flush()
        return self._detok.take_delta(final=last)


def completion_logprobs(
    tok: TokenText, pieces: TokenPieces, lps: list[Logprob], top: int, offset: int, final: bool = True
) -> dict[str, Any]:
    """`final`: these logprobs end the choice (its text's last piece is theirs)."""
    tokens, offsets = [], []
    for i, lp in enumerate(lps):
        tokens.append(pieces.next(lp.token_id, last=final and i == len(lps) - 1))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(lp.logprob) for lp in lps],
        "top_logprobs": [{tok(t): _lp(v) for t, v in lp.top_logprobs[:top]} for lp in lps],
        "text_offset": offsets,
    }


@dataclass
class Choice:
    """What one choice (sibling) has produced, collected for a non-streamed response."""

    text: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class Renderer(ABC):
    """The endpoint's part of a request: what to run, and how its choices look on the wire."""

    id_prefix: str
    object: str  # of the full response
    chunk_object: str
    prompt_param: str  # what a prompt too long for the context is blamed on

    def __init__(self, state: ServerState, body: ChatCompletionRequest | CompletionRequest,
                 params: SamplingParams) -> None:  # fmt: skip
        self.state, self.body, self.params = state, body, params
        self.rid = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        self.tok = TokenText(state)

    async def prepare(self) -> Prepared:
        """The engine requests, one per prompt (the checks that take the event loop's time)."""
        await check_structured_output(self.state, self.params, self.body)
        fit, max_param = self.prompt_param, self.max_param()
        return [
            (inputs, fit_to_context(self.state, self.params, len(inputs.prompt_token_ids), fit, max_param))
            for inputs in await self.inputs()
        ]

    @abstractmethod
    async def inputs(self) -> list[PromptInputs]: ...

    def max_param(self) -> str:
        """The field a max_tokens too large for the context is blamed on."""
        return "max_tokens"

    def opening(self) -> Iterator[list[dict[str, Any]]]:
        """Chunks (each a list of choice entries) sent before the first token."""
        return iter(())

    @abstractmethod
    def chunks(self, deltas: list[SequenceDelta]) -> Iterator[list[dict[str, Any]]]:
        """Chunks for one engine step's deltas (each with text, logprobs or a finish)."""

    @abstractmethod
    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        """One choice of the non-streamed response."""

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.state.config.model_name,
                "choices": choices}  # fmt: skip


class ChatRenderer(Renderer):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    prompt_param = "messages"
    body: ChatCompletionRequest

    def __init__(self, state: ServerState, body: ChatCompletionRequest, params: SamplingParams) -> None:
        super().__init__(state, body, params)
        self.top = body.top_logprobs or 0
        # tools are offered (and the output parsed for calls) unless tool_choice is "none"
        offered = tool_choice_mode(body) != "none"
        self.tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if offered else []
        self.parsers = {i: ToolCallStream() for i in range(params.n)} if self.tools else {}

    def max_param(self) -> str:
        return "max_completion_tokens" if self.body.max_completion_tokens is not None else "max_tokens"

    async def inputs(self) -> list[PromptInputs]:
        return [await chat_inputs(self.state, self.body.messages, tools=self.tools or None)]

    def _logprobs(self, lps: list[Logprob]) -> dict[str, Any]:
        return chat_logprobs(self.tok, lps, self.top, self.params.skip_special_tokens)

    @staticmethod
    def _finish_reason(reason: FinishReason | None, called: bool) -> FinishReason | None:
        return FinishReason.TOOL_CALLS if called and reason == FinishReason.STOP else reason

    def opening(self) -> Iterator[list[dict[str, Any]]]:
        for i in range(self.params.n):
            yield [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]  # fmt: skip

    def chunks(self, deltas: list[SequenceDelta]) -> Iterator[list[dict[str, Any]]]:
        """One chunk per delta piece (text, or a tool call's start / arguments)."""
        for d in deltas:
            parser = self.parsers.get(d.index)
            if parser is None:
                pieces = [{"content": d.text}] if d.text else []
            else:
                pieces = parser.feed(d.text) + (parser.finish() if d.finish_reason is not None else [])
            lps = self._logprobs(d.logprobs) if self.params.logprobs is not None and d.logprobs else None
            pieces = pieces or [{}]
            for j, piece in enumerate(pieces):
                entry: dict[str, Any] = {"index": d.index, "delta": piece, "logprobs": lps if j == 0 else None,
                                         "finish_reason": None}  # fmt: skip
                if j == len(pieces) - 1 and d.finish_reason is not None:
                    entry["finish_reason"] = self._finish_reason(
                        d.finish_reason, bool(parser and parser.calls)
                    )
                    entry["stop_reason"] = d.stop_reason
                if piece or entry["logprobs"] or entry["finish_reason"]:
                    yield [entry]

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        content, calls = parse_tool_calls(text) if self.tools else (text, [])
        msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            msg["tool_calls"] = [{"id": t.id, "type": "function",
                                  "function": {"name": t.name, "arguments": t.arguments}} for t in calls]  # fmt: skip
        return {
            "index": index,
            "message": msg,
            "logprobs": self._logprobs(c.logprobs) if self.params.logprobs is not None else None,
            "finish_reason": self._finish_reason(c.finish_reason, bool(calls)),
            "stop_reason": c.stop_reason,
        }


class CompletionRenderer(Renderer):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    prompt_param = "prompt"
    body: CompletionRequest

    def __init__(self, state: ServerState, body: CompletionRequest, params: SamplingParams) -> None:
        super().__init__(state, body, params)
        self.top = body.logprobs or 0
        self.offsets: collections.Counter[int] = collections.Counter()  # streamed text so far per choice
        self.pieces: dict[int, TokenPieces] = {}

    async def inputs(self) -> list[PromptInputs]:
        return await completion_inputs(self.state, self.body)

    def _logprobs(self, index: int, lps: list[Logprob], offset: int, final: bool) -> dict[str, Any] | None:
        if self.params.logprobs is None:
            return None
        pieces = self.pieces.setdefault(index, TokenPieces(self.state, self.params.skip_special_tokens))
        return completion_logprobs(self.tok, pieces, lps, self.top, offset, final)

    def chunks(self, deltas: list[SequenceDelta]) -> Iterator[list[dict[str, Any]]]:
        """One chunk per engine step, every choice that changed in it."""
        out = []
        for d in deltas:
            final = d.finish_reason is not None
            lps = self._logprobs(d.index, d.logprobs, self.offsets[d.index], final) if d.logprobs else None
            self.offsets[d.index] += len(d.text)
            out.append({"index": d.index, "text": d.text, "logprobs": lps, "finish_reason": d.finish_reason,
                        **({"stop_reason": d.stop_reason} if final else {})})  # fmt: skip
        if out:
            yield out

    def choice(self, index: int, c: Choice) -> dict[str, Any]:
        return {"index": index, "text": "".join(c.text), "logprobs": self._logprobs(index, c.logprobs, 0, True),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}  # fmt: skip
