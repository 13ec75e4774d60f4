"""What crosses the engine-process boundary (as vLLM v1's engine core messages).

FinishReason: why a sequence ended. Its values are the OpenAI wire strings, so a reason is
sent and compared as the plain string it equals.
"""

from __future__ import annotations

import enum


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id, a stop string, or a completed grammar
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # a fault in this request's own inputs ended it alone
    TOOL_CALLS = "tool_calls"  # the API's name for a chat STOP whose text held tool calls


# What the engine itself ends a sequence with (TOOL_CALLS is the API's renaming of STOP).
ENGINE_FINISH_REASONS = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.ERROR)
