"""Kernels per decode step, counted on CPU: `python -m server.engine.bench --count-kernels`.

At batch 1 a decode step of the 2B model costs its kernel launches (~1.3-2.5 us each even
replayed from a CUDA graph) as much as its bytes, so the number of kernels is a budget that
tests hold (tests/test_kernel_count.py). It is counted without a GPU:

- every Triton launch is recorded by wrapping the launcher (the interpreter's on CPU);
- every torch op that would launch a device kernel or copy is recorded by a
  TorchDispatchMode, except views and other metadata-only ops (an op whose outputs all
  share an input's storage and that writes nothing), allocations (empty*) and host-side ops.

On CPU every tensor is a host tensor, so "device" is tracked: the model's parameters and
buffers, the KV caches and the decode graphs' static tensors are device tensors, every op
inside the model's forward (the CUDA-graph body) runs on the device, and an op outside it is
a device op when it reads or writes a device tensor (its outputs are then device tensors).
Everything else (lists turned into tensors, the pinned staging buffers) is host work.

One decode step is what the engine runs for `batch` decoding sequences: the static-buffer
decode path of server/engine/cuda_graphs.py (inputs staged and copied up, the graph body,
the logits, the greedy sampler). The model is built with few layers for speed (real 2B
shapes otherwise, the vision tower cut to one block: decode never runs it); the count is
split into one layer's kernels (every layer must count the same) and the constant part,
and scaled to the real depth: constant + depth x per-layer. Plans are chosen as on an
H200 (132 SMs) where a heuristic reads the SM count; the qmatmul tuner's first candidate
is used (the GPU tuner may pick another plan, e.g. dequantize + cuBLAS, two launches).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from kernels import triton_utils
from server.model.qwen3_vl import DecoderLayer, Qwen3VL

from .block_table import BlockTable
from .runner import ModelRunner
from .sampler import SamplingInput, sample_async
from .sampling_params import SamplingParams
from .sequence import ScheduledChunk, SequenceData

H200_SMS = 132
REAL_DEPTH = 28  # decoder layers of Qwen3-VL-2B

# Ops that never launch a kernel although they return a fresh tensor or write metadata.
_NOT_KERNELS = {
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.new_empty_strided",
    "aten.resize_",
    "aten.detach_",
    "aten.set_",
    "aten.lift_fresh",  # torch.tensor(python data): built on the host
    "aten.lift_fresh_copy",
}

LAYER, GRAPH, OUTSIDE = "per layer", "graph, not in a layer", "outside the graph"


@dataclass
class StepCount:
    """Kernels of one decode step by (scope, kind, name); scope is LAYER (summed over the
    built layers), GRAPH (the rest of the graph body) or OUTSIDE."""

    batch: int
    built_layers: int
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    per_layer_each: list[int] = field(default_factory=list)  # every built layer's total

    @property
    def per_layer(self) -> int:
        if len(set(self.per_layer_each)) > 1:
            raise AssertionError(f"decoder layers launch different kernel counts: {self.per_layer_each}")
        return self.per_layer_each[0] if self.per_layer_each else 0

    @property
    def constant(self) -> int:
        return sum(n for (scope, _, _), n in self.counts.items() if scope != LAYER)

    def total(self, depth: int = REAL_DEPTH) -> int:
        return self.constant + depth * self.per_layer

    def rows(self) -> list[tuple[str, str, str, int]]:
        """(scope, kind, name, count), per-layer counts divided by the built layers."""
        out = []
        for (scope, kind, name), n in sorted(self.counts.items()):
            out.append((scope, kind, name, n // self.built_layers if scope == LAYER else n))
        return out


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None


def _tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _writes(func: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class _Counter(TorchDispatchMode):
    """Counts device-kernel torch ops (see the module docstring) into `counts`."""

    def __init__(self, device_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.device: set[int] = {k for t in device_tensors if (k := _storage_key(t)) is not None}
        self.scope = OUTSIDE
        self.in_model = False

    def _is_device(self, t: torch.Tensor) -> bool:
        return _storage_key(t) in self.device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        on_device = self.in_model or any(self._is_device(t) for t in inputs)
        for t in outputs:
            key = _storage_key(t)
            if key is not None:
                (self.device.add if on_device else self.device.discard)(key)
        if not on_device or name in _NOT_KERNELS:
            return out
        in_keys = {_storage_key(t) for t in inputs}
        if not _writes(func) and outputs and all(_storage_key(t) in in_keys for t in outputs):
            return out  # a view or a no-op (.to of the same dtype, .contiguous of a contiguous)
        kind = "torch"
        if name == "aten.copy_" and len(inputs) >= 2 and not self._is_device(inputs[1]):
            kind = "copy to device"
        self.counts[(self.scope, kind, name)] += 1
        return out


@contextlib.contextmanager
def _triton_launches(
    counts: Counter[tuple[str, str, str]], scope_of: _Counter, execute: bool
) -> Iterator[None]:
    """Record every Triton launch (name of the @triton.jit function) in the current scope; the
    launch itself runs with the dispatch mode off (the interpreter's own tensor copies are not
    the model's). execute=False records without running (outputs keep their garbage)."""
    if triton_utils.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as Launcher
    else:
        from triton.runtime.jit import JITFunction as Launcher
    real = Launcher.run

    def run(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        if not warmup:
            counts[(scope_of.scope, "triton", self.fn.__name__)] += 1
            if not execute:
                return None
        with _disable_current_modes():
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    with mock.patch.object(Launcher, "run", run):
        yield


def _layer_hooks(model: Qwen3VL, mode: _Counter, per_layer: list[int]) -> list:
    """Scope the ops of each decoder layer (and of the whole forward) while they run."""
    handles = []

    def enter_model(*_: object) -> None:
        mode.in_model, mode.scope = True, GRAPH

    def leave_model(*_: object) -> None:
        mode.in_model, mode.scope = False, OUTSIDE

    handles.append(model.register_forward_pre_hook(enter_model))
    handles.append(model.register_forward_hook(leave_model))
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        start: list[int] = []

        def pre(*_: object, _start: list[int] = start) -> None:
            mode.scope = LAYER
            _start[:] = [sum(mode.counts.values())]

        def post(*_: object, _start: list[int] = start) -> None:
            per_layer.append(sum(mode.counts.values()) - _start[0])
            mode.scope = GRAPH

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    return handles


def _decode_chunks(batch: int, context: int, block_size: int) -> list[ScheduledChunk]:
    """`batch` sequences, each one generated token past a prompt of context - 1 tokens."""
    prompt = context - 1
    blocks = -(-context // block_size)
    chunks = []
    for b in range(batch):
        data = SequenceData.from_prompt([11] * prompt, [], torch.arange(prompt).expand(3, -1), 0)
        data.append(12)
        table = list(range(b * blocks, (b + 1) * blocks))
        chunks.append(ScheduledChunk(data, prompt, context, table))
    return chunks


def count_decode_step(
    model: Qwen3VL,
    batch: int,
    context: int = 64,
    max_model_len: int = 4096,
    block_size: int = 16,
    execute: bool = True,
) -> StepCount:
    """Kernels of one greedy decode step of `batch` sequences of `context` tokens, on the
    static-buffer decode path (the CUDA-graph body run eagerly) with Triton kernels."""
    model.set_backend("triton")
    blocks = batch * -(-context // block_size)
    runner = ModelRunner(model, num_blocks=blocks, block_size=block_size)
    # As on CUDA: the block table lives on the host, its device mirror is updated by `sync`.
    runner.block_table = BlockTable(1, 1, model.device, mirrored=True)
    with mock.patch("kernels.attention.num_sms", lambda _dev: H200_SMS):
        runner.enable_decode_graphs(max(batch, 1), max_model_len, capture=False)
        graphs = runner.decode_graphs
        assert graphs is not None
        chunks = _decode_chunks(batch, context, block_size)
        rows = [SamplingInput(SamplingParams(temperature=0), c.seq) for c in chunks]
        device_tensors = [*model.parameters(), *model.buffers()]
        device_tensors += [t for kv in runner.kv_caches for t in kv]
        device_tensors += [t for t in vars(graphs).values() if isinstance(t, torch.Tensor)]
        # One step first, not counted, as the engine's warm-up: buffers kept across steps
        # (attention's split tickets) are allocated there, not in every step.
        with torch.inference_mode(), _triton_launches(Counter(), _Counter([]), execute=False):
            runner.run(chunks)
        mode = _Counter(device_tensors)
        result = StepCount(batch, len(model.layers))
        handles = _layer_hooks(model, mode, result.per_layer_each)
        try:
            with torch.inference_mode(), _triton_launches(mode.counts, mode, execute), mode:
                logits = runner.run(chunks)
                sample_async(logits, rows).result()
        finally:
            for h in handles:
                h.remove()
    if graphs.replays != 2:
        raise AssertionError("the decode step did not take the decode-graph path")
    result.counts = mode.counts
    return result


def build_model(layers: int, bits: int = 8, dtype: torch.dtype = torch.bfloat16) -> Qwen3VL:
    """The random real-shape model with `layers` decoder layers and a one-block vision tower."""
    from server.model.synthetic import REAL_2B_CONFIG, random_model

    cfg = copy.deepcopy(REAL_2B_CONFIG)
    cfg["text_config"]["num_hidden_layers"] = layers
    cfg["vision_config"]["depth"] = 1
    cfg["vision_config"]["deepstack_visual_indexes"] = []
    return random_model(cfg, bits=bits, dtype=dtype)


def format_table(count: StepCount, depth: int = REAL_DEPTH) -> str:
    lines = [
        f"kernels of one greedy decode step, batch {count.batch} (counted on a {count.built_layers}-layer "
        f"build of the real 2B shapes; per-layer rows are one layer's)",
        "| scope | kind | kernel | count |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {k} | {n} | {c} |" for s, k, n, c in count.rows()]
    lines.append(
        f"per layer: {count.per_layer}; constant part: {count.constant}; "
        f"scaled to {depth} layers: {count.constant} + {depth} x {count.per_layer}"
    )
    lines.append(f"kernels per decode step: {count.total(depth)} (batch {count.batch}, {depth} layers)")
    return "\n".join(lines)


def main(batch: int, layers: int, execute: bool = True) -> StepCount:
    """The bench's --count-kernels: build, count, print the table."""
    model = build_model(layers)
    count = count_decode_step(model, batch, execute=execute)
    print(format_table(count))
    return count
