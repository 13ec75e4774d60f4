"""Offline API: `LLM(model).chat(...)` / `.generate(...)` returning vLLM-style outputs.

All prompts given in one call are submitted together and run through the continuous
batching engine in this process; text (detokenization, stop strings) is handled here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Any

from server.model.processor import Processor, PromptInputs

from .core import EngineArgs, EngineCore, EngineOutput, EngineRequest
from .detokenizer import IncrementalDetokenizer
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
    finish_reason: str | None  # "stop" | "length" | "abort"
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


class _Tracker:
    """Text side of one sequence: detokenizer, stop strings, logprobs."""

    def __init__(self, processor: Processor, params: SamplingParams, index: int) -> None:
        self.index = index
        self.detok = IncrementalDetokenizer(
            processor, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def update(self, out: EngineOutput) -> bool:
        """Apply one engine output; True if a stop string ended the sequence here."""
        self.token_ids += out.new_token_ids
        if self.logprobs is not None and out.new_logprobs:
            for tok, lp in zip(out.new_token_ids, out.new_logprobs):
                if lp is not None:
                    self.logprobs.append(Logprob(tok, lp[0], lp[1]))
        if out.finish_reason == "stop":
            # the stopping token (EOS / stop_token_ids) is kept in token_ids, not in text
            self.detok.add_tokens(out.new_token_ids[:-1])
        else:
            self.detok.add_tokens(out.new_token_ids)
        if self.detok.stopped_by is not None:
            self.finish_reason, self.stop_reason = "stop", self.detok.stopped_by
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


class LLM:
    """Load a checkpoint (a demo name, a folder, or a hub id) and generate offline.

    Keyword arguments are EngineArgs fields: max_model_len, max_num_seqs,
    max_num_batched_tokens, num_kv_blocks, gpu_memory_utilization, quantization, ...
    """

    def __init__(self, model: str = "demo", **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown LLM options: {sorted(unknown)}")
        if "dtype" in kwargs and not isinstance(kwargs["dtype"], (str, type(None))):
            kwargs["dtype"] = str(kwargs["dtype"]).replace("torch.", "")
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = str(kwargs["device"])
        self.args = EngineArgs(model=str(model), **kwargs)
        self.engine = EngineCore(self.args)
        from server.model.loader import resolve_model_path

        self.processor = Processor(resolve_model_path(self.args.model), self.engine.model.cfg)
        self.config = self.engine.model.cfg
        self._ids = itertools.count()

    # -- public API ----------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._run([self.processor.process_chat(c) for c in convs], sampling_params)  # type: ignore[arg-type]

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Raw prompts (text or token ids), no chat template."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([self.processor.process_prompt(p) for p in prompts], sampling_params)  # type: ignore[arg-type]

    # -- batch loop ------------------------------------------------------------------------

    def _run(
        self, inputs: list[PromptInputs], params: SamplingParams | list[SamplingParams] | None
    ) -> list[RequestOutput]:
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(inputs)
        if len(plist) != len(inputs):
            raise ValueError("give one SamplingParams, or one per prompt")
        rids = [f"llm-{next(self._ids)}" for _ in inputs]
        trackers: dict[str, list[_Tracker]] = {}
        cached: dict[str, int] = {}
        try:
            for rid, inp, p in zip(rids, inputs, plist):
                self.engine.add_request(
                    EngineRequest(rid, inp.prompt_token_ids, p, inp.images, self.processor.eos_token_ids)
                )
                trackers[rid] = [_Tracker(self.processor, p, i) for i in range(p.n)]
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.num_prompt_tokens:
                        cached[out.request_id] = max(cached.get(out.request_id, 0), out.num_cached_tokens)
                    if trackers[out.request_id][out.index].update(out):
                        self._stop_sibling(out.request_id, out.index)
        except BaseException:
            for rid in rids:
                self.engine.abort_request(rid)
            raise
        return [
            RequestOutput(
                rid,
                inp.prompt,
                list(inp.prompt_token_ids),
                [t.result() for t in trackers[rid]],
                cached.get(rid, 0),
            )
            for rid, inp in zip(rids, inputs)
        ]

    def _stop_sibling(self, request_id: str, index: int) -> None:
        """A stop string ended one sequence: finish it in the engine (frees its blocks)."""
        for seq in self.engine.requests.get(request_id, []):
            if seq.index == index:
                self.engine.scheduler.finish(seq, "stop")
        seqs = self.engine.requests.get(request_id, [])
        if seqs and all(s.finish_reason is not None for s in seqs):
            self.engine.requests.pop(request_id, None)
            self.engine.eos.pop(request_id, None)
