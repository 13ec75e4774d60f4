"""EngineCore: step() = schedule -> run -> sample -> outputs. No text, no HTTP, no asyncio:
it runs in the engine process (or inline for the offline LLM and tests)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import Tokenizer

from kernels import backend as kernel_backend
from server.model.images import ImageSettings, ProcessedImage
from server.model.loader import load_model
from server.model.qwen3_vl import Qwen3VL, mrope_positions
from server.transfer import to_device

from .args import EngineArgs
from .kv_cache import BlockManager, BlockSpans
from .memory import (
    MemoryProfile,
    cpu_kv_budget,
    cpu_num_blocks,
    grid_for_tokens,
    host_available_memory,
    kv_bytes_per_block,
    kv_pool_summary,
    largest_image_grid,
    profile_memory,
)
from .messages import EngineOutput, EngineRequest, EngineStats, Fault, FinishReason, FirstTokenTimes
from .runner import ChunkFault, ModelRunner, powers_of_two_to
from .sampler import PendingSample, SamplingInput, TokenCounts, sample_async
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import PendingTokens, Sequence, SequenceData, Status
from .structured import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarState,
    StructuredOutput,
    StructuredOutputError,
)

_T = TypeVar("_T")
log = logging.getLogger(__name__)
# Longest a step waits for a grammar compile when nothing else can run: short, because the
# engine process reads new commands only between steps.
_COMPILE_WAIT_S = 0.002


@dataclass
class _InFlight:
    """A step whose sampled tokens are still on the device."""

    seqs: list[Sequence]  # one per sampled row
    sample: PendingSample
    pending: PendingTokens


class RequestRejected(ValueError):
    """The request can never be served as asked (too long for the KV pool / context)."""


class EngineCore:
    def __init__(self, args: EngineArgs, model: Qwen3VL | None = None) -> None:
        self.args = args
        if model is None:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = getattr(torch, args.dtype) if args.dtype else None
            loaded = load_model(
                args.model, device, dtype, args.quantization, quantize_lm_head=args.quantize_lm_head
            )
            model = loaded.model
            image_settings = _image_settings(loaded.path)
            self.tokenizer_path: Path | None = Path(loaded.path) / "tokenizer.json"
        else:
            image_settings = ImageSettings()
            self.tokenizer_path = None  # set it to serve structured outputs
        model.set_backend(args.kernel_backend)
        self.model = model
        self.kernel_backend = kernel_backend.resolve(args.kernel_backend, model.device)
        cfg = model.cfg
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision.spatial_merge_size
        self.max_model_len = args.max_model_len or cfg.text.max_position_embeddings
        self.largest_image_grid = _largest_image_grid(image_settings, self.merge_size, args.max_model_len)
        self.memory_profile: MemoryProfile | None = None  # set when the KV pool is sized on CUDA
        num_blocks = args.num_kv_blocks or self._default_num_blocks()
        capacity = num_blocks * args.block_size
        if self.max_model_len > capacity:
            if args.max_model_len:
                raise ValueError(
                    f"max_model_len {args.max_model_len} exceeds the KV cache ({num_blocks} blocks of "
                    f"{args.block_size} = {capacity} tokens): lower it or give the cache more memory"
                )
            log.warning("max_model_len capped at %d tokens: the KV cache holds no more", capacity)
            self.max_model_len = capacity
        per_block = kv_bytes_per_block(model, args.block_size)
        log.info(kv_pool_summary(num_blocks, args.block_size, per_block, model.dtype, self.max_model_len))
        self.runner = ModelRunner(model, num_blocks, args.block_size, args.encoder_cache_bytes)
        self.runner.reserve_block_table(args.max_num_seqs, self.max_model_len)
        grid = self.largest_image_grid
        self.runner.max_encode_patches = grid[0] * grid[1] * grid[2]  # never above the profiled peak
        self._prepare_steps()
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        self.token_counts = TokenCounts(cfg.text.vocab_size, model.device)  # for penalties
        self.requests: dict[str, list[Sequence]] = {}
        self.eos: dict[str, frozenset[int]] = {}
        self.last_step_tokens = 0
        self.num_steps = 0
        self.last_step: SchedulerOutput | None = None
        self._inflight: _InFlight | None = None
        # Built here, not on the first constrained request: reading the vocabulary holds the
        # GIL (~0.9 s at 152k tokens), which must not stall a step.
        self.grammar_compiler = self._make_grammar_compiler()
        # requests whose grammar compiles in the background: out of the scheduler until done
        self._compiling: dict[str, Future[CompiledGrammar]] = {}
        self._grammar_pool: ThreadPoolExecutor | None = None  # one thread: the compilers' only user
        # Overlap the host's work with the device's: only worth it where they run in parallel.
        cuda = model.device.type == "cuda"
        self.async_scheduling = cuda if args.async_scheduling is None else args.async_scheduling

    def _default_num_blocks(self) -> int:
        a = self.args
        if self.model.device.type == "cuda":
            return self._blocks_from_profile()
        # CPU: a share of the RAM left after the weights (or --cpu-kv-cache-gb), see memory.py
        budget = cpu_kv_budget(host_available_memory(), a.cpu_kv_cache_gb)
        per_block = kv_bytes_per_block(self.model, a.block_size)
        return cpu_num_blocks(budget, per_block, a.max_num_seqs, self.max_model_len, a.block_size)

    def _prepare_steps(self) -> None:
        """Before traffic, with the Triton kernels: run them once (on CUDA: tune them for every
        prefill size, then capture the decode graphs; graphs need the Triton kernels, the
        reference ones read device values). A kernel that fails here costs speed, not service."""
        a = self.args
        cuda = self.model.device.type == "cuda"
        if self.kernel_backend == "reference":
            if cuda:
                log.info("decode runs eagerly: CUDA graphs need the Triton kernels")
            return
        t0 = time.perf_counter()
        cuda_triton = cuda and self.kernel_backend == "triton"
        sizes = (
            powers_of_two_to(a.max_num_batched_tokens) if cuda_triton else [min(16, a.max_num_batched_tokens)]
        )
        self._fall_back_on_kernel_error("warm-up", lambda: self._warm_up(sizes))
        log.info(
            "prefill sizes %s warmed up (%s kernels) in %.1f s",
            sizes,
            self.kernel_backend,
            time.perf_counter() - t0,
        )
        if cuda and self.kernel_backend == "triton" and not a.enforce_eager:
            self._enable_decode_graphs()

    def _warm_up(self, prefill_sizes: list[int]) -> None:
        """On CUDA with the Triton kernels, every step shape traffic can launch (runner.warm_up),
        so nothing compiles or tunes mid-traffic. CPU runs Triton in the interpreter, and a
        fall-back reruns this on the reference kernels: there a small prefill proves the
        kernels run (nothing compiles, and a max_model_len prefill would be slow)."""
        if self.model.device.type == "cuda" and self.kernel_backend == "triton":
            a = self.args
            self.runner.warm_up(prefill_sizes, a.max_num_seqs, self.max_model_len, images=True)
        else:
            self.runner.warm_up(prefill_sizes[-1:])

    def _fall_back_on_kernel_error(self, what: str, step: Callable[[], _T]) -> _T:
        """Run a start-up step; if it raises on the Triton kernels, log which kernel and why,
        switch the model to the reference kernels and run it again there (an error that
        the reference path raises too is not the kernels': it propagates)."""
        try:
            return step()
        except torch.cuda.OutOfMemoryError:
            raise  # memory, not a kernel: the caller says what to lower
        except Exception as e:
            if self.kernel_backend != "triton":
                raise
            log.warning(
                "Triton kernel %s failed during %s (%s: %s); serving on the reference kernels "
                "(plain torch, slower; --kernel-backend reference skips this)",
                kernel_backend.failing_kernel(e),
                what,
                type(e).__name__,
                e,
            )
        self.model.set_backend("reference")
        self.kernel_backend = "reference"
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed step left cached
        return step()

    def _enable_decode_graphs(self) -> None:
        """Capture the decode graphs; a failed capture costs speed, never the server."""
        try:
            self.runner.enable_decode_graphs(self.args.max_num_seqs, self.max_model_len)
        except Exception as e:
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s", type(e).__name__, e)
            self.runner.decode_graphs = None
            torch.cuda.empty_cache()
        else:
            self._check_graph_memory()

    def _check_graph_memory(self) -> None:
        graphs, profile = self.runner.decode_graphs, self.memory_profile
        if graphs is not None and profile is not None and graphs.memory > profile.decode_activations:
            log.warning(
                "the decode CUDA graphs took %.0f MiB, %.0f MiB more than the KV sizing set aside; "
                "lower gpu_memory_utilization if steps run out of memory",
                graphs.memory / 2**20,
                (graphs.memory - profile.decode_activations) / 2**20,
            )

    def _blocks_from_profile(self) -> int:
        """KV blocks that fit in gpu_memory_utilization x total after a profiling step."""
        a = self.args
        grid = self.largest_image_grid
        try:
            profile = self._fall_back_on_kernel_error(
                "the memory profile",
                lambda: profile_memory(
                    self.model, a.max_num_batched_tokens, a.max_num_seqs, a.block_size, grid
                ),
            )
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(
                f"the profiling step (an image of {grid[1] * grid[2] // self.merge_size**2} tokens, "
                f"{a.max_num_batched_tokens} batched tokens, {a.max_num_seqs} sequences) does not fit in GPU "
                "memory: lower --max-num-batched-tokens, --max-num-seqs or --max-model-len"
            ) from e
        self.memory_profile = profile
        return profile.num_blocks(
            a.gpu_memory_utilization, a.encoder_cache_bytes, kv_bytes_per_block(self.model, a.block_size)
        )

    # -- requests --------------------------------------------------------------------------

    def add_request(self, req: EngineRequest) -> None:
        received = time.monotonic()  # the TTFT breakdown's end of transit into the engine
        if req.request_id in self.requests:
            raise RequestRejected(f"request id {req.request_id!r} is already in use")
        n_prompt = len(req.prompt_token_ids)
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty")
        vocab = self.model.cfg.text.vocab_size
        if not 0 <= min(req.prompt_token_ids) <= max(req.prompt_token_ids) < vocab:
            bad = next(t for t in req.prompt_token_ids if not 0 <= t < vocab)
            raise RequestRejected(f"prompt token id {bad} is out of range (vocabulary size {vocab})")
        if n_prompt >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {n_prompt} tokens; the maximum context length is {self.max_model_len}"
            )
        max_tokens = req.params.max_tokens
        if max_tokens is not None and n_prompt + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the maximum context length "
                f"{self.max_model_len}"
            )
        max_tokens = req.params.max_output_tokens(n_prompt, self.max_model_len)
        n_image_tokens = sum(1 for t in req.prompt_token_ids if t == self.image_token_id)
        if n_image_tokens != sum(im.num_tokens for im in req.images):
            raise RequestRejected(
                f"the prompt has {n_image_tokens} image tokens but its images need "
                f"{sum(im.num_tokens for im in req.images)}"
            )
        if not self.scheduler.can_ever_fit(n_prompt + max_tokens):
            raise RequestRejected(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) can never fit in the KV cache"
            )
        try:
            req.params.validate()  # LLM callers and tests may have changed fields after construction
        except ValueError as e:
            raise RequestRejected(str(e)) from e
        bias = req.params.logit_bias or {}
        if bias and max(bias) >= vocab:
            raise RequestRejected(
                f"logit_bias token id {max(bias)} is out of range (vocabulary size {vocab})"
            )
        compiling = None
        if req.params.structured is not None:
            if self._grammar_pool is None:
                self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
            compiling = self._grammar_pool.submit(self._compile, req.params.structured)
        # Everything that can fail is computed before the scheduler sees the request.
        positions, delta = mrope_positions(
            req.prompt_token_ids, [im.grid_thw for im in req.images], self.image_token_id, self.merge_size
        )
        spans = _image_spans(req.prompt_token_ids, req.images, self.image_token_id)
        stop = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stop |= set(req.eos_token_ids)
        seqs = []
        for i in range(req.params.n):
            data = SequenceData.from_prompt(req.prompt_token_ids, req.images, positions, delta)
            seq = Sequence(
                req.request_id, i, data, req.params, spans, self.max_model_len, arrival_time=received
            )
            seq.gate = seqs[0] if i > 0 and self.block_manager.enable_prefix_caching else None
            seqs.append(seq)
        if compiling is not None:
            self._compiling[req.request_id] = compiling
        else:
            for seq in seqs:
                self.scheduler.add(seq)
        self.requests[req.request_id] = seqs
        self.eos[req.request_id] = frozenset(stop)

    def _make_grammar_compiler(self) -> GrammarCompiler | None:
        path = self.tokenizer_path
        if path is None or not path.is_file():
            return None
        from server.model.processor import read_eos_token_ids  # the processor's own rule

        tok = Tokenizer.from_file(str(path))
        return GrammarCompiler(tok, self.model.cfg.text.vocab_size, read_eos_token_ids(path.parent, tok))

    def _compile(self, so: StructuredOutput) -> CompiledGrammar:
        if self.grammar_compiler is None:
            raise RuntimeError("structured outputs need the model's tokenizer.json")
        return self.grammar_compiler.compile(so)

    def _admit_compiled(self) -> list[EngineOutput]:
        """Requests whose grammar is ready join the scheduler (each sibling its own matcher);
        a grammar that failed to compile fails its request only."""
        outputs: list[EngineOutput] = []
        for rid, fut in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[rid]
            seqs = self.requests.get(rid)
            if seqs is None:  # aborted meanwhile
                continue
            if (e := fut.exception()) is not None:
                fault = Fault.GRAMMAR if isinstance(e, StructuredOutputError) else Fault.ENGINE
                outputs += self.fail_request(rid, f"structured output: {e}", fault)
                continue
            for seq in seqs:
                seq.grammar = GrammarState(fut.result())
                self.scheduler.add(seq)
        return outputs

    def _fail_grammar(self, request_id: str, state: GrammarState) -> list[EngineOutput]:
        if self.grammar_compiler is not None:
            self.grammar_compiler.forget(state.compiled)
        return self.fail_request(request_id, f"structured output: {state.error}", Fault.GRAMMAR)

    def abort_request(self, request_id: str) -> list[EngineOutput]:
        return self._end_request(request_id, FinishReason.ABORT)

    def fail_request(self, request_id: str, error: str, fault: Fault = Fault.ENGINE) -> list[EngineOutput]:
        """A fault attributable to this request alone: end it (all its siblings) with an
        error and free its blocks; every other request keeps running."""
        level = logging.WARNING if fault is Fault.GRAMMAR else logging.ERROR
        log.log(level, "request %s failed in the engine and was ended: %s", request_id, error)
        return self._end_request(request_id, FinishReason.ERROR, error, fault)

    def _end_request(
        self, request_id: str, reason: FinishReason, error: str | None = None, fault: Fault | None = None
    ) -> list[EngineOutput]:
        seqs = self.requests.pop(request_id, None)
        self.eos.pop(request_id, None)
        self._compiling.pop(request_id, None)
        outs = []
        for seq in seqs or []:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, reason)
                outs.append(
                    EngineOutput(request_id, seq.index, [], finish_reason=reason, error=error, fault=fault)
                )
        return outs

    def finish_sequence(self, request_id: str, index: int, reason: FinishReason = FinishReason.STOP) -> None:
        """End one sequence early (the API side matched a stop string); frees its blocks."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if seq.index == index:
                self.scheduler.finish(seq, reason)
        if seqs and all(s.status is Status.FINISHED for s in seqs):
            self.requests.pop(request_id, None)
            self.eos.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None or bool(self._compiling)

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Schedule and launch one step, then return the outputs of the step before it (async
        scheduling: the device runs this step while the host reads the last one's tokens and
        books them) or of this one (sync)."""
        self.num_steps += 1
        if self._compiling and self._inflight is None and not self.scheduler.has_work():
            # Only grammars compiling: wait a little for one rather than return at once, so
            # a caller's step loop does not spin hot against the compile thread.
            wait(self._compiling.values(), timeout=_COMPILE_WAIT_S, return_when=FIRST_COMPLETED)
        admitted = self._admit_compiled() if self._compiling else []
        sched = self.scheduler.schedule()
        self.last_step = sched  # for describe_step() if this step fails
        self.last_step_tokens = sched.num_tokens
        inflight, self._inflight = self._inflight, None
        logits = None
        failed: list[EngineOutput] = []
        if sched.chunks:
            try:
                logits = self.runner.run(sched.chunks, inflight.pending if inflight else None)
            except ChunkFault as fault:
                # Nothing ran: the other chunks are scheduled again by the next step.
                failed = self.fail_request(sched.seqs[fault.chunk_index].request_id, str(fault))
                sched = SchedulerOutput([], [])
                self.last_step_tokens = 0
        # Grammar ordering under async scheduling: step N's tokens are collected (and each
        # matcher advanced by its token) here, before step N+1's rows are sampled below, so
        # every mask sees its row's latest token; the mask fill overlaps step N+1's forward.
        outputs = admitted + failed + (self._collect(inflight) if inflight else [])
        if sched.chunks:
            self.scheduler.after_step(sched)  # after _collect: full blocks hash the tokens it adds
            launched, failed = self._launch_sampling(sched, logits)
            outputs += failed
            if launched is not None and self.async_scheduling:
                self._inflight = launched
            elif launched is not None:
                outputs += self._collect(launched)
        return outputs

    def describe_step(self) -> str:
        """The requests of the last step, for the log when a step fails (as vLLM dumps it):
        ids, chunk ranges, prompt and image sizes, sampling parameters."""
        sched = self.last_step
        seqs = sched.seqs if sched is not None else list(self.scheduler.running)
        chunks = sched.chunks if sched is not None else [None] * len(seqs)
        lines = [f"{len(seqs)} sequence(s), {sum(c.end - c.start for c in chunks if c)} token(s):"]
        for seq, c in zip(seqs, chunks):
            span = f"tokens {c.start}:{c.end}" if c is not None else f"{seq.num_tokens} tokens"
            lines.append(
                f"  {seq.request_id}#{seq.index} {seq.status.value} {span} prompt={seq.num_prompt} "
                f"images={[im.grid_thw for im in seq.data.images]} blocks={len(seq.block_table)} "
                f"params={seq.params}"
            )
        return "\n".join(lines)

    def _launch_sampling(
        self, sched: SchedulerOutput, logits: torch.Tensor
    ) -> tuple[_InFlight | None, list[EngineOutput]]:
        """Queue sampling for the chunks that end their sequence's known tokens (rows of
        sequences finished since scheduling are dropped). A row whose own inputs make the
        sampler fail ends its request; the other rows are sampled as usual."""
        wanted = [s for c, s in zip(sched.chunks, sched.seqs) if c.want_logits]
        keep = [i for i, s in enumerate(wanted) if s.status is Status.RUNNING]
        failed: list[EngineOutput] = []
        try:
            pending = self._sample(logits, wanted, keep)
        except Exception as e:
            bad = [i for i in keep if not self._samples_alone(logits, wanted[i], i)]
            if not bad or not self._samples_plainly(logits, wanted[bad[0]], bad[0]):
                raise  # no row fails alone, or even plain sampling fails: the step's fault
            for i in bad:
                failed += self.fail_request(wanted[i].request_id, f"sampling failed: {type(e).__name__}: {e}")
            keep = [i for i in keep if wanted[i].status is Status.RUNNING]
            pending = self._sample(logits, wanted, keep)
        if pending is None:
            return None, failed
        seqs = [wanted[i] for i in keep]
        for seq in seqs:
            seq.num_pending += 1
        tokens = PendingTokens(pending.token_ids, {s.data: i for i, s in enumerate(seqs)})
        return _InFlight(seqs, pending, tokens), failed

    def _sample(self, logits: torch.Tensor, wanted: list[Sequence], keep: list[int]) -> PendingSample | None:
        if not keep:
            return None
        if len(keep) < len(wanted):
            logits = logits.index_select(0, to_device(keep, logits.device, torch.long))
        rows = []
        for i in keep:
            s = wanted[i]
            if s.sampling is None or s.sampling.grammar is not s.grammar:
                s.sampling = SamplingInput(s.params, s.data, s.index, self.eos[s.request_id], s.grammar)
            if s.grammar is not None:
                s.grammar.sync(s.data)
            rows.append(s.sampling)
        return sample_async(logits, rows, self.token_counts)

    def _samples_alone(self, logits: torch.Tensor, seq: Sequence, row: int) -> bool:
        try:
            self._sample(logits[row : row + 1], [seq], [0])
        except Exception:
            return False
        return True

    @staticmethod
    def _samples_plainly(logits: torch.Tensor, seq: Sequence, row: int) -> bool:
        """The control: the same row with default sampling parameters."""
        try:
            sample_async(logits[row : row + 1], [SamplingInput(SamplingParams(), seq.data)])
        except Exception:
            return False
        return True

    def _collect(self, inflight: _InFlight) -> list[EngineOutput]:
        """Wait for a launched sample's tokens, append them and decide which sequences end."""
        result = inflight.sample.result()
        now = time.monotonic()
        outputs = []
        finished = Status.FINISHED
        for seq, tok, lp in zip(inflight.seqs, result.token_ids, result.logprobs):
            seq.num_pending -= 1
            if seq.status is finished:  # aborted or stopped while its token was in flight
                continue
            seq.data.token_ids.append(tok)
            if seq.grammar is not None and not seq.grammar.advance(tok):
                outputs += self._fail_grammar(seq.request_id, seq.grammar)
                continue
            out = EngineOutput(seq.request_id, seq.index, [tok], [lp] if lp is not None else None)
            if seq.first_token_time is None:
                seq.first_token_time = now
                out.num_prompt_tokens = seq.num_prompt
                out.num_cached_tokens = seq.num_cached_prompt_tokens
                vision = self.runner.vision_seconds.pop(seq.data, 0.0)
                out.first_token = FirstTokenTimes(seq.arrival_time, seq.scheduled_time or now, now, vision)
            reason = self._finish_reason(seq, tok)
            if reason is None and seq.grammar is not None and seq.grammar.ended_by(tok):
                # the grammar is complete: EOS ends it even with ignore_eos
                reason = (FinishReason.STOP, None)
            if reason is not None:
                out.finish_reason, out.stop_reason = reason
                self.scheduler.finish(seq, *reason)
                if all(s.status is Status.FINISHED for s in self.requests.get(seq.request_id, [])):
                    self.requests.pop(seq.request_id, None)
                    self.eos.pop(seq.request_id, None)
            outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> tuple[FinishReason, int | str | None] | None:
        if tok in self.eos.get(seq.request_id, ()):
            return FinishReason.STOP, (tok if tok in seq.params.stop_token_ids else None)
        if len(seq.data.token_ids) - seq.data.num_prompt_tokens >= seq.max_output_tokens:
            return FinishReason.LENGTH, None
        return None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            num_kv_blocks=bm.num_blocks,
            max_model_len=self.max_model_len,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            step_tokens=self.last_step_tokens,
            vision_runs=self.runner.vision_runs,
            num_steps=self.num_steps,
            device=self.model.device.type,
            kernel_backend=self.kernel_backend,
        )


def _image_spans(token_ids: list[int], images: list[ProcessedImage], image_token_id: int) -> BlockSpans:
    """Token range of each image in the prompt (runs of image tokens, in order)."""
    spans = []
    it = iter(images)
    i, n = 0, len(token_ids)
    while i < n:
        if token_ids[i] == image_token_id:
            im = next(it)
            spans.append((i, i + im.num_tokens, im.content_hash))
            i += im.num_tokens
        else:
            i += 1
    return BlockSpans(spans)


def _image_settings(path: Path) -> ImageSettings:
    pre = Path(path) / "preprocessor_config.json"
    if not pre.is_file():
        return ImageSettings()
    return ImageSettings.from_preprocessor_config(json.loads(pre.read_text()))


def _largest_image_grid(
    settings: ImageSettings, merge_size: int, max_model_len: int | None
) -> tuple[int, int, int]:
    """The largest image a request can bring: the processor's maximum, or what fits in an
    explicit max_model_len (at least one text token besides the image)."""
    grid = largest_image_grid(settings)
    if max_model_len is not None and grid[1] * grid[2] // merge_size**2 >= max_model_len:
        grid = grid_for_tokens(max(1, max_model_len - 1), merge_size)
    return grid
