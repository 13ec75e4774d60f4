"""Offline API: `LLM(model).chat(...)` / `.generate(...)` returning vLLM-style outputs.

All prompts given in one call are submitted together and run through the continuous
batching engine in this process; text (detokenization, stop strings) is handled here.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Any

from server.model.processor import Processor, PromptInputs

from .core import EngineArgs, EngineCore
from .messages import EngineRequest
from .outputs import CompletionOutput, Logprob, RequestOutput, SequenceTracker
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput"]


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
        trackers: dict[str, list[SequenceTracker]] = {}
        cached: dict[str, int] = {}
        try:
            for rid, inp, p in zip(rids, inputs, plist):
                self.engine.add_request(
                    EngineRequest(rid, inp.prompt_token_ids, p, inp.images, self.processor.eos_token_ids)
                )
                trackers[rid] = [SequenceTracker(self.processor, p, i) for i in range(p.n)]
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.num_prompt_tokens:
                        cached[out.request_id] = max(cached.get(out.request_id, 0), out.num_cached_tokens)
                    if trackers[out.request_id][out.index].update(out):
                        self.engine.finish_sequence(out.request_id, out.index)  # a stop string matched
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
