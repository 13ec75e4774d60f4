"""The decoder's step from the fused qkv projection to attention, as one Triton kernel:
per-head RMSNorm of q and k, rotary (M-RoPE: cos/sin rows per token), and the KV-cache write.

Unfused that is 2 norms + 10 elementwise rotary ops + the cache write: 13 kernels per layer,
each a few kilobytes of work at decode. One program handles one token, all its heads.
Every intermediate is rounded to the activation dtype where the torch ops round
(RMSNorm's normed value, its product with the weight, x*cos, rot(x)*sin, their sum), so the
result equals the twin ``reference.qk_norm_rope_kv`` but for the order of the fp32 sum in
the norm's mean (products of two fp16/bf16 values are exact in fp32: computing in fp32 and
rounding once is what torch does).
"""

from __future__ import annotations

import torch

from kernels.triton_utils import check_triton_device, next_pow2, to_out

import triton  # isort: skip  (kernels.triton_utils sets the interpreter default first)
import triton.language as tl  # isort: skip

__all__ = ["qk_norm_rope_kv"]


@triton.jit
def _round(x, ptr):
    """fp32 -> ptr's dtype -> fp32: the rounding of one torch op in that dtype."""
    return to_out(x, ptr).to(tl.float32)


@triton.jit
def _norm_rope(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, eps, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """RMSNorm + rotary of `heads` rows of 2*HALF values at x_ptr (row stride 2*HALF).
    Returns (lo, hi) halves in fp32 (values of out_ptr's dtype) and their mask."""
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < heads) & (c[None, :] < HALF)
    idx = h[:, None] * (2 * HALF) + c[None, :]
    lo = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + idx + HALF, mask=mask, other=0.0).to(tl.float32)
    var = (tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF)
    rs = tl.rsqrt(var + eps)[:, None]
    w_lo = tl.load(w_ptr + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    w_hi = tl.load(w_ptr + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    lo = _round(w_lo * _round(lo * rs, out_ptr), out_ptr)
    hi = _round(w_hi * _round(hi * rs, out_ptr), out_ptr)
    cos_lo = tl.load(cos_ptr + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)[None, :]
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-hi, lo)
    out_lo = _round(_round(lo * cos_lo, out_ptr) + _round(-hi * sin_lo, out_ptr), out_ptr)
    out_hi = _round(_round(hi * cos_hi, out_ptr) + _round(lo * sin_hi, out_ptr), out_ptr)
    return out_lo, out_hi, mask, idx


@triton.jit
def _qk_norm_rope_kv_kernel(
    qkv_ptr,
    qw_ptr,
    kw_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    HQ,
    HKV,
    HALF,
    eps,
    block_size,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_qo,
    stride_kcb,
    stride_kcs,
    stride_vcb,
    stride_vcs,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Token t: q -> q_out[t]; k, v -> cache slot slot_mapping[t] (skipped when negative).
    The cache rows of one slot are [H_kv, D] contiguous (unit head stride D)."""
    t = tl.program_id(0).to(tl.int64)
    d = 2 * HALF
    row = qkv_ptr + t * stride_qkv
    cos_row = cos_ptr + t * stride_cos
    sin_row = sin_ptr + t * stride_sin
    q_lo, q_hi, q_mask, q_idx = _norm_rope(
        row, qw_ptr, cos_row, sin_row, q_out_ptr, HQ, eps, HALF, BLOCK_HQ, BLOCK_HALF
    )
    q_dst = q_out_ptr + t * stride_qo + q_idx
    tl.store(q_dst, to_out(q_lo, q_out_ptr), mask=q_mask)
    tl.store(q_dst + HALF, to_out(q_hi, q_out_ptr), mask=q_mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        k_row = row + HQ * d
        k_lo, k_hi, k_mask, k_idx = _norm_rope(
            k_row, kw_ptr, cos_row, sin_row, q_out_ptr, HKV, eps, HALF, BLOCK_HKV, BLOCK_HALF
        )
        kc = k_cache_ptr + (slot // block_size) * stride_kcb + (slot % block_size) * stride_kcs + k_idx
        tl.store(kc, to_out(k_lo, k_cache_ptr), mask=k_mask)
        tl.store(kc + HALF, to_out(k_hi, k_cache_ptr), mask=k_mask)
        v_row = k_row + HKV * d
        v_lo = tl.load(v_row + k_idx, mask=k_mask, other=0.0).to(tl.float32)
        v_hi = tl.load(v_row + k_idx + HALF, mask=k_mask, other=0.0).to(tl.float32)
        vc = v_cache_ptr + (slot // block_size) * stride_vcb + (slot % block_size) * stride_vcs + k_idx
        tl.store(vc, to_out(v_lo, v_cache_ptr), mask=k_mask)
        tl.store(vc + HALF, to_out(v_hi, v_cache_ptr), mask=k_mask)


def qk_norm_rope_kv(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Triton twin of ``reference.qk_norm_rope_kv`` (same arguments and result, see there);
    out-of-range slots are not checked (the caller owns the slot mapping, as in
    ``attention.write_kv_cache``)."""
    t = qkv.shape[0]
    d = q_weight.shape[0]
    _, _, h_kv, d_cache = k_cache.shape
    if d % 2 or d_cache != d or k_weight.shape != (d,) or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"head dim {d} (even), k_weight {list(k_weight.shape)} and caches "
            f"{list(k_cache.shape)} / {list(v_cache.shape)} do not match"
        )
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * h_kv) * d:
        raise ValueError(f"qkv must be [T, ({num_heads} + 2*{h_kv}) * {d}], got {list(qkv.shape)}")
    if cos.shape != (t, d) or sin.shape != (t, d) or slot_mapping.shape != (t,):
        raise ValueError(f"cos/sin must be [{t}, {d}] and slot_mapping [{t}]")
    if q_weight.dtype != qkv.dtype or k_weight.dtype != qkv.dtype:
        raise ValueError(f"norm weights must have qkv's dtype {qkv.dtype}")
    check_triton_device(qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(3) != 1 or x.stride(2) != d:
            raise ValueError(f"{name} needs contiguous [H_kv, D] rows per slot")
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        _qk_norm_rope_kv_kernel[(t,)](
            qkv,
            q_weight.contiguous(),
            k_weight.contiguous(),
            cos,
            sin,
            q,
            k_cache,
            v_cache,
            slot_mapping,
            num_heads,
            h_kv,
            d // 2,
            eps,
            k_cache.shape[1],
            qkv.stride(0),
            cos.stride(0),
            sin.stride(0),
            q.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            v_cache.stride(0),
            v_cache.stride(1),
            BLOCK_HQ=next_pow2(num_heads),
            BLOCK_HKV=next_pow2(h_kv),
            BLOCK_HALF=next_pow2(d // 2),
            num_warps=4 if num_heads * d >= 1024 else 1,
        )
    return q
