"""The sequence types every engine room shares: a sequence's tokens and multimodal layout
(SequenceData), its engine-side state (Sequence: blocks, progress, status), the slice of it
one step runs (ScheduledChunk) and the tokens still on the device from the step in flight
(PendingTokens). Their own module, so the scheduler and the sampler need not import the
runner (as nano-vllm's sequence.py)."""

from __future__ import annotations

import enum
import time
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING

import torch

from server.model.images import ProcessedImage

if TYPE_CHECKING:
    from .kv_cache import BlockSpans
    from .messages import FinishReason
    from .sampler import SamplingInput
    from .sampling_params import SamplingParams
    from .structured import GrammarState


@dataclass(eq=False)
class SequenceData:
    """The model-side state of one sequence: its tokens (prompt, then generated, appended in
    place: no per-step copies) and its prompt's multimodal layout."""

    token_ids: list[int]
    num_prompt_tokens: int
    images: list[ProcessedImage]
    mrope_positions: torch.Tensor  # [3, num_prompt_tokens]
    rope_delta: int
    _image_mask: torch.Tensor | None = None
    _image_spans: list[tuple[int, int]] | None = None

    @classmethod
    def from_prompt(
        cls, prompt: list[int], images: list[ProcessedImage], positions: torch.Tensor, rope_delta: int
    ) -> SequenceData:
        return cls(list(prompt), len(prompt), images, positions, rope_delta)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __len__(self) -> int:
        return len(self.token_ids)

    def image_spans(self, image_token_id: int) -> list[tuple[int, int]]:
        """Prompt positions [start, end) of each image's tokens, in image order."""
        if self._image_spans is None:
            where = self.image_mask(image_token_id).nonzero().flatten().tolist()
            spans, i = [], 0
            for im in self.images:
                spans.append((where[i], where[i + im.num_tokens - 1] + 1))
                i += im.num_tokens
            self._image_spans = spans
        return self._image_spans

    def image_mask(self, image_token_id: int) -> torch.Tensor:
        """bool [num_prompt_tokens]: which prompt positions are image tokens (computed once)."""
        if self._image_mask is None:
            self._image_mask = torch.tensor(self.prompt_token_ids) == image_token_id
        return self._image_mask

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end-start] for tokens start..end-1 (prompt or generated)."""
        n_prompt = self.num_prompt_tokens
        if start >= n_prompt:  # decode: the same position on all three axes
            return (torch.arange(start, end) + self.rope_delta).expand(3, -1)
        parts = [self.mrope_positions[:, start : min(end, n_prompt)]]
        if end > n_prompt:
            parts.append((torch.arange(n_prompt, end) + self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1)


@dataclass
class PendingTokens:
    """Tokens sampled on the device by the step still in flight and not yet read back: the
    token of sequence `data` is `ids[rows[data]]`. A step scheduled meanwhile takes them
    from there (async scheduling)."""

    ids: torch.Tensor  # [R] long, on the model's device
    rows: dict[SequenceData, int]


@dataclass(slots=True)  # a few hundred per step
class ScheduledChunk:
    """Tokens [start, end) of `seq` run this step; the first `start` are already cached."""

    seq: SequenceData
    start: int
    end: int
    block_table: list[int]
    want_logits: bool = True


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # sibling index (n > 1)
    data: SequenceData
    params: SamplingParams
    spans: BlockSpans
    max_model_len: InitVar[int]
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_registered_blocks: int = 0  # prefix-cache bookkeeping
    num_cached_prompt_tokens: int = 0
    scheduled_time: float | None = None  # first admitted (queue time ends)
    first_token_time: float | None = None
    gate: Sequence | None = None  # sibling whose prompt must be computed first (shared prefix)
    num_pending: int = 0  # sampled on the device by the step in flight, not yet on the host
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    grammar: GrammarState | None = None  # structured output: this sequence's own matcher
    sampling: SamplingInput | None = None  # its sampler row, made once (the engine's core)
    max_output_tokens: int = field(init=False)  # the params' rule for this prompt, once

    def __post_init__(self, max_model_len: int) -> None:
        self.max_output_tokens = self.params.max_output_tokens(self.data.num_prompt_tokens, max_model_len)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the one still on the device (async scheduling)."""
        return len(self.data.token_ids) + self.num_pending

    @property
    def num_prompt(self) -> int:
        return self.data.num_prompt_tokens

    @property
    def in_prefill(self) -> bool:
        """More than one token to compute: a prompt, or a recompute after preemption."""
        return self.num_tokens - self.num_computed > 1
