"""Offline API: `LLM(model).chat(...)` / `.generate(...)` returning vLLM-style outputs.

For now the inside is a simple loop (one sequence at a time over the paged-cache model,
prefill in chunks, then decode); the continuous-batching engine replaces the inside, not
this API.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from server.model.loader import load_model
from server.model.processor import Processor, PromptInputs
from server.model.qwen3_vl import mrope_positions

from .detokenizer import IncrementalDetokenizer
from .runner import ModelRunner, ScheduledChunk, SequenceData
from .sampler import SamplingInput, sample
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
    finish_reason: str | None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    """Load a checkpoint (a demo name, a folder, or a hub id) and generate offline."""

    def __init__(
        self,
        model: str = "demo",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantization: str | None = None,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        linear_backend: str = "auto",
    ) -> None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        loaded = load_model(model, device=device, dtype=dtype, quantization=quantization)
        self.model = loaded.model
        self.model.set_linear_backend(linear_backend)
        self.config = loaded.config
        self.quantization = loaded.quantization
        self.processor = Processor(loaded.path, loaded.config)
        self.max_model_len = min(max_model_len or loaded.config.text.max_position_embeddings, 1 << 20)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        blocks = num_kv_blocks or math.ceil(self.max_model_len / block_size)
        self.runner = ModelRunner(self.model, blocks, block_size)
        self._ids = itertools.count()

    # -- public API ----------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return [self._run(self.processor.process_chat(conv), sampling_params) for conv in convs]  # type: ignore[arg-type]

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Raw prompts (text or token ids), no chat template."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return [self._run(self.processor.process_prompt(p), sampling_params) for p in prompts]  # type: ignore[arg-type]

    # -- the simple loop -------------------------------------------------------------------

    def _run(self, inputs: PromptInputs, params: SamplingParams | None) -> RequestOutput:
        params = params or SamplingParams()
        n_prompt = len(inputs.prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        if n_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {n_prompt} tokens; max_model_len is {self.max_model_len}")
        positions, delta = mrope_positions(
            inputs.prompt_token_ids,
            [im.grid_thw for im in inputs.images],
            self.config.image_token_id,
            self.config.vision.spatial_merge_size,
        )
        outputs = []
        for index in range(params.n):
            seq = SequenceData(list(inputs.prompt_token_ids), inputs.images, positions, delta)
            outputs.append(self._generate_one(seq, params, index))
        return RequestOutput(f"req-{next(self._ids)}", inputs.prompt, list(inputs.prompt_token_ids), outputs)

    def _generate_one(self, seq: SequenceData, params: SamplingParams, index: int) -> CompletionOutput:
        n_prompt = len(seq.prompt_token_ids)
        limit = self.max_model_len - n_prompt
        max_tokens = min(params.max_tokens or limit, limit)
        table = list(range(math.ceil((n_prompt + max_tokens) / self.block_size)))
        if len(table) > self.runner.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {len(table)} KV blocks; the pool has {self.runner.num_blocks}"
            )
        eos = set() if params.ignore_eos else set(self.processor.eos_token_ids)
        stop_ids = eos | set(params.stop_token_ids)
        detok = IncrementalDetokenizer(
            self.processor, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        finish, stop_reason = "length", None
        cached = 0
        while len(seq.output_token_ids) < max_tokens:
            end = len(seq)
            if cached < n_prompt:  # prefill in chunks of max_num_batched_tokens
                end = min(n_prompt, cached + self.max_num_batched_tokens)
            logits = self.runner.run([ScheduledChunk(seq, cached, end, table, want_logits=end == len(seq))])
            cached = end
            if end < len(seq):
                continue
            row = SamplingInput(
                params, seq.prompt_token_ids, seq.output_token_ids, index, frozenset(stop_ids)
            )
            result = sample(logits, [row])
            tok = result.token_ids[0]
            seq.output_token_ids.append(tok)
            if logprobs is not None and result.logprobs[0] is not None:
                lp, top = result.logprobs[0]
                logprobs.append(Logprob(tok, lp, top))
            if tok in stop_ids:  # the sampler already kept these out before min_tokens
                finish, stop_reason = "stop", (tok if tok not in eos else None)
                break
            detok.add_tokens([tok])
            if detok.stopped_by is not None:
                finish, stop_reason = "stop", detok.stopped_by
                break
        detok.flush()
        return CompletionOutput(
            index=index,
            text=detok.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=finish,
            stop_reason=stop_reason,
            logprobs=logprobs,
            cumulative_logprob=sum(lp.logprob for lp in logprobs) if logprobs else None,
        )
