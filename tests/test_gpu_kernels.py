"""GPU checks of the Triton kernels at the real model's shapes, in bf16 (``pytest -m gpu``).

Run by scripts/gpu_check.sh on the GPU machine. Every candidate plan of the quantized matmul is
compiled and compared (a config that miscompiles or does not fit this card fails here, instead
of being silently skipped by the tuner), the tuned "auto" path is compared on every real
shape, and CUDA-graph capture of the decode paths is exercised.

GRACE_GPU_TESTS_DRY_RUN=1 runs the same tests on CPU under the Triton interpreter with small
shapes, to check the test code itself without a GPU. Also here (not GPU-marked): a CPU dry run
of ``python -m kernels.bench`` on tiny shapes, and its refusal without a GPU.
"""

from __future__ import annotations

import json
import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kernels
from kernels import QuantizedWeight, attention, bench, norms, reference
from kernels import triton_utils as tu
from kernels.qmatmul_triton import candidates, dequantize
from kernels.qmatmul_triton import qmatmul as triton_qmatmul

DRY_RUN = os.environ.get("GRACE_GPU_TESTS_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
_needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() or (DRY_RUN and tu.INTERPRET)), reason="needs a CUDA GPU"
)


def gpu_test(fn):
    """Marked `gpu` (deselected by default; scripts/gpu_check.sh runs `pytest -m gpu`)."""
    return pytest.mark.gpu(_needs_gpu(fn))


# Real shapes (N, K); the dry run shrinks them (same structure: several groups, N % 64 == 0).
SHAPES = [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144)]
if DRY_RUN:
    SHAPES = [(64, 256), (40, 384)]
M_ALL = [1, 3, 16, 33] if DRY_RUN else [1, 2, 3, 8, 16, 33, 128, 512, 2048]
M_AUTO = [1, 16] if DRY_RUN else [1, 16, 512, 2048]
H_Q, H_KV, D = (4, 2, 32) if DRY_RUN else (16, 8, 128)
BLOCK = 16


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def make_qw(n: int, k: int, bits: int, seed: int) -> QuantizedWeight:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    codes = torch.randint(lo, hi + 1, (n, k), device=DEVICE, generator=gen, dtype=torch.int32)
    scales = torch.rand(n, k // 128, device=DEVICE, generator=gen) * 2e-3 + 1e-4
    return QuantizedWeight.from_codes(codes, scales, bits, 128)


def exact(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ qw.dequantize(torch.float32).t()
    return y if bias is None else y + bias.float()


# ----------------------------------------------------------------------------- qmatmul


@gpu_test
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", M_ALL)
def test_qmatmul_every_candidate_bf16(bits: int, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRACE_KERNELS_TUNE_TOP", raising=False)  # all candidates
    n, k = SHAPES[0]
    qw = make_qw(n, k, bits, seed=bits * 100 + m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    ref = exact(x, qw)
    for plan in candidates(m, n, k, 128):
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        y = triton_qmatmul(x, qw, plan=plan, out=out)
        assert torch.isfinite(y).all(), f"{plan}: unwritten elements"
        assert rel_err(y, ref) < 1e-2, f"{plan}: rel err {rel_err(y, ref):.2e}"


@gpu_test
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_qmatmul_auto_real_shapes(bits: int, n: int, k: int) -> None:
    qw = make_qw(n, k, bits, seed=n + k + bits)
    for m in M_AUTO:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if m == 16 else None
        backend = "triton" if DRY_RUN else "auto"  # auto = Triton on CUDA (tunes on first use)
        y = kernels.qmatmul(x, qw, backend=backend, bias=bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert rel_err(y, exact(x, qw, bias)) < 1e-2, (m, n, k)


@gpu_test
def test_qmatmul_fp16_and_fp32_real_shape() -> None:
    n, k = SHAPES[0]
    qw = make_qw(n, k, 8, seed=5)
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-5)):  # fp32: IEEE dot, no TF32
        for m in (1, 33):
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            assert rel_err(triton_qmatmul(x, qw), exact(x, qw)) < tol, (dtype, m)


@gpu_test
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_bf16_exact(bits: int) -> None:
    qw = make_qw(*SHAPES[0], bits, seed=3)
    assert torch.equal(dequantize(qw, torch.bfloat16), qw.dequantize(torch.bfloat16))


@gpu_test
def test_qmatmul_cuda_graph_decode() -> None:
    if DRY_RUN:
        pytest.skip("CUDA graphs need a GPU")
    n, k = SHAPES[2]
    qw = make_qw(n, k, 8, seed=11)
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(4, n, device="cuda", dtype=torch.bfloat16)
    triton_qmatmul(x, qw, out=out)  # tune and compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        triton_qmatmul(x, qw, out=out)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, exact(x, qw)) < 1e-2


# ----------------------------------------------------------------------------- attention


def make_paged(specs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    nblk = [-(-c // BLOCK) for c, _ in specs]
    num_blocks = sum(nblk) + 2
    k_cache = torch.randn(num_blocks, BLOCK, H_KV, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, H_KV, D, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(specs), max(nblk) + 1, dtype=torch.int32)
    for b, n in enumerate(nblk):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor([q for _, q in specs]).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), H_Q, D, generator=gen).to(dtype)
    seq_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32)
    return [t.to(DEVICE) for t in (query, k_cache, v_cache, tables, seq_lens, qsl)]


DECODE = [(1, 1), (17, 1), (300, 1), (1024, 1), (1500, 1), (64, 1), (129, 1), (777, 1)]
MIXED = [(600, 100), (128, 128), (900, 1), (45, 45), (2000, 37)]
if DRY_RUN:
    DECODE = [(1, 1), (17, 1), (70, 1)]
    MIXED = [(60, 10), (32, 32), (40, 1)]


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("specs", [DECODE, MIXED], ids=["decode", "mixed"])
def test_paged_attention_real_heads(dtype: torch.dtype, specs) -> None:
    args = make_paged(specs, dtype, seed=len(specs))
    ref = reference.paged_attention(*[a.cpu() for a in args], D**-0.5).float()
    plans = [None, attention.AttentionPlan(block_q=8, num_splits=4)]
    for plan in plans:
        out = torch.full_like(args[0], float("nan"))
        y = attention.paged_attention(*args, D**-0.5, plan=plan, out=out)
        assert torch.isfinite(y).all()
        assert rel_err(y.cpu(), ref) < 1e-2, plan


@gpu_test
def test_paged_attention_cuda_graph_decode() -> None:
    if DRY_RUN:
        pytest.skip("CUDA graphs need a GPU")
    args = make_paged(DECODE, torch.bfloat16, seed=2)
    query, kc, vc, tables, seq_lens, qsl = args
    plan = attention.plan_attention(len(DECODE), H_Q, H_KV, D, 1, 1500, query.device)
    out = torch.empty_like(query)

    def step() -> None:
        attention.paged_attention(
            query, kc, vc, tables, seq_lens, qsl, 0.1, max_query_len=1, plan=plan, out=out
        )

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    seq_lens.copy_((seq_lens - 1).clamp_min(1))  # replay sees other contexts via the same buffers
    query.copy_(torch.randn_like(query))
    g.replay()
    torch.cuda.synchronize()
    ref = reference.paged_attention(*[a.cpu() for a in args], 0.1).float()
    assert rel_err(out.cpu(), ref) < 1e-2


@gpu_test
def test_write_kv_cache_bf16_exact() -> None:
    t = 64
    key = torch.randn(t, H_KV, D, device=DEVICE, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(8 * BLOCK, device=DEVICE)[:t]
    slots[::7] = -1
    caches = [torch.zeros(8, BLOCK, H_KV, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
    attention.write_kv_cache(key, value, caches[0], caches[1], slots)
    reference.write_kv_cache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@gpu_test
def test_vision_varlen_attention_bf16() -> None:
    lens = [64, 16, 7] if DRY_RUN else [1024, 256, 77]
    heads, dim = (2, 16) if DRY_RUN else (16, 64)
    t = sum(lens)
    q, k, v = (torch.randn(t, heads, dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    y = attention.varlen_attention(q, k, v, cu)
    ref = reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu())
    assert rel_err(y.cpu(), ref) < 1e-2


@gpu_test
def test_norms_bf16_real_width() -> None:
    hidden = 256 if DRY_RUN else 2048
    x = torch.randn(33, hidden, device=DEVICE, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(torch.bfloat16)
    assert rel_err(norms.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)) < 1e-2
    y, h = norms.add_rms_norm(x, r, w, 1e-6)
    y_ref, h_ref = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, h_ref) and rel_err(y, y_ref) < 1e-2
    gu = torch.randn(33, 2 * 3 * hidden, device=DEVICE, dtype=torch.bfloat16)
    assert rel_err(norms.silu_and_mul(gu), reference.silu_and_mul(gu)) < 1e-2


# ----------------------------------------------------------------------------- the bench, on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_refuses_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not tu.INTERPRET, reason="dry run needs the Triton interpreter")
def test_bench_dry_run_on_cpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section of the bench on tiny CPU shapes with a fake timer: catches bugs in the
    bench code before it costs GPU time."""
    tiny = dict(
        SHAPES=[("tiny", 40, 256)],
        M_QUICK=[1, 20],
        H_Q=4,
        H_KV=2,
        HEAD_DIM=32,
        ATT_BATCH_QUICK=[1, 2],
        ATT_CTX=[40],
        PREFILL_CAP_QUICK=100,
        VISION_CASES=([16, 8],),
        VISION_HEADS=2,
        VISION_DIM=16,
        HIDDEN=64,
        INTERMEDIATE=96,
        NORM_TOKENS=[3],
        COPY_BYTES=1024,
        DEVICE="cpu",
    )
    for name, value in tiny.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "_have_gpu", lambda: True)
    monkeypatch.setattr(bench, "_interpreted", lambda: False)
    monkeypatch.setattr(
        bench, "_device_properties", lambda: types.SimpleNamespace(name="cpu", multi_processor_count=1)
    )
    monkeypatch.setattr(bench, "_time", lambda fn, rep_ms: (fn(), 1.0)[1])
    monkeypatch.setenv("GRACE_KERNELS_TUNE_TOP", "0")  # --quick must not leak a setting into the process
    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["qmatmul"]) == 2 * 2  # bits x M
    assert {r["mode"] for r in data["attention"]} == {"decode", "prefill"}
    assert data["vision"] and len(data["norms"]) == 3 and data["meta"]["copy_gbps"] > 0
    assert all(r["plan"] != "-" and r["kernels"] >= 1 for r in data["qmatmul"])
