"""What crosses the engine-process boundary, both ways (as vLLM v1's engine core messages).

API process -> engine process: a Command (AddRequest, AbortRequest, FinishSequence,
Shutdown). Engine process -> API process: an Event (Ready, StepOutputs, Failed, Bye). Each
is a small dataclass tagged with its kind; all of them pickle, since they travel through a
multiprocessing queue (or a plain queue.Queue when the core runs inline).

FinishReason: why a sequence ended. Its values are the OpenAI wire strings, so a reason is
sent and compared as the plain string it equals.

No torch here: the API side and the metrics import this module for the names alone.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from server.model.images import ProcessedImage

    from .sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id, a stop string, or a completed grammar
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # a fault in this request's own inputs ended it alone
    TOOL_CALLS = "tool_calls"  # the API's name for a chat STOP whose text held tool calls


class Fault(enum.StrEnum):
    """Whose fault a request that ended with ERROR was (the HTTP status it gets)."""

    ENGINE = "engine"  # something in the engine failed on this request's inputs: a 500
    GRAMMAR = "grammar"  # its grammar failed where only decoding shows (llguidance's limits,
    # a schema no text satisfies): the request's own, a 400


# What the engine itself ends a sequence with (TOOL_CALLS is the API's renaming of STOP).
ENGINE_FINISH_REASONS = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.ERROR)


# -- the payloads ---------------------------------------------------------------------------


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: list[ProcessedImage] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    sent_time: float = field(default_factory=time.monotonic)  # handed to the engine client


@dataclass(slots=True)
class FirstTokenTimes:
    """Where one sequence's time to first token went, as time.monotonic() stamps: Linux's
    CLOCK_MONOTONIC, one clock for both processes of a machine, so stamps taken on either
    side of the boundary subtract. The engine sends them with a sequence's first output only;
    the API process adds its own two. metrics.RequestMetrics turns them into the breakdown."""

    received: float  # the engine process took the request in (add_request)
    scheduled: float  # first scheduled (the queue wait ends)
    sampled: float  # the first token is on the engine's host
    vision_encode: float = 0.0  # seconds the vision tower ran for its images (part of prefill)
    sent: float | None = None  # API: the AddRequest was handed to the engine client (sent_time)
    returned: float | None = None  # API: the reader thread got the step's outputs


@dataclass(slots=True)  # one per sequence per step: slots make it cheaper to build
class EngineOutput:
    """New tokens of one sequence (request id + sibling index) from one step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # finish_reason ERROR: what failed (this request only)
    fault: Fault | None = None  # finish_reason ERROR: whose fault
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token: FirstTokenTimes | None = None  # on the sequence's first output only


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    max_model_len: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    step_tokens: int = 0
    vision_runs: int = 0
    num_steps: int = 0  # steps run since start: the heartbeat the API side watches
    device: str = ""  # "cuda" or "cpu"
    kernel_backend: str = ""  # in use: "triton" or "reference" (after a fallback, not what was asked)


# -- API process -> engine process ----------------------------------------------------------


class CommandKind(enum.Enum):
    ADD = "add"
    ABORT = "abort"
    FINISH_SEQUENCE = "finish_sequence"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class AddRequest:
    kind: ClassVar[CommandKind] = CommandKind.ADD
    request: EngineRequest


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Free every sequence of the request now (the client went away, or an error)."""

    kind: ClassVar[CommandKind] = CommandKind.ABORT
    request_id: str


@dataclass(frozen=True, slots=True)
class FinishSequence:
    """The API side matched a stop string in sibling `index`: free its blocks."""

    kind: ClassVar[CommandKind] = CommandKind.FINISH_SEQUENCE
    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop after this round of commands; the engine answers Bye."""

    kind: ClassVar[CommandKind] = CommandKind.SHUTDOWN


Command = AddRequest | AbortRequest | FinishSequence | Shutdown


# -- engine process -> API process ----------------------------------------------------------


class EventKind(enum.Enum):
    READY = "ready"
    STEP = "step"
    FAILED = "failed"
    BYE = "bye"


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded and the KV pool sized: requests may come."""

    kind: ClassVar[EventKind] = EventKind.READY
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """One round of the engine loop: the outputs of its step (or of commands alone), the
    requests refused at admission as (request id, why), and the stats after it."""

    kind: ClassVar[EventKind] = EventKind.STEP
    outputs: list[EngineOutput]
    rejected: list[tuple[str, str]]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine could not start, or a step failed: the engine process ends."""

    kind: ClassVar[EventKind] = EventKind.FAILED
    reason: str


@dataclass(frozen=True, slots=True)
class Bye:
    """The answer to Shutdown: the engine loop has returned."""

    kind: ClassVar[EventKind] = EventKind.BYE


Event = Ready | StepOutputs | Failed | Bye
