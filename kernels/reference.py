"""Plain-torch twins of every kernel: the CPU execution path and the test oracle.

Correctness and clarity first: loops over sequences where that is simplest, fp32 compute.
Each function's docstring states the tensor layouts the fast kernels must share.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # quant.py imports this module lazily; avoid a runtime cycle
    from kernels.quant import QuantizedWeight

__all__ = [
    "add_rms_norm",
    "decode_attention",
    "paged_attention",
    "qk_norm_rope_kv",
    "qmatmul",
    "rms_norm",
    "silu_and_mul",
    "varlen_attention",
    "write_kv_cache",
]


def qmatmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` with ``W = qw.dequantize()``.

    ``x [..., K]`` any float dtype -> ``[..., N]`` in ``x.dtype``. Computed in fp32 (fp64 when x is
    fp64); the dequantized weight is memoized only if ``qw.cache_dequantized`` is set.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = qw.dequantized_cached(compute)
    y = x.reshape(-1, x.shape[-1]).to(compute) @ w.t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], qw.out_features)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new tokens' K/V into the paged cache, in place.

    key/value: ``[T, H_kv, D]``; k_cache/v_cache: ``[num_blocks, block_size, H_kv, D]``;
    slot_mapping: int64 ``[T]``, ``slot = block * block_size + offset``; a negative slot marks a
    padding token that is skipped (the cache is left untouched there).
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(
            f"key/value must both be [T, H_kv, D], got {list(key.shape)} and {list(value.shape)}"
        )
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"cache shape {list(k_cache.shape)} / {list(v_cache.shape)} does not match key {list(key.shape)}"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [T={key.shape[0]}], got {list(slot_mapping.shape)}")
    num_blocks, block_size = k_cache.shape[:2]
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.int64)
    valid = slots >= 0
    slots = slots[valid]
    if slots.numel() and int(slots.max()) >= num_blocks * block_size:
        raise ValueError(f"slot {int(slots.max())} out of range for {num_blocks} blocks of {block_size}")
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[valid].to(v_cache.dtype)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Attention of packed variable-length queries over a paged KV cache (prefill and decode).

    - query ``[T, H_q, D]``: the new tokens of B sequences, packed; sequence b owns rows
      ``query_start_loc[b] : query_start_loc[b+1]`` (query_start_loc int ``[B+1]``, cumulative).
    - k_cache/v_cache ``[num_blocks, block_size, H_kv, D]``; block_tables int ``[B, max_blocks]``:
      position p of sequence b lives at ``block_tables[b, p // block_size]``, offset
      ``p % block_size``.
    - seq_lens int ``[B]``: total context of each sequence INCLUDING its new tokens, whose K/V are
      already in the cache. The q_len_b query rows are positions ``seq_len_b - q_len_b ..
      seq_len_b - 1`` (a cached prefix precedes them; decode is q_len 1).
    - causal: a query at position p sees keys ``0..p``; otherwise all ``seq_len_b`` keys.
    - GQA: ``H_q % H_kv == 0``; query head h reads kv head ``h // (H_q // H_kv)``.

    Scores and softmax in fp32; returns ``[T, H_q, D]`` in ``query.dtype``. Rows past
    ``query_start_loc[B]`` (padding) are zero.
    """
    t, h_q, d = query.shape
    _, block_size, h_kv, d_kv = k_cache.shape
    if d_kv != d or h_q % h_kv:
        raise ValueError(f"query [.., {h_q}, {d}] incompatible with cache [.., {h_kv}, {d_kv}]")
    group = h_q // h_kv
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    tables = block_tables.tolist()
    if len(qsl) != len(lens) + 1:
        raise ValueError(f"query_start_loc needs B+1={len(lens) + 1} entries, got {len(qsl)}")

    out = torch.zeros((t, h_q, d), dtype=query.dtype, device=query.device)
    for b, seq_len in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"sequence {b}: {q_len} query tokens but seq_len {seq_len}")
        n_blocks = -(-seq_len // block_size)
        if n_blocks > len(tables[b]):
            raise ValueError(
                f"sequence {b}: seq_len {seq_len} needs {n_blocks} blocks, table has {len(tables[b])}"
            )
        blocks = torch.tensor(tables[b][:n_blocks], dtype=torch.int64, device=k_cache.device)
        # Gather this sequence's keys/values in position order: [seq_len, H_kv, D] -> per query head.
        k = k_cache[blocks].reshape(-1, h_kv, d)[:seq_len].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].reshape(-1, h_kv, d)[:seq_len].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()

        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H_q, q_len, seq_len]
        if causal:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm over the last dim: ``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)``.

    The normalization runs in fp32; the product with ``weight`` follows torch type promotion
    (x.dtype when weight has x's dtype, as in the model), exactly like HF Qwen3RMSNorm.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: ``h = x + residual`` (in x.dtype, as the model adds), returns
    ``(rms_norm(h, weight, eps), h)``."""
    h = x + residual.to(x.dtype)
    return rms_norm(h, weight, eps), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in x's dtype, as HF Qwen3-VL: x [T, H, D]; cos/sin [T, D] (broadcast over heads)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


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
    """The decoder's step between the fused qkv projection and attention.

    qkv ``[T, (H_q + 2 H_kv) D]`` (q | k | v, D = the norm weights' size, H_kv from the cache);
    q and k get a per-head RMSNorm (:func:`rms_norm`) then rotary (:func:`apply_rotary`,
    cos/sin ``[T, D]`` in qkv's dtype); k and v are written to the paged cache
    (:func:`write_kv_cache`). Returns q ``[T, H_q, D]``. Each op rounds to qkv's dtype: a
    fused kernel must round at the same points to match.
    """
    t = qkv.shape[0]
    d, h_kv = q_weight.shape[0], k_cache.shape[2]
    q, k, v = qkv.split([num_heads * d, h_kv * d, h_kv * d], dim=-1)
    q = apply_rotary(rms_norm(q.view(t, num_heads, d), q_weight, eps), cos, sin)
    k = apply_rotary(rms_norm(k.view(t, h_kv, d), k_weight, eps), cos, sin)
    write_kv_cache(k, v.reshape(t, h_kv, d), k_cache, v_cache, slot_mapping)
    return q


def decode_attention(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """:func:`qk_norm_rope_kv` then causal :func:`paged_attention` (the Triton kernel fuses
    them for decode steps: at most one new token per sequence)."""
    q = qk_norm_rope_kv(qkv, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention within each packed segment (vision tower: full attention inside each image).

    q ``[T, H_q, D]``, k/v ``[T, H_kv, D]`` (GQA as in :func:`paged_attention`), cu_seqlens int
    ``[B+1]``: segment b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``. fp32 inside; rows past
    ``cu_seqlens[B]`` are zero; returns q.dtype.
    """
    t, h_q, d = q.shape
    h_kv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d or h_q % h_kv:
        raise ValueError(f"q {list(q.shape)} incompatible with k {list(k.shape)} / v {list(v.shape)}")
    scale = d**-0.5 if scale is None else scale
    group = h_q // h_kv
    bounds = cu_seqlens.tolist()
    out = torch.zeros_like(q)
    for start, end in itertools.pairwise(bounds):
        if end <= start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [H_q, L, D]
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            n = end - start
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2*I]`` (gate then up, as the fused gate_up projection emits) -> ``silu(gate) * up``.

    Computed in fp32, returned in ``x.dtype``.
    """
    i = x.shape[-1] // 2
    if x.shape[-1] != 2 * i:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    x32 = x.float()
    return (torch.nn.functional.silu(x32[..., :i]) * x32[..., i:]).to(x.dtype)
