"""AsyncEngine: the API-process side of the engine-process boundary.

The engine process owns the model and the GPU and does nothing but schedule and run
(EngineCore). The boundary is narrow (messages.py): add request, abort request, finish one
sequence (a stop string matched), shut down; and back, ready, a stream of per-step outputs
+ engine stats, failed, bye. Text (incremental detokenization, stop strings) is done here,
in the API process.

`inline=True` runs the core in a thread of this process instead (debugging, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from server.model.model_config import ModelConfig
from server.model.processor import Processor, PromptInputs

from .args import EngineArgs
from .messages import (
    AbortRequest,
    AddRequest,
    Bye,
    Command,
    EngineOutput,
    EngineRequest,
    EngineStats,
    Failed,
    Fault,
    FinishReason,
    FinishSequence,
    FirstTokenTimes,
    Ready,
    Shutdown,
    StepOutputs,
)
from .outputs import Logprob, SequenceTracker
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often the reader checks that the engine is alive
STALL_TIMEOUT_S = {"cuda": 30.0, "cpu": 120.0}  # default --engine-stall-timeout by device
ENGINE_CPU_NICENESS = 5  # on a CPU: the engine yields the cores to the API process when it needs them
_HEARTBEAT_S = 0.5  # an engine loop with work but nothing to report still reports this often


class EngineDeadError(RuntimeError):
    """The engine process died; every pending and future request fails with this."""


class EngineRequestError(ValueError):
    """The engine refused the request (e.g. it can never fit); a client error (HTTP 400)."""


class EngineRequestFailed(RuntimeError):
    """The engine failed this request alone and kept serving the others: an error for this
    request only, a 500 or, where its grammar is at fault, a 400 (`fault`)."""

    def __init__(self, message: str, fault: Fault = Fault.ENGINE) -> None:
        super().__init__(message)
        self.fault = fault


@dataclass
class SequenceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestDelta:
    """What one request gained in one engine step (one entry per sibling that changed)."""

    request_id: str
    deltas: list[SequenceDelta]
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    finished: bool = False
    first_token: FirstTokenTimes | None = None  # the first sampled sibling's, once it came
    completion_tokens: list[int] = field(default_factory=list)  # per sibling, so far


# ---------------------------------------------------------------------------------------
# Engine side


def _follow_parent() -> None:
    """In the engine process: signals to the process group (Ctrl-C, `timeout`, `kill -TERM -pgid`)
    are for the API process, which drains first and then sends Shutdown; and the engine must
    not outlive the API process (Linux: it gets SIGKILL when its parent dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _yield_cpu_to_api(args: EngineArgs) -> None:
    """On a CPU the engine's compute threads and the API process share the cores: run the
    engine at a lower priority, so HTTP work (probes, SSE, tokenizing) is never starved by a
    busy step; an idle API process leaves the engine every cycle anyway."""
    import torch

    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu:
        with contextlib.suppress(OSError):
            os.nice(ENGINE_CPU_NICENESS)


def _wire_pixels(req: EngineRequest) -> EngineRequest:
    """Images cross the process boundary as numpy arrays: torch pickles a tensor through its
    shared-memory handoff (a new segment, its descriptor sent over a socket, Python code in the
    queue's feeder thread fighting the event loop for the GIL), an array is one buffer copy."""
    if not req.images:
        return req
    return replace(req, images=[replace(im, pixel_values=im.pixel_values.numpy()) for im in req.images])


def _tensor_pixels(req: EngineRequest) -> EngineRequest:
    """The engine side of _wire_pixels: tensors again, sharing the arrays' memory."""
    if not req.images or not any(isinstance(im.pixel_values, np.ndarray) for im in req.images):
        return req
    import torch

    images = [replace(im, pixel_values=torch.from_numpy(im.pixel_values)) for im in req.images]
    return replace(req, images=images)


def _brief(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."


def engine_main(
    args: EngineArgs, inbox: Any, outbox: Any, log_setup: tuple[str, str] = ("text", "info")
) -> None:
    """The engine process's loop: apply commands, step, publish outputs + stats.
    `log_setup`: the server's (--log-format, --log-level), so both processes log alike."""
    from .core import EngineCore, RequestRejected

    if threading.current_thread() is threading.main_thread():
        from server.logs import configure_logging

        configure_logging(*log_setup)  # a spawned process starts with no handlers at all
        _follow_parent()
        _yield_cpu_to_api(args)
    try:
        core = EngineCore(args)
    except BaseException as e:  # report load failures to the API side before dying
        outbox.put(Failed(f"{type(e).__name__}: {e}"))
        raise
    gc.collect()
    gc.freeze()  # the model and its tables live as long as the process: no full GC passes over them
    outbox.put(Ready(core.stats()))
    last_sent = time.monotonic()
    while True:
        commands: list[Command] = []
        if not core.has_unfinished():
            commands.append(inbox.get())  # idle: block until there is work
        while True:
            try:
                commands.append(inbox.get_nowait())
            except queue.Empty:
                break
        outputs: list[EngineOutput] = []
        rejected: list[tuple[str, str]] = []
        for cmd in commands:
            match cmd:
                case AddRequest(request=req):
                    try:
                        core.add_request(_tensor_pixels(req))
                    except RequestRejected as e:
                        rejected.append((req.request_id, str(e)))
                    except Exception as e:  # a fault in this request's own inputs: only it fails
                        log.exception("request %s could not be added", req.request_id)
                        core.abort_request(req.request_id)  # in case part of it was registered
                        outputs.append(
                            EngineOutput(
                                req.request_id, 0, [], finish_reason=FinishReason.ERROR, error=_brief(e)
                            )
                        )
                case AbortRequest(request_id=rid):
                    outputs += core.abort_request(rid)
                case FinishSequence(request_id=rid, index=index):
                    core.finish_sequence(rid, index)
                case Shutdown():
                    outbox.put(Bye())
                    return
        stepped = core.has_unfinished()
        if stepped:
            try:
                outputs += core.step()
            except Exception:  # shared state (the model step, the KV pool): the engine ends
                context = core.describe_step()
                log.critical("engine step failed; the engine stops. The step:\n%s", context, exc_info=True)
                outbox.put(Failed(f"{traceback.format_exc()}\nthe failed step: {context}"))
                raise
        stats = core.stats()
        if not stepped:
            stats.step_tokens = 0  # no step ran this round (only commands were applied)
        if stepped and not stats.step_tokens and not outputs and not rejected and not commands:
            time.sleep(0.001)  # nothing could be scheduled (should not happen): never spin hot
            if time.monotonic() - last_sent < _HEARTBEAT_S:
                continue  # ...but say now and then that the loop is alive
        outbox.put(StepOutputs(outputs, rejected, stats))
        last_sent = time.monotonic()


# ---------------------------------------------------------------------------------------
# API side


def _stamp_returned(outputs: list[EngineOutput], now: float) -> None:
    """The TTFT breakdown's end of transit out of the engine, stamped as the reader thread gets
    the step (what follows, the event loop and detokenizing, is the API's)."""
    for out in outputs:
        if out.first_token is not None:
            out.first_token.returned = now


class _Pending:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()


class AsyncEngine:
    def __init__(
        self,
        args: EngineArgs,
        inline: bool = False,
        stall_timeout: float | None = None,
        log_setup: tuple[str, str] = ("text", "info"),
    ) -> None:
        self.args = args
        self.inline = inline
        self.log_setup = log_setup
        # Work pending and no engine step for this long: the engine counts as stalled (a hung
        # process is alive but serves nobody). Load and graph capture happen before "ready".
        # None: by device, once the engine says which (a full prefill chunk of the 2B model on
        # a CPU takes tens of seconds; on a GPU a step is milliseconds).
        self.stall_timeout = stall_timeout if stall_timeout is not None else STALL_TIMEOUT_S["cuda"]
        self._stall_timeout_given = stall_timeout is not None
        self._last_progress = time.monotonic()  # last message from the engine loop
        self._busy_since = time.monotonic()  # when work last became pending after none
        self._stall_logged = False
        self._pending: dict[str, _Pending] = {}
        # Sequences the engine still owns (sent, no final output yet), per request: the work the
        # stall check waits on. Not _pending: a client that stops reading keeps its request
        # there long after the engine has finished it and gone idle.
        self._owned: dict[str, set[int]] = {}
        self._ids = itertools.count()
        self._stats = EngineStats()
        self._dead: str | None = None
        self._stopping = False
        self.processor: Processor | None = None
        self.model_config: ModelConfig | None = None
        self._proc: Any = None
        self._reader: threading.Thread | None = None
        # Called with each step's EngineStats from the reader thread (metrics); must be quick.
        self.on_stats: Callable[[EngineStats], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> None:
        """Resolve the model (building the demo if asked), start the engine, wait until ready."""
        from server.model.loader import resolve_model_path

        path = await asyncio.to_thread(resolve_model_path, self.args.model)
        self.model_config = ModelConfig.from_file(path / "config.json")
        self.processor = Processor(path, self.model_config)
        args = EngineArgs(**{**self.args.__dict__, "model": str(path)})
        if self.inline:
            self._inbox: Any = queue.Queue()
            self._outbox: Any = queue.Queue()
            self._proc = threading.Thread(
                target=engine_main, args=(args, self._inbox, self._outbox), daemon=True
            )
        else:
            ctx = mp.get_context("spawn")
            self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
            self._proc = ctx.Process(
                target=engine_main, args=(args, self._inbox, self._outbox, self.log_setup), daemon=True
            )
        self._proc.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = await asyncio.to_thread(self._outbox.get, True, 1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise EngineDeadError("the engine process exited while loading the model") from None
                if time.monotonic() > deadline:
                    raise EngineDeadError("the engine did not become ready in time") from None
                continue
            if isinstance(msg, Failed):
                raise EngineDeadError(f"the engine failed to start: {msg.reason}")
            if isinstance(msg, Ready):
                self._stats = msg.stats
                if not self._stall_timeout_given:
                    self.stall_timeout = STALL_TIMEOUT_S.get(self._stats.device, STALL_TIMEOUT_S["cpu"])
                break
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_outputs, name="engine-reader", daemon=True)
        self._reader.start()

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        self._stopping = True
        with contextlib.suppress(Exception):
            self._inbox.put(Shutdown())
        await asyncio.to_thread(self._proc.join, timeout)
        if not self.inline and self._proc.is_alive():
            self._proc.kill()
        self._fail_all("the engine was shut down")

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._proc is not None and self._proc.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def seconds_since_step(self) -> float:
        """Seconds since the engine last reported a step (or since work arrived, if later);
        0 while the engine owns no work."""
        if not self._owned:
            return 0.0
        return time.monotonic() - max(self._last_progress, self._busy_since)

    @property
    def stalled(self) -> bool:
        """The engine owns work and has not completed a step for stall_timeout seconds (a
        hung or stopped engine process). Clears itself when steps resume."""
        stalled = self.healthy and self.seconds_since_step() > self.stall_timeout
        if stalled != self._stall_logged:
            self._stall_logged = stalled
            if stalled:
                log.error(
                    "the engine made no progress for %.1f s with %d request(s) pending (stall timeout "
                    "%.0f s): /health reports 503", self.seconds_since_step(), len(self._owned),
                    self.stall_timeout,
                )  # fmt: skip
            else:
                log.warning("the engine is making progress again")
        return stalled

    @property
    def pid(self) -> int | None:
        return getattr(self._proc, "pid", None)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # -- reading the engine's outputs (a thread: queue reads block) -----------------------

    def _read_outputs(self) -> None:
        while True:
            try:
                msg = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    if not self._stopping:
                        self._mark_dead("the engine process died")
                    return
                continue
            except (EOFError, OSError):
                self._mark_dead("the engine process connection broke")
                return
            match msg:
                case StepOutputs(outputs=outputs, rejected=rejected, stats=stats):
                    self._last_progress = time.monotonic()
                    _stamp_returned(outputs, self._last_progress)
                    self._stats = stats
                    if self.on_stats is not None:
                        try:
                            self.on_stats(stats)
                        except Exception:  # a metrics bug must not kill the reader
                            log.exception("on_stats hook failed")
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, rejected)
                case Failed(reason=reason):
                    self._mark_dead(f"the engine crashed: {reason}")
                    return
                case Bye():
                    return

    def _mark_dead(self, reason: str) -> None:
        log.error("%s", reason)
        self._dead = reason
        self._loop.call_soon_threadsafe(self._fail_all, reason)

    def _fail_all(self, reason: str) -> None:
        self._owned.clear()
        for p in list(self._pending.values()):
            p.queue.put_nowait(EngineDeadError(reason))

    def _release(self, rid: str, index: int | None = None) -> None:
        """The engine no longer owns sequence `index` of `rid` (all of them: None)."""
        seqs = self._owned.get(rid)
        if seqs is not None:
            if index is None:
                seqs.clear()
            else:
                seqs.discard(index)
            if not seqs:
                del self._owned[rid]

    def _dispatch(self, outputs: list[EngineOutput], rejected: list[tuple[str, str]]) -> None:
        for rid, message in rejected:
            self._release(rid)
            p = self._pending.get(rid)
            if p is not None:
                p.queue.put_nowait(EngineRequestError(message))
        for out in outputs:
            if out.finish_reason is not None:
                self._release(out.request_id, None if out.finish_reason == FinishReason.ERROR else out.index)
            p = self._pending.get(out.request_id)
            if p is not None:
                p.queue.put_nowait(out)

    # -- requests --------------------------------------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000) % 100000000}"

    async def generate(
        self, inputs: PromptInputs, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestDelta]:
        """Stream one request's progress; cancelling the iteration aborts it in the engine."""
        if not self.healthy:
            raise EngineDeadError(self._dead or "the engine is not running")
        assert self.processor is not None
        rid = request_id or self.new_request_id()
        if rid in self._pending:
            raise EngineRequestError(f"request id {rid!r} is already in use")
        pending = _Pending(asyncio.get_running_loop())
        self._pending[rid] = pending
        trackers = [SequenceTracker(self.processor, params, i) for i in range(params.n)]
        req = EngineRequest(rid, inputs.prompt_token_ids, params, inputs.images, self.processor.eos_token_ids)
        finished_cleanly = False
        try:
            if not self._owned:
                self._busy_since = time.monotonic()  # the stall clock starts with the work
            self._owned[rid] = set(range(params.n))
            req.sent_time = time.monotonic()
            self._inbox.put(AddRequest(_wire_pixels(req) if not self.inline else req))
            num_cached = 0
            first_token: FirstTokenTimes | None = None
            while True:
                item = await pending.queue.get()
                batch = [item]
                while not pending.queue.empty():  # coalesce what arrived meanwhile
                    batch.append(pending.queue.get_nowait())
                changed: set[int] = set()
                for out in batch:
                    if isinstance(out, Exception):
                        raise out
                    if out.finish_reason == FinishReason.ERROR:
                        raise EngineRequestFailed(
                            out.error or "the engine failed this request", out.fault or Fault.ENGINE
                        )
                    t = trackers[out.index]
                    if out.num_prompt_tokens and out.index == 0:
                        # the first sibling computes the prompt; the others reuse its blocks,
                        # which is no cache hit of this request's (n=2 reported 592 of 600)
                        num_cached = out.num_cached_tokens
                    if first_token is None and out.first_token is not None:
                        first_token = out.first_token
                        first_token.sent = req.sent_time
                    if t.update(out):
                        self._inbox.put(FinishSequence(rid, out.index))  # stop string: free its blocks
                        self._release(rid, out.index)
                    changed.add(out.index)
                done = all(t.finished for t in trackers)
                deltas = []
                for i in sorted(changed):
                    text, ids, lps = trackers[i].take_delta()
                    deltas.append(
                        SequenceDelta(i, text, ids, lps, trackers[i].finish_reason, trackers[i].stop_reason)
                    )
                yield RequestDelta(
                    rid,
                    deltas,
                    len(inputs.prompt_token_ids),
                    num_cached,
                    done,
                    first_token,
                    [len(t.token_ids) for t in trackers],
                )
                if done:
                    finished_cleanly = True
                    return
        finally:
            self._pending.pop(rid, None)
            if not finished_cleanly and self.healthy:
                self._inbox.put(AbortRequest(rid))  # client went away or an error: free the KV now

    async def abort(self, request_id: str) -> None:
        if self.healthy:
            self._inbox.put(AbortRequest(request_id))
