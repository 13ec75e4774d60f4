"""Triton W8/W4 group-quantized matmul (kernels/qmatmul_triton.py) against kernels.reference.

Runs on CPU under the Triton interpreter (small shapes that hit the edges: M in {1, 3, 16, 33},
N not a multiple of any block, K spanning an odd number of groups, K not a multiple of 128) and,
unchanged, on a GPU when one is present. Every launch writes into a NaN-poisoned buffer, so an
element the kernel forgets to write fails the comparison.

Interpreter: TRITON_INTERPRET must be set before `kernels` is first imported (Triton reads it
when the kernels are decorated). kernels/triton_utils.py sets it on CPU-only torch builds; the
line below does the same for this module run alone. On a CUDA build without a GPU, export
TRITON_INTERPRET=1 before running pytest.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kernels
from kernels import QuantizedWeight, qmatmul_triton, reference
from kernels import triton_utils as tu
from kernels.qmatmul_triton import GEMV_MAX_M, Plan, candidates, dequantize, m_bucket, run_plan
from kernels.qmatmul_triton import qmatmul as triton_qmatmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
QRANGE = {8: (-128, 127), 4: (-8, 7)}


def make_weight(n: int, k: int, bits: int, seed: int, group: int = 128) -> QuantizedWeight:
    """Random full-range codes (so -128 / -8 are hit) and scales spanning two decades."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = QRANGE[bits]
    g = group if k % group == 0 else k
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=gen, dtype=torch.int32)
    scales = torch.exp(torch.empty(n, k // g).uniform_(-6.0, -1.5, generator=gen))
    return QuantizedWeight.from_codes(codes, scales, bits, group_size=group).to(DEVICE)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def check(
    y: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, kind: str = "?"
) -> None:
    """Every element written and finite; close to the fp64 product; bf16 also really computed in fp32."""
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} elements unwritten or non-finite"
    exact = x.double() @ qw.dequantize(torch.float64).t()
    if bias is not None:
        exact = exact + bias.double()
    err = rel_err(y, exact)
    assert err < TOL[x.dtype], f"rel err {err:.2e}"
    if x.dtype == torch.bfloat16 and tu.INTERPRET and kind in ("gemv", "gemm"):
        # The interpreter's bf16 arithmetic is wrong: the kernels must widen to fp32 at once. Then
        # the result is the fp32 product rounded once, like the reference's, so almost every
        # element matches it bit for bit (a bf16 computation would miss on most of them). Not for
        # "dequant", whose bf16 weights and matmul are torch's (and rounded: close, not equal).
        same = (y == reference.qmatmul(x, qw, bias=bias)).float().mean().item()
        assert same > 0.9, f"only {same:.0%} of bf16 results match the fp32-computed reference"


def forced_plans(m: int) -> list[Plan]:
    """Every kernel and launch variant for this M (gemv only runs M <= 8), most of which the
    dispatcher would not pick for these shapes."""
    gemv = [
        Plan("gemv", block_n=16, block_k=128),
        Plan("gemv", block_n=8, block_k=64, split_k=2),
        Plan("gemv", block_n=4, block_k=512),  # a K step spanning several groups (and past K)
    ]
    return [
        *(gemv if m <= GEMV_MAX_M else []),
        Plan("gemm", block_m=16, block_n=32, block_k=128),
        Plan("gemm", block_m=32, block_n=16, block_k=64, split_k=3),
        Plan("dequant"),
    ]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_every_plan_matches_reference(bits: int, dtype: torch.dtype, m: int) -> None:
    # N = 40: not a multiple of 16/32; K = 384: three groups (odd count), several K steps.
    n, k = 40, 384
    seed = 1000 * bits + 10 * m + {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    qw = make_weight(n, k, bits, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if m % 2 else None
    plans = forced_plans(m) + candidates(m, n, k, qw.group_size)[:1]
    if m <= GEMV_MAX_M:  # the GPU's decode plans (the interpreter's first candidate is its own)
        plans += qmatmul_triton._gemv_plans(m_bucket(m), n, k, bits)
    for plan in plans:
        out = poisoned((m, n), dtype)
        y = triton_qmatmul(x, qw, bias=bias, plan=plan, out=out)
        assert y.data_ptr() == out.data_ptr()
        check(y, x, qw, bias, plan.kind)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("n", "k", "group"),
    [
        (5, 200, 128),  # K % 128 != 0: one group per row, K not a multiple of BLOCK_K
        (24, 130, 128),  # odd K/2 for 4-bit bytes, tail of 2 columns
        (33, 320, 64),  # group 64: five groups, BLOCK_K must shrink to 64
        (17, 3 * 128, 128),
    ],
)
def test_edge_shapes(bits: int, n: int, k: int, group: int) -> None:
    qw = make_weight(n, k, bits, seed=n + k, group=group)
    gen = torch.Generator().manual_seed(k)
    for m in (1, 5, 20):
        x = torch.randn(m, k, generator=gen).to(DEVICE)
        for plan in [*forced_plans(m), *candidates(m, n, k, qw.group_size)[:1]]:
            y = triton_qmatmul(x, qw, plan=plan, out=poisoned((m, n), torch.float32))
            check(y, x, qw, None, plan.kind)


def test_batched_noncontiguous_and_dispatch() -> None:
    qw = make_weight(48, 256, 4, seed=7)
    base = torch.randn(2, 5, 512, device=DEVICE)
    x = base[..., ::2]  # last stride 2: the wrapper must make rows contiguous
    y = kernels.qmatmul(x, qw, backend="triton")
    assert y.shape == (2, 5, 48)
    check(y.reshape(10, 48), x.reshape(10, 256), qw, None)
    # "auto" is Triton on CUDA and the reference on CPU (bit-identical there).
    auto = kernels.qmatmul(x, qw, backend="auto")
    if DEVICE == "cpu":
        assert torch.equal(auto, reference.qmatmul(x, qw))
    else:
        check(auto.reshape(10, 48), x.reshape(10, 256), qw, None)
    with pytest.raises(ValueError, match="supports"):
        kernels.qmatmul(x.double(), qw, backend="triton")
    with pytest.raises(ValueError, match="cannot run"):
        triton_qmatmul(torch.randn(9, 256, device=DEVICE), qw, plan=Plan("gemv"))
    with pytest.raises(ValueError, match="unknown qmatmul backend"):
        kernels.qmatmul(x, qw, backend="tritonn")
    empty = kernels.qmatmul(torch.randn(0, 256, device=DEVICE), qw, backend="triton")
    assert empty.shape == (0, 48)


def test_awq_checkpoint_layout() -> None:
    # An AWQ-packed weight converted at load runs through the same kernels.
    qw = make_weight(32, 256, 4, seed=3).to("cpu")
    back = QuantizedWeight.from_awq(*qw.to_awq()).to(DEVICE)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.float16)
    check(triton_qmatmul(x, back, out=poisoned((3, 32), torch.float16)), x, back, None)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_kernel_exact(bits: int, dtype: torch.dtype) -> None:
    qw = make_weight(40, 384, bits, seed=bits)
    w = dequantize(qw, dtype, out=poisoned((40, 384), dtype))
    assert torch.equal(w, qw.dequantize(dtype))  # codes * scale in fp32, rounded once


def test_run_plan_allocating_its_output() -> None:
    qw = make_weight(40, 384, 8, seed=9)
    x = torch.randn(4, 384, device=DEVICE, dtype=torch.float16)
    for plan in (Plan("gemv", block_m=4, block_n=16, block_k=128, split_k=3), Plan("dequant")):
        check(run_plan(plan, x, qw), x, qw, None, plan.kind)


@pytest.mark.parametrize("interpret", [False, True])
def test_candidates_are_valid(interpret: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU's candidate lists, and the interpreter's (one wide tile first: it pays per op).
    monkeypatch.setattr(qmatmul_triton, "INTERPRET", interpret)
    for m in (1, 2, 3, 8, 9, 16, 33, 100, 256, 512, 2048, 8192, 20000):
        for n, k, g in ((4096, 2048, 128), (2048, 6144, 128), (40, 200, 200), (64, 320, 64)):
            cands = candidates(m, n, k, g)
            assert cands, (m, n, k, g)
            first = cands[0].kind
            want = "gemv" if m <= 8 else "dequant" if m >= 2048 and not interpret else "gemm"
            assert first == want, (m, first)
            assert interpret or qmatmul_triton.untuned_kind(m) == want, m
            for p in cands:
                if p.kind != "dequant":
                    assert p.block_k >= 16 and 1 <= p.split_k <= math.ceil(k / p.block_k), p
                if p.kind == "gemv":  # a K step is whole sub-blocks, each inside one group
                    gk = qmatmul_triton._group_k(p.block_k, k, g)
                    assert p.block_k % gk == 0 and (k // g == 1 or g % gk == 0), p
                    assert p.block_m == m_bucket(m) and m <= 8
                if p.kind == "gemm":  # a K step inside one group
                    assert k // g == 1 or g % p.block_k == 0, p
                if p.kind == "gemm":
                    assert min(p.block_m, p.block_n, p.block_k) >= 16
    assert len(candidates(16, 4096, 2048, 128)) > 1  # something to tune on a GPU


def test_plan_tuner_picks_fastest_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = tu.PlanTuner("t")
    dev = torch.device("cpu")
    assert tuner.choose("k", ["a", "b"], lambda c: None, dev) == "a"  # not tuning here: first
    assert "k" not in tuner.best
    monkeypatch.setattr(tu, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls: list[str] = []

    def fake_time(fn):
        fn()
        return times[calls[-1]]

    def launch(c: str) -> None:
        calls.append(c)
        if c == "boom":
            raise RuntimeError("out of shared memory")

    monkeypatch.setattr(tu, "_time_ms", fake_time)
    assert tuner.choose("k", ["a", "boom", "b", "c"], launch, dev) == "b"
    n_calls = len(calls)
    assert tuner.choose("k", ["a", "b", "c"], launch, dev) == "b" and len(calls) == n_calls  # cached
    with pytest.raises(RuntimeError, match="no candidate"):
        tuner.choose("k2", ["boom", "boom"], launch, dev)


def test_timing_stream_waits_for_queued_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tuner times on a side stream. It must wait for the caller's queued work first (a queued
    # cuBLAS call may still read the dequant scratch buffer the timed launches overwrite), and the
    # caller's stream must wait for the timing launches after.
    events: list[str] = []

    class FakeStream:
        def __init__(self, name: str = "side") -> None:
            self.name = name

        def wait_stream(self, other: FakeStream) -> None:
            events.append(f"{self.name} waits {other.name}")

    caller = FakeStream("caller")
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: caller)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    def fake_bench(fn, rep, return_mode):
        events.append("timed")
        return 2.5

    monkeypatch.setattr(tu.triton.testing, "do_bench_cudagraph", fake_bench)
    assert tu.bench_ms(lambda: None) == 2.5
    assert events == ["side waits caller", "timed", "caller waits side"]
