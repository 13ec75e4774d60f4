"""The engine-process boundary's vocabulary: typed messages that pickle, and finish reasons that
are the OpenAI wire strings."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import typing

from server.api.protocol import ChatChoice, CompletionChoice
from server.engine.messages import (
    ENGINE_FINISH_REASONS,
    AbortRequest,
    AddRequest,
    Bye,
    CommandKind,
    EngineOutput,
    EngineRequest,
    EngineStats,
    EventKind,
    Failed,
    FinishReason,
    FinishSequence,
    Ready,
    Shutdown,
    StepOutputs,
)
from server.engine.sampling_params import SamplingParams
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


def _every_message() -> list[object]:
    request = EngineRequest("r-1", [1, 2, 3], SamplingParams(max_tokens=4, stop=["x"]), eos_token_ids=[2])
    output = EngineOutput("r-1", 0, [7], [(-0.5, [(7, -0.5)])], FinishReason.LENGTH, num_prompt_tokens=3)
    stats = EngineStats(num_running=1, device="cpu")
    return [
        AddRequest(request),
        AbortRequest("r-1"),
        FinishSequence("r-1", 1),
        Shutdown(),
        Ready(stats),
        StepOutputs([output], [("r-2", "too long")], stats),
        Failed("RuntimeError: boom"),
        Bye(),
    ]


def test_boundary_messages_survive_pickling() -> None:
    kinds = []
    for msg in _every_message():
        back = pickle.loads(pickle.dumps(msg))
        assert back == msg and type(back) is type(msg) and back.kind is msg.kind
        kinds.append(msg.kind)
    assert set(kinds) == set(CommandKind) | set(EventKind)  # one dataclass per kind
    out = pickle.loads(pickle.dumps(_every_message()[5])).outputs[0]
    assert out.finish_reason is FinishReason.LENGTH


def test_messages_module_needs_no_torch() -> None:
    """The API side and the metrics import it for the names alone."""
    code = "import sys, server.engine.messages; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
