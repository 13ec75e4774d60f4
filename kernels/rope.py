"""The decoder's step from the fused qkv projection to attention, as one Triton kernel:
per-head RMSNorm of q and k, rotary (M-RoPE: cos/sin rows per token), and the KV-cache write.

Unfused that is 2 norms + 10 elementwise rotary ops + the cache write: 13 kernels per layer,
each a few kilobytes of work at decode. One program handles one token, all its heads.
Decode steps fuse this into the attention kernel instead (attention.decode_attention, on
``norm_rope_rows``); this kernel serves prefill steps.
Every intermediate is rounded to the activation dtype where the torch ops round
(RMSNorm's normed value, its product with the weight, x*cos, rot(x)*sin, their sum), so the
result equals the twin ``reference.qk_norm_rope_kv`` but for the order of the fp32 sum in
the norm's mean (products of two fp16/bf16 values are exact in fp32: computing in fp32 and
rounding once is what torch does).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels.triton_utils import check_triton_device, next_pow2, round_to, to_out

import triton  # isort: skip  (kernels.triton_utils sets the interpreter default first)
import triton.language as tl  # isort: skip

__all__ = ["qk_norm_rope_kv"]


@triton.jit
def norm_rope_rows(base, w_ptr, cos_base, sin_base, rows, offs_d, D, eps, dtype_ptr):
    """RMSNorm + rotary of head vectors of D values at base [M, 1] (+ offs_d), each op
    rounded to dtype_ptr's dtype as torch rounds it (the attention kernel's decode path uses
    this too). rotate_half(x)[d] = -x[d + D/2] below D/2, x[d - D/2] above: a second load."""
    half = D // 2
    d_mask = offs_d < D
    lower = offs_d < half
    partner = tl.where(lower, offs_d + half, offs_d - half)
    sign = tl.where(lower, -1.0, 1.0)
    m = rows[:, None] & d_mask[None, :]
    x = tl.load(base + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=m, other=0.0).to(tl.float32)
    rs = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    n = round_to(w * round_to(x * rs, dtype_ptr), dtype_ptr)
    n_rot = sign[None, :] * round_to(wp * round_to(xp * rs, dtype_ptr), dtype_ptr)
    c = tl.load(cos_base + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    s = tl.load(sin_base + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    return round_to(round_to(n * c, dtype_ptr) + round_to(n_rot * s, dtype_ptr), dtype_ptr)


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
    D,
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
    BLOCK_D: tl.constexpr,
):
    """Token t: q -> q_out[t]; k, v -> cache slot slot_mapping[t] (skipped when negative).
    The cache rows of one slot are [H_kv, D] contiguous (unit head stride D)."""
    t = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + t * stride_qkv
    cos_row = cos_ptr + t * stride_cos
    sin_row = sin_ptr + t * stride_sin
    offs_d = tl.arange(0, BLOCK_D)
    hq = tl.arange(0, BLOCK_HQ)
    q = norm_rope_rows(row + hq[:, None] * D, qw_ptr, cos_row, sin_row, hq < HQ, offs_d, D, eps, q_out_ptr)
    q_mask = (hq[:, None] < HQ) & (offs_d[None, :] < D)
    q_dst = q_out_ptr + t * stride_qo + hq[:, None] * D + offs_d[None, :]
    tl.store(q_dst, to_out(q, q_out_ptr), mask=q_mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_HKV)
        kv_mask = (h[:, None] < HKV) & (offs_d[None, :] < D)
        head = h[:, None] * D + offs_d[None, :]
        k_row = row + HQ * D
        k = norm_rope_rows(
            k_row + h[:, None] * D, kw_ptr, cos_row, sin_row, h < HKV, offs_d, D, eps, q_out_ptr
        )
        kc = k_cache_ptr + (slot // block_size) * stride_kcb + (slot % block_size) * stride_kcs + head
        tl.store(kc, to_out(k, k_cache_ptr), mask=kv_mask)
        v = tl.load(k_row + HKV * D + head, mask=kv_mask, other=0.0).to(tl.float32)
        vc = v_cache_ptr + (slot // block_size) * stride_vcb + (slot % block_size) * stride_vcs + head
        tl.store(vc, to_out(v, v_cache_ptr), mask=kv_mask)


def _rope_spec(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q: torch.Tensor,
) -> tuple:
    """(kernel, grid, args, kwargs) of qk_norm_rope_kv's launch (checked inputs) -> q [T, H_q, D]."""
    t, num_heads, d = q.shape
    h_kv = k_cache.shape[2]
    args = (
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
        d,
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
    )
    kwargs = dict(
        BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HKV=next_pow2(h_kv),
        BLOCK_D=next_pow2(d),
        num_warps=4 if num_heads * d >= 1024 else 1,
    )
    return _qk_norm_rope_kv_kernel, (t,), args, kwargs


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
        kernel, grid, args, kwargs = _rope_spec(
            qkv, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, slot_mapping, q
        )
        kernel[grid](*args, **kwargs)
    return q


def aot_launches(dims, dtype: torch.dtype) -> Iterator:  # (build_check.ModelDims, dtype) -> Launch
    """The prefill steps' q/k norm + rotary + KV write at the decoder's shapes, on meta tensors
    (for kernels.build_check); the token count is only the grid."""
    from kernels.build_check import Launch

    meta = torch.device("meta")
    h_q, h_kv, d = dims.heads, dims.kv_heads, dims.head_dim

    def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device=meta)

    cache, w, cs = empty(1, dims.block_size, h_kv, d), empty(d), empty(1, d)
    qkv, q = empty(1, (h_q + 2 * h_kv) * d), empty(1, h_q, d)
    kernel, _, args, kwargs = _rope_spec(qkv, w, w, 1e-6, cs, cs, cache, cache, empty(1, dt=torch.long), q)
    yield Launch(f"{h_q}+{h_kv} heads x {d}", kernel, args, kwargs)
