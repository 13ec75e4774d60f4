"""W8A16 / W4A16 group-quantized matmul in Triton: ``y = x @ W^T (+ bias)``.

``W [N, K] = code[n, k] * scales[n, k // G]`` (symmetric, no zero point; see
:class:`kernels.quant.QuantizedWeight`), read in QuantizedWeight's layout as stored (see
``_load_codes``). x is fp16 / bf16 (fp32 for tests and CPU models); accumulation is always fp32.
Three kernel kinds, each explained at its kernel: ``gemv`` (decode), ``gemm`` (tl.dot tiles),
``dequant`` (dequantize, then cuBLAS). :func:`untuned_kind` is the rule that picks one by M when
nothing is timed; :data:`tuner` times the curated :func:`candidates` on a GPU. Reached through
``kernels.qmatmul(..., backend=...)`` (kernels/quant.py), or directly as :func:`qmatmul`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.triton_utils import INTERPRET, PlanTuner, check_triton_device, next_pow2, to_out, tuning_enabled

import triton  # isort: skip  (kernels.triton_utils sets the interpreter default first)
import triton.language as tl  # isort: skip

from kernels import tuning_cache
from kernels.quant import QuantizedWeight

__all__ = [
    "SUPPORTED_DTYPES",
    "Plan",
    "candidates",
    "clear_buffers",
    "launch_spec",
    "qmatmul",
    "reserve_dequant_buffer",
    "run_plan",
    "tuner",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_codes(
    w_ptr,
    offs_n,
    k0,
    N,
    K,
    stride_wn,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Signed codes of ``W[offs_n, k0 : k0 + BLOCK_K]`` as an integer tile [BLOCK_N, BLOCK_K]
    (0 outside W).

    QuantizedWeight's layout is read as stored (no repacking, no second copy in memory): rows
    are K-contiguous, so the tile is BLOCK_N runs of BLOCK_K bytes (8-bit) or BLOCK_K/2 bytes
    (4-bit, low nibble = even k), coalesced and vectorizable as is. The 4-bit tile is unpacked
    into even/odd codes and re-interleaved in registers."""
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = offs_n[:, None] < N
        if not EVEN_K:
            mask = mask & (offs_k[None, :] < K)
        codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
    else:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = offs_n[:, None] < N
        if not EVEN_K:
            mask = mask & (offs_b[None, :] < K // 2)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0)
        b = b.to(tl.int32)  # uint8 -> zero-extended
        lo = ((b & 0xF) ^ 8) - 8  # sign-extend the two's-complement nibbles
        hi = ((b >> 4) ^ 8) - 8
        codes = tl.interleave(lo, hi)  # low nibble = even k, high = odd k
    return codes


# Per-request integers (M, and the K-loop bounds that follow a plan) are not specialized: a new
# M would otherwise compile a new binary mid-traffic (M = 1, or divisible by 16, are keys).
_PER_CALL_INTS = ["M", "n_iters", "per_split"]


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    n_iters,
    per_split,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """M <= GEMV_MAX_M (decode): CUDA-core dot products; program (n-block, k-split) streams
    BLOCK_N rows of W once for all M rows of x and computes y[:, n-block] over K steps
    [pid_k * per_split, min(n_iters, (pid_k + 1) * per_split)).

    Decode is weight-bandwidth bound, so the only goal is to keep enough bytes in flight (plans:
    ``_gemv_plans``): a K step spans many groups, loaded with 16-byte cp.async copies and
    software-pipelined through shared memory (``tl.range(num_stages=...)``); optional split-K
    (fp32 atomics). A step is BLOCK_K // GROUP_K sub-blocks of GROUP_K columns, each inside one
    group, so it reads one vector of scales per row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // GROUP_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    it_start = pid_k * per_split
    it_end = tl.minimum(it_start + per_split, n_iters)

    # BLOCK_M == 1 (decode): elementwise accumulation in the weight tile's own (vectorized)
    # layout, one reduction after the loop. BLOCK_M > 1: one K-reduction per row per step, still
    # in that layout (a 3-D [M, N, K] product would force a shared-memory layout change per step).
    acc3 = tl.zeros([BLOCK_N, BLOCK_K // GROUP_K, GROUP_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in tl.range(it_start, it_end, num_stages=NUM_STAGES):
        k0 = it * BLOCK_K
        w = _load_codes(w_ptr, offs_n, k0, N, K, stride_wn, BITS, BLOCK_K, EVEN_K).to(tl.float32)
        sub_k = k0 + offs_j * GROUP_K  # first column of each sub-block
        s_mask = n_mask[:, None] & (sub_k < K)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (sub_k // G)[None, :], mask=s_mask, other=0.0)
        w3 = tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP_K, GROUP_K)) * s.to(tl.float32)[:, :, None]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if BLOCK_M == 1:
            # bf16 is loaded and widened at once (the interpreter cannot do bf16 arithmetic).
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            acc3 += w3 * tl.reshape(x, (1, BLOCK_K // GROUP_K, GROUP_K))
        else:
            for mm in tl.static_range(BLOCK_M):
                row = tl.minimum(M - 1, mm)  # rows past M re-read row M-1; never stored
                x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(w3 * tl.reshape(x, (1, BLOCK_K // GROUP_K, GROUP_K)), axis=2), axis=1)
                acc += tl.where(offs_m[:, None] == mm, part[None, :], 0.0)
    if BLOCK_M == 1:
        acc += tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]

    if HAS_BIAS:  # only the first K split adds the bias
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, to_out(acc, y_ptr), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)  # fp32 workspace


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    n_iters,
    per_split,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tiled tl.dot GEMM with grouped ordering; a K step stays inside one group (BLOCK_K divides
    G). Small M tiles: codes are converted to the activation dtype exactly (|code| <= 128 fits
    fp16/bf16) and the group scale multiplies each step's [BM, BN] partial product. Large M tiles
    (PRESCALE: BM >= BK, bf16): the [BN, BK] weights are scaled before the dot instead (fewer
    products, and the MMA accumulates in place, which saves a tile of registers)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_M row-tiles share each weight column-tile while it is in L2.
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    it_start = pid_k * per_split
    it_end = tl.minimum(it_start + per_split, n_iters)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(it_start, it_end):
        k0 = it * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None]
        if not EVEN_K:
            x_mask = x_mask & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        codes = _load_codes(w_ptr, offs_n, k0, N, K, stride_wn, BITS, BLOCK_K, EVEN_K)
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // G, mask=n_mask, other=0.0).to(tl.float32)
        if DOT_FP32:  # fp32 activations, or bf16 in the interpreter (its bf16 dot is wrong)
            w = codes.to(tl.float32) * s[:, None]
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        elif PRESCALE:  # W * s is rounded to bf16 like a bf16 weight
            w = (codes.to(tl.float32) * s[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        else:  # codes are exact in fp16/bf16: integer-exact products, scaled in fp32
            part = tl.dot(x, tl.trans(codes.to(x.dtype)))
            acc += part * s[None, :]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, to_out(acc, y_ptr), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    G,
    stride_wn,
    stride_sn,
    stride_on,
    BITS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[n, k] = code[n, k] * scales[n, k // G]`` in out's dtype (any G: per-element scale
    index). The ``dequant`` plan (large M, prefill) runs it into a reused activation-dtype buffer,
    then cuBLAS: compute bound, so the one extra pass over W (~1x its bf16 size) is amortized
    over M."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    codes = _load_codes(w_ptr, offs_n, k0, N, K, stride_wn, BITS, BLOCK_K, EVEN_K).to(tl.float32)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs_k // G)[None, :], mask=mask, other=0.0)
    w = codes * s.to(tl.float32)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], to_out(w, out_ptr), mask=mask)


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """One way to launch the matmul: kernel kind and its tile/launch parameters."""

    kind: str  # "gemv" | "gemm" | "dequant"
    block_m: int = 1
    block_n: int = 16
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    @property
    def launches(self) -> int:
        """GPU kernels per call (split-K adds a zero-fill and a cast; dequant adds cuBLAS)."""
        if self.kind == "dequant":
            return 2
        return 1 if self.split_k == 1 else 3


# GEMV (decode): weight-bandwidth bound, so a plan is judged by the bytes it keeps in flight
# per SM (Little's law: ~4.3 TB/s x ~0.7 us of DRAM latency / 132 SMs ~ 23 KB per SM on an
# H200; docs/BENCHMARKS.md has the per-shape table). A K step reads 2 KB of each of its rows
# (16 to 32 groups, 16-byte loads), and a program holds at most GEMV_TILE_CODES codes per step
# (64 per thread at 4 warps: registers), so small-N layers still launch 4+ programs per SM.
GEMV_TILE_CODES = 8192
_SMS = 132  # H200 / H100 SXM; only shapes the plan, never its validity


def _gemv_plans(bm: int, n: int, k: int, bits: int) -> list[Plan]:
    """Decode plans, best guess first: the rule's plan, then alternatives for the tuner."""
    bk = min(next_pow2(k), 16384 // bits)  # 2 KB of a row per step: 2048 W8 / 4096 W4 codes
    bn = max(1, min(GEMV_TILE_CODES // bk, next_pow2(n) // _SMS))
    warps = 4 if bm <= 2 else 8  # M-fold arithmetic per weight byte: more threads share it
    # W4 tiles hold half the bytes: keep two in flight (not at M > 2: x's rows fill shared memory)
    stages = 3 if bits == 4 and bm <= 2 else 2
    best = Plan("gemv", bm, bn, bk, 1, warps, stages)
    few_programs = -(-n // bn) < 4 * _SMS
    plans = [best, replace(best, split_k=2) if few_programs else replace(best, block_n=2 * bn, num_warps=8)]
    if bm <= 2:  # (at M = 8, a W4 step of 8192 codes spilled under triton 3.6: kernels.build_check)
        plans.append(replace(best, block_n=max(1, bn // 2), block_k=2 * bk))
    plans.append(Plan("gemv", bm, 16, 1024 // bits, 1, warps, 3))  # wave 1's tile (W4: 16-byte loads)
    return plans


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) per M bucket (next pow2, capped).
_GEMM_CONFIGS: dict[int, list[tuple[int, int, int, int, int, int]]] = {
    16: [
        (16, 32, 128, 4, 4, 1),
        (16, 64, 128, 4, 4, 1),
        (16, 32, 128, 4, 4, 2),
        (16, 64, 128, 4, 3, 4),
        (16, 128, 64, 4, 4, 1),
    ],
    32: [(32, 32, 128, 4, 4, 1), (32, 64, 128, 4, 4, 1), (32, 64, 64, 4, 4, 2), (32, 128, 64, 4, 4, 1)],
    64: [(64, 64, 128, 4, 4, 1), (64, 64, 64, 4, 4, 1), (64, 128, 64, 4, 4, 1), (32, 64, 128, 4, 4, 1)],
    128: [(64, 128, 64, 4, 4, 1), (128, 64, 64, 8, 3, 1), (64, 64, 128, 4, 4, 1), (128, 128, 64, 8, 3, 1)],
    # (128, 256, 64) and (128, 128, 128) spilled registers for fp16 on sm_90 (kernels.build_check)
    256: [(128, 128, 64, 8, 3, 1), (64, 256, 64, 8, 3, 1)],
}
GEMV_MAX_M = 8  # gemv plans up to here (one K-reduction per row per step: decode-sized M)
GEMM_MIN_M = 5  # gemm plans from here on (M 5..8: both kinds, for the tuner)
DEQUANT_MIN_M = 256  # the cuBLAS path is a candidate from here on
DEQUANT_FIRST_M = 2048  # ... and the untuned choice from here on
_DEQUANT_PLAN = Plan("dequant", block_n=32, block_k=128, num_warps=4, num_stages=1)


def m_bucket(m: int) -> int:
    return min(next_pow2(m), 16384)


def _fit(plan: Plan, m: int, n: int, k: int, g: int) -> Plan | None:
    """Adapt a plan's tiles to a weight; None if it cannot run it (a gemm K step must lie in
    one group; a gemv step may span several whole groups)."""
    if plan.kind == "dequant":
        bk = min(plan.block_k, next_pow2(k))
        return replace(plan, block_k=max(bk, 16), block_n=min(plan.block_n, max(16, next_pow2(n))))
    if plan.kind == "gemv" and m > GEMV_MAX_M:
        return None  # one K-reduction per row per step: only meant for decode-sized M
    bk = min(plan.block_k, max(16, next_pow2(k)))
    if plan.kind == "gemm" and k // g > 1:  # several groups per row: a K step stays in one
        bk = min(bk, g & -g)  # largest power of two dividing G
    if bk < 16:
        return None
    min_n = 16 if plan.kind == "gemm" else 1
    bn = min(plan.block_n, max(min_n, next_pow2(n)))
    iters = -(-k // bk)
    split = max(1, min(plan.split_k, iters))
    bm = next_pow2(m) if plan.kind == "gemv" else plan.block_m
    return replace(plan, block_m=bm, block_n=bn, block_k=bk, split_k=split)


def _group_k(block_k: int, k: int, g: int) -> int:
    """Columns of a gemv K step that share one scale: whole step for a one-group row, else the
    largest power of two dividing G (sub-blocks then never straddle two groups)."""
    return block_k if k // g <= 1 else min(block_k, g & -g)


def untuned_kind(m: int) -> str:
    """The kernel kind to run for M rows when nothing is timed: the kind of the first candidate
    (on the GPU; the interpreter puts its own wide tile first, see :func:`candidates`)."""
    if m <= GEMV_MAX_M:
        return "gemv"  # decode: weight-bandwidth bound
    if m < DEQUANT_FIRST_M:
        return "gemm"
    return "dequant"  # prefill: compute bound, the extra pass over W is amortized over M


def candidates(m: int, n: int, k: int, g: int, bits: int = 8) -> list[Plan]:
    """Curated plans for this shape: the :func:`untuned_kind`'s plans, best guess first (that one
    runs when nothing is timed), then the other kinds that can serve this M, for the tuner. If
    no plan of the untuned kind fits the weight (a group size no K step divides), the next does."""
    bucket = m_bucket(m)
    by_kind: dict[str, list[Plan]] = {"gemv": [], "gemm": [], "dequant": []}
    if m <= GEMV_MAX_M:
        by_kind["gemv"] = _gemv_plans(bucket, n, k, bits)
    if m >= GEMM_MIN_M:
        configs = _GEMM_CONFIGS[min(max(bucket, 16), 256)]
        by_kind["gemm"] = [Plan("gemm", bm, bn, bk, sk, w, st) for bm, bn, bk, w, st, sk in configs]
    if m >= DEQUANT_MIN_M:
        by_kind["dequant"] = [_DEQUANT_PLAN]
    raw = by_kind.pop(untuned_kind(m)) + [p for plans in by_kind.values() for p in plans]
    if INTERPRET:
        # The interpreter pays per operation, not per byte: one wide tile beats many small ones
        # (the small-tile plans still run when forced, as the tests do).
        if m <= GEMV_MAX_M:
            raw.insert(0, Plan("gemv", bucket, min(512, next_pow2(n)), 128))
        else:
            raw.insert(0, Plan("gemm", min(64, max(16, bucket)), min(256, max(16, next_pow2(n))), 128))
    limit = int(os.environ.get("GRACE_KERNELS_TUNE_TOP", "0")) or len(raw)
    out: list[Plan] = []
    for p in raw:
        fitted = _fit(p, m, n, k, g)
        if fitted is not None and fitted not in out:
            out.append(fitted)
    if not out:  # e.g. a group size that no K step can divide: the dequant path always works
        out.append(_fit(_DEQUANT_PLAN, m, n, k, g))  # type: ignore[arg-type]
    return out[:limit]


# Autotuning (on a GPU, see :func:`qmatmul`): the tuner times every candidate once per (bits, N,
# K, G, M bucket, dtype, bias, device) with CUDA-graph timing and keeps the winner in memory and
# on disk (kernels/tuning_cache.py). Warm every M bucket up before CUDA-graph capture: inside a
# capture nothing is timed and the first candidate runs. "qmatmul" names the on-disk cache.
tuner = PlanTuner("qmatmul")
# what a stored plan's validity and speed depend on, besides card and versions
_SOURCES = (Path(__file__), Path(__file__).with_name("quant.py"))
_untuned: dict[tuple, Plan] = {}  # first candidates, where nothing is timed (CPU, autotune off)

# ----------------------------------------------------------------------------- launching

_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dequant_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One reused scratch buffer per (device, dtype), grown to the largest weight seen. Safe on one
    stream: the next dequantization is queued after the matmul that reads this one."""
    buf = _buffers.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[(device, dtype)] = buf
    return buf[:numel]


def reserve_dequant_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """Grow the scratch buffer to ``numel`` now. Call it with the largest weight before
    capturing CUDA graphs: a graph keeps the buffer's address, so it must never be replaced
    (grown or cleared) afterwards."""
    _dequant_buffer(numel, dtype, device)


def clear_buffers() -> None:
    """Free the dequantization scratch buffers (never while CUDA graphs that use them live)."""
    _buffers.clear()


def dequantize(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W [N, K]`` in ``dtype`` via the Triton dequant kernel (into ``out`` if given)."""
    n, k = qw.out_features, qw.in_features
    w = out if out is not None else torch.empty((n, k), dtype=dtype, device=qw.device)
    kernel, grid, args, kwargs = dequant_spec(qw, w)
    kernel[grid](*args, **kwargs)
    return w


def dequant_spec(
    qw: QuantizedWeight, w: torch.Tensor
) -> tuple[triton.JITFunction, tuple[int, ...], tuple, dict]:
    """(kernel, grid, args, keyword args) that dequantize ``qw`` into ``w [N, K]``."""
    n, k = qw.out_features, qw.in_features
    p = _fit(_DEQUANT_PLAN, 1, n, k, qw.group_size)
    assert p is not None
    grid = (triton.cdiv(n, p.block_n), triton.cdiv(k, p.block_k))
    args = (
        qw.qweight,
        qw.scales,
        w,
        n,
        k,
        qw.group_size,
        qw.qweight.stride(0),
        qw.scales.stride(0),
        w.stride(0),
    )
    kwargs = dict(
        BITS=qw.bits, EVEN_K=k % p.block_k == 0, BLOCK_N=p.block_n, BLOCK_K=p.block_k, num_warps=p.num_warps
    )
    return _dequant_kernel, grid, args, kwargs


def _cold_copies(qw: QuantizedWeight) -> list[QuantizedWeight]:
    """``qw`` plus temporary copies, >= 2x the L2 cache in all, for timing plans: in the model
    consecutive layers evict each other's weights, so a plan must win streaming from HBM, not
    on a weight that sits in L2 (a 4096 x 2048 W8 weight is 8 MB; H100's L2 is 50 MB)."""
    l2 = getattr(torch.cuda.get_device_properties(qw.device), "L2_cache_size", 50 * 2**20)
    copies = min(8, -(-2 * l2 // max(qw.nbytes, 1)))
    return [qw] + [
        QuantizedWeight(
            qw.bits, qw.group_size, qw.out_features, qw.in_features, qw.qweight.clone(), qw.scales.clone()
        )
        for _ in range(copies - 1)
    ]


def launch_spec(
    plan: Plan, x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, y: torch.Tensor
) -> tuple[triton.JITFunction, tuple[int, ...], tuple, dict]:
    """(kernel, grid, args, keyword args) of a gemv/gemm plan writing ``y`` (fp32 for split-K).
    The one place that maps a plan to a launch: run_plan launches it, kernels.build_check
    compiles it ahead of time for sm_90 (with meta tensors)."""
    m, k = x2.shape
    n, g = qw.out_features, qw.group_size
    n_iters = -(-k // plan.block_k)
    kwargs = dict(
        BITS=qw.bits,
        HAS_BIAS=bias is not None,
        SPLIT_K=plan.split_k,
        EVEN_K=k % plan.block_k == 0,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    args = (
        x2,
        qw.qweight,
        qw.scales,
        bias if bias is not None else qw.scales,  # dummy pointer when there is no bias
        y,
        m,
        n,
        k,
        g,
        x2.stride(0),
        qw.qweight.stride(0),
        qw.scales.stride(0),
        y.stride(0),
        n_iters,
        -(-n_iters // plan.split_k),
    )
    if plan.kind == "gemv":
        grid = (triton.cdiv(n, plan.block_n), plan.split_k)
        kwargs.update(NUM_STAGES=plan.num_stages, GROUP_K=_group_k(plan.block_k, k, g))
        return _gemv_kernel, grid, args, kwargs
    if plan.kind == "gemm":
        grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n), plan.split_k)
        dot_fp32 = x2.dtype == torch.float32 or (INTERPRET and x2.dtype == torch.bfloat16)
        # Pre-scaled weights only for bf16 (fp16 would lose tiny scaled weights to subnormals).
        prescale = x2.dtype == torch.bfloat16 and plan.block_m >= plan.block_k
        kwargs.update(DOT_FP32=dot_fp32, PRESCALE=prescale, GROUP_M=plan.group_m)
        return _gemm_kernel, grid, args, kwargs
    raise ValueError(f"unknown plan kind {plan.kind!r}")


def run_plan(
    plan: Plan,
    x2: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch one plan on ``x2 [M, K]`` (K-contiguous rows); returns ``[M, N]`` in x2's dtype,
    written into ``out`` (contiguous ``[M, N]``) when given."""
    m, k = x2.shape
    n = qw.out_features
    if out is not None and (out.shape != (m, n) or out.dtype != x2.dtype or out.stride(-1) != 1):
        raise ValueError(
            f"out must be {x2.dtype} [{m}, {n}] with unit last stride, got {out.dtype} {list(out.shape)}"
        )
    if plan.kind == "dequant":
        w = dequantize(qw, x2.dtype, _dequant_buffer(n * k, x2.dtype, x2.device).view(n, k))
        if out is None:
            return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
        if bias is None:
            return torch.mm(x2, w.t(), out=out)
        return torch.addmm(bias.to(x2.dtype), x2, w.t(), out=out)

    split = plan.split_k > 1
    if split:
        y = torch.zeros((m, n), dtype=torch.float32, device=x2.device)
    else:
        y = out if out is not None else torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    kernel, grid, args, kwargs = launch_spec(plan, x2, qw, bias, y)
    kernel[grid](*args, **kwargs)
    if not split:
        return y
    if out is None:
        return y.to(x2.dtype)
    return out.copy_(y)


def qmatmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    plan: Plan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` for ``x [..., K]`` fp16/bf16/fp32 -> ``[..., N]`` in x.dtype.

    ``plan``: force one launch plan (tests, benchmarks); default: the tuned choice for this
    shape's M bucket (the first candidate when not tuning). ``out``: contiguous result buffer
    ``[..., N]`` (e.g. a static CUDA-graph buffer).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton qmatmul supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} input features, weight expects {qw.in_features}")
    check_triton_device(x, qw.qweight, qw.scales)
    n, k = qw.out_features, qw.in_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out2 = None
    if out is not None:
        if out.shape != (*x.shape[:-1], n) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {[*x.shape[:-1], n]}, got {list(out.shape)}")
        out2 = out.view(m, n)
    if m == 0:
        return out if out is not None else x.new_empty((*x.shape[:-1], n))
    if bias is not None:
        bias = bias.contiguous()
    if plan is None:
        key = (qw.bits, n, k, qw.group_size, m_bucket(m), x.dtype, bias is not None, x.device)
        plan = tuner.best.get(key) or _untuned.get(key)  # type: ignore[assignment]
        if plan is None:
            cands = candidates(m, n, k, qw.group_size, qw.bits)
            if not tuning_enabled(x.device):
                plan = _untuned[key] = cands[0]
            elif torch.cuda.is_current_stream_capturing():
                plan = cands[0]  # nothing can be timed inside a capture; not remembered either
            else:
                if not tuner.persisted:  # first tuning in this process: earlier runs' choices
                    tuner.persist(tuning_cache.cache_path("qmatmul", x.device, _SOURCES), Plan, x.device)
                    plan = tuner.best.get(key)  # type: ignore[assignment]
                if plan is None:
                    weights = itertools.cycle(_cold_copies(qw))
                    plan = tuner.choose(
                        key, cands, lambda p: run_plan(p, x2, next(weights), bias, out2), x.device
                    )
    else:
        fitted = _fit(plan, m, n, k, qw.group_size)
        if fitted is None:
            raise ValueError(f"plan {plan} cannot run M={m}, K={k}, group size {qw.group_size}")
        plan = fitted
    y = run_plan(plan, x2, qw, bias, out2)
    return out if out is not None else y.reshape(*x.shape[:-1], n)


def aot_launches(dims, dtype: torch.dtype):  # (kernels.build_check.ModelDims, dtype) -> Launch
    """Every launch the dispatcher can make at the model's shapes (the decoder linears in W8 and
    W4, the W8 lm_head of --quantize-lm-head; every M bucket, every candidate plan), on meta
    tensors: what kernels.build_check compiles (in CI). Every one compiles for sm_90 in bf16 and
    fp16 without register spills; the fp32 test path is not checked."""
    from kernels.build_check import Launch

    meta = torch.device("meta")
    g = dims.group_size
    shapes = [(name, n, k, bits) for name, n, k in dims.decoder_linears() for bits in (8, 4)]
    shapes.append(("lm_head", dims.vocab, dims.hidden, 8))  # its binaries are qkv's (same tiles)
    for name, n, k, bits in shapes:
        codes = torch.empty((n, k), dtype=torch.int8, device=meta)
        if bits == 4:
            codes = torch.empty((n, k // 2), dtype=torch.uint8, device=meta)
        scales = torch.empty((n, k // g), dtype=torch.float32, device=meta)
        qw = QuantizedWeight(bits, g, n, k, codes, scales)
        for m in (2**i for i in range(m_bucket(1 << 30).bit_length())):
            x2 = torch.empty((m, k), dtype=dtype, device=meta)
            for i, plan in enumerate(candidates(m, n, k, g, bits)):
                label = f"{name} {n}x{k} W{bits} M{m} #{i} {plan}"  # #0: the untuned choice
                if plan.kind == "dequant":
                    w = torch.empty((n, k), dtype=dtype, device=meta)
                    kernel, _, args, kwargs = dequant_spec(qw, w)
                else:
                    y_dtype = torch.float32 if plan.split_k > 1 else dtype
                    y = torch.empty((m, n), dtype=y_dtype, device=meta)
                    kernel, _, args, kwargs = launch_spec(plan, x2, qw, None, y)
                yield Launch(label, kernel, args, kwargs)
