"""Fused elementwise kernels of the decoder: RMSNorm (optionally with the residual add), SiLU-and-mul.

Why fuse: at batch-1 decode each of these is a few kilobytes of work, so a kernel costs its
launch (~2-4 us) rather than its bytes; the unfused torch versions are 3-6 kernels each.
Twins: ``reference.rms_norm``, ``reference.add_rms_norm``, ``reference.silu_and_mul``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels.triton_utils import check_triton_device, next_pow2, to_out

import triton  # isort: skip  (kernels.triton_utils sets the interpreter default first)
import triton.language as tl  # isort: skip

__all__ = ["add_rms_norm", "rms_norm", "silu_and_mul"]


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    N,
    eps,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: [h = x + res (rounded to the activation dtype, stored)], y = w * norm(h)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # torch adds in the activation dtype: round the sum the same way before normalizing
        h = to_out(x + r, res_out_ptr)
        tl.store(res_out_ptr + row * stride_ro + offs, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    normed = x * tl.rsqrt(var + eps)
    # Qwen3RMSNorm: weight * normed.to(x.dtype), the product in the weight/activation dtype
    normed = to_out(normed, y_ptr).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, to_out(w * normed, y_ptr), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_spec(
    x2: torch.Tensor,
    r2: torch.Tensor | None,
    weight: torch.Tensor,
    y: torch.Tensor,
    res_out: torch.Tensor | None,
    eps: float,
) -> tuple:
    """(kernel, grid, args, kwargs) of the norm's launch on rows x2 [(+ r2) -> res_out] -> y."""
    n = x2.shape[-1]
    block = next_pow2(n)
    r2 = x2 if r2 is None else r2  # dummy pointers when there is no residual
    res = y if res_out is None else res_out
    args = (
        x2,
        r2,
        weight.contiguous(),
        y,
        res,
        n,
        eps,
        x2.stride(0),
        r2.stride(0),
        y.stride(0),
        res.stride(0),
    )
    kwargs = dict(HAS_RES=res_out is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return _rms_norm_kernel, (x2.shape[0],), args, kwargs


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}], got {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    check_triton_device(x, weight)
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {list(residual.shape)} and x {list(x.shape)} differ")
        r2 = _rows(residual.to(x.dtype))
        res_out = torch.empty_like(y)
    if x2.shape[0]:
        kernel, grid, args, kwargs = _norm_spec(x2, r2, weight, y, res_out, eps)
        kernel[grid](*args, **kwargs)
    y = y.reshape(x.shape)
    return y, None if res_out is None else res_out.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)`` over the last dim (weight: x's dtype)."""
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (in x.dtype); returns ``(rms_norm(h), h)`` in one pass."""
    y, h = _launch_norm(x, residual, weight, eps)
    assert h is not None
    return y, h


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, inner, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inner + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * stride_y + offs, to_out(y, y_ptr), mask=mask)


def _silu_spec(x2: torch.Tensor, y: torch.Tensor) -> tuple:
    """(kernel, grid, args, kwargs) of silu_and_mul's launch on rows x2 [M, 2I] -> y [M, I]."""
    i = y.shape[-1]
    block = min(1024, next_pow2(i))
    grid = (x2.shape[0], triton.cdiv(i, block))
    kwargs = dict(BLOCK=block, num_warps=4 if block >= 512 else 1)
    return _silu_and_mul_kernel, grid, (x2, y, i, x2.stride(0), y.stride(0)), kwargs


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2*I]`` (gate | up) -> ``silu(gate) * up`` ``[..., I]``, fp32 inside, x.dtype out."""
    i = x.shape[-1] // 2
    if x.shape[-1] != 2 * i:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    check_triton_device(x)
    x2 = _rows(x)
    y = torch.empty((x2.shape[0], i), dtype=x.dtype, device=x.device)
    if x2.shape[0] and i:
        kernel, grid, args, kwargs = _silu_spec(x2, y)
        kernel[grid](*args, **kwargs)
    return y.reshape(*x.shape[:-1], i)


def aot_launches(dims, dtype: torch.dtype) -> Iterator:  # (build_check.ModelDims, dtype) -> Launch
    """The decoder's norms (with and without the residual add) and SiLU-and-mul, on meta
    tensors (for kernels.build_check); the row count is only the grid."""
    from kernels.build_check import Launch

    meta = torch.device("meta")
    h, i = dims.hidden, dims.intermediate
    x, w = torch.empty((1, h), dtype=dtype, device=meta), torch.empty((h,), dtype=dtype, device=meta)
    for res in (None, x):
        kernel, _, args, kwargs = _norm_spec(
            x, res, w, torch.empty_like(x), None if res is None else torch.empty_like(x), 1e-6
        )
        yield Launch(f"hidden {h} {'add + norm' if res is not None else 'norm'}", kernel, args, kwargs)
    gate_up = torch.empty((1, 2 * i), dtype=dtype, device=meta)
    kernel, _, args, kwargs = _silu_spec(gate_up, torch.empty((1, i), dtype=dtype, device=meta))
    yield Launch(f"intermediate {i}", kernel, args, kwargs)
