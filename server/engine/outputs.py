"""The text side of generation, shared by the offline LLM and the API process: per-sequence
detokenization, stop strings and logprobs, and the vLLM-style output objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from .detokenizer import Decoder, IncrementalDetokenizer
from .messages import EngineOutput, FinishReason
from .sampling_params import SamplingParams


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True


class SequenceTracker:
    """Text side of one sequence: detokenizer, stop strings, logprobs."""

    def __init__(self, decoder: Decoder, params: SamplingParams, index: int) -> None:
        self.index = index
        self.detok = IncrementalDetokenizer(
            decoder,
            params.stop,
            params.skip_special_tokens,
            params.include_stop_str_in_output,
            params.min_tokens,
        )
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self._sent_tokens = 0
        self._sent_logprobs = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_delta(self) -> tuple[str, list[int], list[Logprob] | None]:
        """What is new since the last call: text (stop-string prefixes held back until
        decided), token ids and logprobs."""
        text = self.detok.take_delta(final=self.finished)
        ids = self.token_ids[self._sent_tokens :]
        self._sent_tokens = len(self.token_ids)
        lps = None
        if self.logprobs is not None:
            lps = self.logprobs[self._sent_logprobs :]
            self._sent_logprobs = len(self.logprobs)
        return text, ids, lps

    def update(self, out: EngineOutput) -> bool:
        """Apply one engine output; True if a stop string ended the sequence here."""
        if self.finish_reason is not None:
            return False  # already ended by a stop string; late tokens are dropped
        self.token_ids += out.new_token_ids
        if self.logprobs is not None and out.new_logprobs:
            for tok, lp in zip(out.new_token_ids, out.new_logprobs):
                if lp is not None:
                    self.logprobs.append(Logprob(tok, lp[0], lp[1]))
        if out.finish_reason == FinishReason.STOP:
            # the stopping token (EOS / stop_token_ids) is kept in token_ids, not in text
            self.detok.add_tokens(out.new_token_ids[:-1])
        else:
            self.detok.add_tokens(out.new_token_ids)
        if self.detok.stopped_by is not None:
            self.finish_reason, self.stop_reason = FinishReason.STOP, self.detok.stopped_by
            return True
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.detok.flush()
        return False

    def result(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detok.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            cumulative_logprob=sum(lp.logprob for lp in self.logprobs) if self.logprobs else None,
        )
