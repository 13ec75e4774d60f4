"""Shared plumbing of the Triton kernels: interpreter mode, device checks, a small plan tuner.

Interpreter (no GPU): Triton decides per ``@triton.jit`` *at decoration time* whether a kernel
runs compiled or interpreted, by reading ``TRITON_INTERPRET``. So the variable must be set before
the first ``import kernels`` (``kernels/__init__`` imports the Triton modules). On a CPU-only
torch build nothing but the interpreter can run a Triton kernel, so importing this module sets
``TRITON_INTERPRET=1`` there unless the variable is already set (``TRITON_INTERPRET=0`` opts out).
With a CUDA build and no GPU, set ``TRITON_INTERPRET=1`` yourself before importing ``kernels``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

if torch.version.cuda is None and torch.version.hip is None:  # CPU-only torch: interpreter or nothing
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

from kernels import tuning_cache

__all__ = [
    "INTERPRET",
    "PlanTuner",
    "bench_ms",
    "check_triton_device",
    "next_pow2",
    "num_sms",
    "round_to",
    "to_out",
    "tuning_enabled",
]


@triton.jit
def _probe(x_ptr):  # decorated like every kernel: tells which mode the kernels got
    tl.store(x_ptr, 0)


INTERPRET: bool = type(_probe).__name__ == "InterpretedFunction"
"""True when this process's kernels run in the Triton interpreter (CPU tensors allowed)."""

_FIX_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def to_out(x, ptr):
    """Cast fp32 ``x`` to ``ptr``'s element type, rounding to nearest even. The GPU does that
    already; the interpreter truncates fp32 -> bf16, so there the rounding is done on the bits
    (adding half an ulp with ties to even, then the truncating cast is exact)."""
    # Nested constexpr ifs (not `and`): on the GPU the outer one removes the block entirely.
    if _FIX_BF16:  # noqa: SIM102
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def round_to(x, ptr):
    """fp32 -> ptr's dtype -> fp32: the rounding one torch op in that dtype applies."""
    return to_out(x, ptr).to(tl.float32)


T = TypeVar("T")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Refuse tensors the kernels cannot run on, with a message that says what to do."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"Triton kernel inputs on different devices: {dev} and {t.device}")
    if dev.type == "cuda" or INTERPRET:
        return
    raise RuntimeError(
        f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before `import kernels` "
        f"to run on {dev.type} tensors in the interpreter (got {dev.type} tensors with compiled kernels)"
    )


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number; only shapes the split heuristics
    return torch.cuda.get_device_properties(device).multi_processor_count


def tuning_enabled(device: torch.device) -> bool:
    """Time candidate plans only on a real GPU, and not when GRACE_KERNELS_AUTOTUNE=0."""
    return device.type == "cuda" and not INTERPRET and os.environ.get("GRACE_KERNELS_AUTOTUNE", "1") != "0"


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` on the GPU, launched from a CUDA graph so that Python launch overhead
    (tens of microseconds per Triton launch) does not drown microsecond kernels; plain do_bench
    if the graph capture fails."""
    return bench_ms(fn, rep_ms=10)


def bench_ms(fn: Callable[[], object], rep_ms: int = 20, cuda_graph: bool = True) -> float:
    """Median milliseconds per call of ``fn`` (GPU only). With ``cuda_graph``, calls are replayed
    from a CUDA graph, which is how decode runs in the server and removes Python launch
    overhead; falls back to ``triton.testing.do_bench`` if ``fn`` cannot be captured."""
    if cuda_graph:
        try:
            # Capture needs a side stream, and that stream must wait for the work already queued on
            # the caller's (a new stream only syncs with the legacy default stream): else a tuning
            # launch could overwrite a scratch buffer (qmatmul's dequant) a queued matmul still reads.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ms = float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
            torch.cuda.current_stream().wait_stream(side)  # and later work waits for the timing's
            return ms
        except Exception:  # capture failed (e.g. a path that syncs): eager timing still ranks
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


class PlanTuner:
    """Picks the fastest of a few candidate launch plans per key, once, and remembers it.

    Under the interpreter, with tuning disabled, or while a CUDA graph is being captured, the first
    candidate is used (so order candidates best-guess first). Candidates that fail to compile or
    run (e.g. too much shared memory on this card) are skipped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.best: dict[Hashable, object] = {}
        self.timings: dict[Hashable, list[tuple[object, float]]] = {}
        self.persisted = False  # persist() was called (whether or not a file is used)
        self._store: Path | None = None

    def persist(self, path: Path | None, plan_type: type, device: torch.device) -> None:
        """Take the plans an earlier process chose (kernels/tuning_cache.py) and save every
        new choice to `path` (None: keep them in memory only)."""
        self.persisted = True
        if path is None:
            return
        for key, plan in tuning_cache.load(path, plan_type, device).items():
            self.best.setdefault(key, plan)
        self._store = path

    def choose(
        self,
        key: Hashable,
        candidates: Sequence[T],
        launch: Callable[[T], object],
        device: torch.device,
    ) -> T:
        hit = self.best.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        if len(candidates) == 1 or not tuning_enabled(device):
            return candidates[0]
        if torch.cuda.is_current_stream_capturing():
            return candidates[0]  # never time inside a capture; do not cache the guess either
        results: list[tuple[object, float]] = []
        for cand in candidates:
            try:
                ms = _time_ms(lambda c=cand: launch(c))
            except Exception:  # a config this card cannot run
                ms = math.inf
            results.append((cand, ms))
        best = min(results, key=lambda r: r[1])[0]
        if math.isinf(min(r[1] for r in results)):
            raise RuntimeError(f"{self.name}: no candidate plan ran for key {key}")
        self.best[key] = best
        self.timings[key] = results
        if self._store is not None:
            tuning_cache.save(self._store, self.best)
        return best  # type: ignore[return-value]

    def clear(self) -> None:
        self.best.clear()
        self.timings.clear()
