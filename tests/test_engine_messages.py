"""The engine-process boundary's vocabulary: finish reasons are the OpenAI wire strings."""

from __future__ import annotations

import json
import pickle
import typing

from server.api.protocol import ChatChoice, CompletionChoice
from server.engine.messages import ENGINE_FINISH_REASONS, FinishReason
from server.metrics import FINISH_REASONS


def test_finish_reasons_are_the_wire_strings() -> None:
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error", "tool_calls"]
    for r in FinishReason:
        assert r == r.value and str(r) == r.value and f"{r}" == r.value
        assert json.dumps({"finish_reason": r}) == json.dumps({"finish_reason": r.value})
        assert pickle.loads(pickle.dumps(r)) is r


def test_protocol_and_metrics_name_the_same_reasons() -> None:
    chat = set(typing.get_args(typing.get_args(ChatChoice.model_fields["finish_reason"].annotation)[0]))
    completion = set(
        typing.get_args(typing.get_args(CompletionChoice.model_fields["finish_reason"].annotation)[0])
    )
    assert chat == {r.value for r in FinishReason}
    assert completion == {r.value for r in ENGINE_FINISH_REASONS}
    assert set(FINISH_REASONS) == completion
    choice = CompletionChoice(index=0, text="", finish_reason=FinishReason.LENGTH)
    assert json.loads(choice.model_dump_json())["finish_reason"] == "length"
