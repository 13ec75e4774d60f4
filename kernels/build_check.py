"""Compile every Triton variant the dispatchers can launch at the real 2B shapes for sm_90,
ahead of time and without a GPU; fail on a compile error, a register spill, or shared memory
over the H100/H200 limit.

    python -m kernels.build_check [--dtypes bf16,fp16] [--only REGEX] [--json PATH]

Discovery: every module of the ``kernels`` package is imported; its ``@triton.jit`` functions
named ``*_kernel`` are the launchable kernels (helpers called from kernels are not launched).
A module lists what its dispatcher can launch by defining::

    def aot_launches(dims: ModelDims, dtype: torch.dtype) -> Iterable[Launch]

built from its own plan lists and launch code on ``meta`` tensors (no memory, no GPU), so a
new plan or kernel is covered with no second list here. A launchable kernel that no module
lists is reported as uncovered and fails the check.

Each launch is specialized the way ``JITFunction.run`` would specialize it on the GPU (same
binder: divisibility-16 and ==1 integer keys, pointer alignment, ``do_not_specialize``),
identical specializations are compiled once, in a process pool. Spills and registers come from
Triton's bundled ptxas (``-v``) on the generated PTX; shared memory from the compiled metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import import_module
from types import ModuleType
from typing import Any
from unittest import mock

import torch

SM = 90
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90 (H100 / H200)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelDims:
    """The real Qwen3-VL-2B shapes (tests/test_build_check.py checks them against
    server/model/synthetic.py's REAL_2B_CONFIG and the engine's defaults: kernels/ never
    imports server/)."""

    hidden: int = 2048
    intermediate: int = 6144
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    group_size: int = 128
    block_size: int = 16  # the KV-cache block, server/engine/args.py's default
    vision_hidden: int = 1024
    vision_heads: int = 16

    def decoder_linears(self) -> list[tuple[str, int, int]]:
        """(name, N, K) of the fused decoder linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [
            ("qkv", q + 2 * kv, self.hidden),
            ("o", self.hidden, q),
            ("gate_up", 2 * self.intermediate, self.hidden),
            ("down", self.hidden, self.intermediate),
        ]


@dataclass
class Launch:
    """One launch a dispatcher can make: the kernel and the arguments it would pass."""

    label: str
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Result:
    label: str
    kernel: str
    error: str | None = None
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    wide_loads: int = 0  # 128-bit global reads in the PTX (ld.global.v4, 16-byte cp.async)
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 0


def kernel_modules() -> list[ModuleType]:
    import kernels

    names = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__) if m.name != "build_check")
    return [import_module(f"kernels.{n}") for n in names]


def launchable_kernels(mod: ModuleType) -> dict[str, Any]:
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__
    }


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", SM, 32)


def specialize(launch: Launch, backend: Any) -> tuple:
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, options


def specialization_key(launch: Launch) -> str:
    """What decides whether two launches share one sm_90 binary."""
    from triton.compiler import make_backend

    return _job_key(
        launch.kernel.fn.__module__, launch.kernel.fn.__name__, specialize(launch, make_backend(_target()))
    )


@contextlib.contextmanager
def record_specializations(tag: Callable[[], str] = lambda: "") -> Iterator[dict[str, set[str]]]:
    """While active, every Triton launch (compiled or in the interpreter) adds its sm_90
    specialization key to the yielded dict, with the tags (``tag()`` at launch time) of the
    launches that made it: the binaries a GPU would have compiled for what ran. The engine's
    warm-up must make every key traffic can."""
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    backend = make_backend(_target())
    seen: dict[str, set[str]] = {}
    twins: dict[int, JITFunction] = {}  # an interpreted kernel's JITFunction, to bind as run would

    def recording(real: Any) -> Any:
        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup:
                jit = self
                if not isinstance(self, JITFunction):
                    jit = twins.get(id(self)) or twins.setdefault(
                        id(self), JITFunction(self.fn, **self.kwargs)
                    )
                spec = specialize(Launch("", jit, args, kwargs), backend)
                seen.setdefault(_job_key(self.fn.__module__, self.fn.__name__, spec), set()).add(tag())
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    with (
        mock.patch.object(JITFunction, "run", recording(JITFunction.run)),
        mock.patch.object(InterpretedFunction, "run", recording(InterpretedFunction.run)),
    ):
        yield seen


def _job_key(mod: str, name: str, spec: tuple) -> str:
    signature, constexprs, attrs, options = spec
    return repr(
        (mod, name, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()), options)
    )


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# 128-bit global reads: vector loads, or the 16-byte cp.async copies software pipelining uses
_WIDE_LOAD = re.compile(
    r"\bld\.global(?:\.[a-z0-9]+)*\.v4\.|\bcp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(?:16|0x10)\b"
)


def _ptxas_stats(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of the PTX's kernel from Triton's own ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [get_ptxas(SM).path, "-v", "--gpu-name", arch.group(1) if arch else "sm_90a", src, "-o", cubin]
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs = max((int(r) for r in _PTXAS_REGS.findall(log)), default=0)
    spill = sum(int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log))
    return regs, spill


def _compile(job: tuple) -> Result:
    import triton
    from triton.compiler import ASTSource

    label, mod, name, signature, constexprs, attrs, options = job
    kernel = getattr(import_module(mod), name)
    res = Result(label, f"{mod.removeprefix('kernels.')}.{name}", num_warps=options.get("num_warps", 0))
    res.constexprs = {kernel.arg_names[k[0]]: v for k, v in constexprs.items() if isinstance(v, (int, bool))}
    try:
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=_target(), options=options
        )
        ptx = compiled.asm["ptx"]
        res.registers, res.spill_bytes = _ptxas_stats(ptx)
        res.shared = int(compiled.metadata.shared)
        res.wide_loads = len(_WIDE_LOAD.findall(ptx))
    except Exception as exc:  # reported, counted as a failure
        res.error = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
    return res


def collect(dtypes: Iterable[torch.dtype], only: str | None = None) -> tuple[list[tuple], int, list[str]]:
    """(unique compile jobs, launches seen, uncovered kernels) over every kernels module."""
    from triton.compiler import make_backend

    backend = make_backend(_target())
    dims = ModelDims()
    jobs: dict[str, tuple] = {}
    seen = 0
    covered: set[str] = set()
    kernels_found: set[str] = set()
    pattern = re.compile(only) if only else None
    for mod in kernel_modules():
        found = launchable_kernels(mod)
        kernels_found |= {f"{mod.__name__}.{n}" for n in found}
        if not hasattr(mod, "aot_launches"):
            continue
        for dtype in dtypes:
            for launch in mod.aot_launches(dims, dtype):
                name = launch.kernel.fn.__name__
                covered.add(f"{mod.__name__}.{name}")
                label = f"{name} {str(dtype).removeprefix('torch.')} {launch.label}"
                if pattern is not None and not pattern.search(label):
                    continue
                seen += 1
                spec = specialize(launch, backend)
                key = _job_key(mod.__name__, name, spec)
                signature, constexprs, attrs, options = spec
                jobs.setdefault(
                    key, (label, mod.__name__, name, signature, constexprs, attrs, options.__dict__)
                )
    return list(jobs.values()), seen, sorted(kernels_found - covered)


def run(
    dtypes: Iterable[torch.dtype], only: str | None = None, workers: int = 2
) -> tuple[list[Result], int, list[str]]:
    jobs, seen, uncovered = collect(dtypes, only)
    # fork: the workers inherit the imported kernels (and TRITON_INTERPRET=0) as they are
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile, jobs, chunksize=1))
    return results, seen, uncovered


def _report(results: list[Result], seen: int, uncovered: list[str], seconds: float) -> int:
    by_kernel: dict[str, list[Result]] = {}
    for r in results:
        by_kernel.setdefault(r.kernel, []).append(r)
    print(f"{'kernel':32} {'variants':>8} {'failed':>6} {'spill':>5} {'max regs':>8} {'max smem KB':>11}")
    for name, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if r.error is None]
        print(
            f"{name:32} {len(rs):8d} {len(rs) - len(ok):6d} {sum(r.spill_bytes > 0 for r in ok):5d} "
            f"{max((r.registers for r in ok), default=0):8d} {max((r.shared for r in ok), default=0) / 1024:11.1f}"
        )
    failed = [r for r in results if r.error is not None]
    spilled = [r for r in results if r.error is None and r.spill_bytes > 0]
    big = [r for r in results if r.error is None and r.shared > SMEM_LIMIT]
    for r in failed:
        print(f"FAILED {r.label}: {r.error}")
    for r in spilled:
        print(f"SPILL {r.label}: {r.spill_bytes} B spilled, {r.registers} registers")
    for r in big:
        print(f"SHARED MEMORY {r.label}: {r.shared} B > {SMEM_LIMIT} B")
    for name in uncovered:
        print(f"UNCOVERED {name}: no aot_launches() in its module lists it")
    print(f"({seen} launches, {len(results)} distinct specializations, {seconds:.0f} s)")
    print(f"{len(results)} variants compiled for sm_{SM}: {len(failed)} failed, {len(spilled)} spill")
    return 1 if failed or spilled or big or uncovered else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.build_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16")
    ap.add_argument("--only", help="regex on 'kernel dtype label': compile a subset (uncovered not checked)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write every variant's result here")
    args = ap.parse_args(argv)
    from kernels.triton_utils import INTERPRET

    if INTERPRET:  # CPU-only torch defaults to the interpreter; compiling needs real JITFunctions
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call(
            [sys.executable, "-m", "kernels.build_check", *(argv or sys.argv[1:])], env=env
        )
    t0 = time.perf_counter()
    results, seen, uncovered = run([DTYPES[d] for d in args.dtypes.split(",")], args.only, args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    return _report(results, seen, [] if args.only else uncovered, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
