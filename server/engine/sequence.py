"""The sequence types every engine room shares: a sequence's tokens and multimodal layout
(SequenceData), the slice of it one step runs (ScheduledChunk) and the tokens still on the
device from the step in flight (PendingTokens). Their own module, so the scheduler and the
sampler need not import the runner (as nano-vllm's sequence.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.images import ProcessedImage


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


@dataclass
class ScheduledChunk:
    """Tokens [start, end) of `seq` run this step; the first `start` are already cached."""

    seq: SequenceData
    start: int
    end: int
    block_table: list[int]
    want_logits: bool = True
