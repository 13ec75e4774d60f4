"""Attention in Triton: paged KV-cache write, paged varlen attention (prefill, prefill over a
cached prefix, decode; causal, GQA), and dense varlen attention (vision tower, per image).

Layouts are those of the torch twins in kernels/reference.py:
query [T, H_q, D]; k_cache / v_cache [num_blocks, block_size, H_kv, D]; block_tables
[B, max_blocks]; seq_lens [B] (context including the new tokens); query_start_loc [B+1].

One program handles one sequence, one tile of BLOCK_Q of its query tokens and one KV head,
together with all H_q / H_kv query heads that share that KV head: the tile's rows are
(token, head) pairs, so each K/V tile is loaded once for the whole GQA group. That is what
makes decode (1 token, 2 heads per KV head) bandwidth bound instead of load-count bound.
Scores and softmax are fp32 (online softmax in base 2). When there are too few programs to
fill the GPU (decode at small batch), the context is split across programs (flash-decoding)
and the program that finishes a tile's last split merges the partial results (a ticket
counter per tile and KV head), so a decode step's attention is one kernel either way. The
plan bounds the split count; each tile splits only as far as its own context (read from
seq_lens on the device) fills, so a short context under a long context's plan (a CUDA graph
captured at max_model_len) writes no partials and merges nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from kernels.rope import norm_rope_rows
from kernels.triton_utils import INTERPRET, check_triton_device, next_pow2, num_sms, to_out

import triton  # isort: skip  (kernels.triton_utils sets the interpreter default first)
import triton.language as tl  # isort: skip

__all__ = [
    "AttentionPlan",
    "decode_attention",
    "paged_attention",
    "plan_attention",
    "varlen_attention",
    "write_kv_cache",
]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- KV-cache write


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    block_size,
    H,
    D,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Token t: copy key/value[t] ([H, D]) into cache slot slot_mapping[t]; skip slot < 0."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < H) & (d[None, :] < D)
        # Round-trip through fp32: exact for fp16/bf16, and the interpreter's only safe bf16 op.
        k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch + d[None, :]
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch + d[None, :]
        tl.store(kc, to_out(k.to(tl.float32), k_cache_ptr), mask=mask)
        tl.store(vc, to_out(v.to(tl.float32), v_cache_ptr), mask=mask)


def _write_kv_spec(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple:
    """(kernel, grid, args, kwargs) of write_kv_cache's launch (checked inputs)."""
    t, h, d = key.shape
    args = (
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_cache.shape[1],
        h,
        d,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
    )
    kwargs = dict(BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d), num_warps=1 if h * d <= 1024 else 4)
    return _write_kv_kernel, (t,), args, kwargs


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new tokens' K/V (``[T, H_kv, D]``, any strides with unit stride along D) into the
    paged cache in place; slot = block * block_size + offset, negative slots are skipped.
    Same contract as ``reference.write_kv_cache`` except that out-of-range slots are not checked
    (that would need a device sync); the caller owns the slot mapping."""
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
    check_triton_device(key, value, k_cache, v_cache, slot_mapping)
    t = key.shape[0]
    if t == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache / v_cache need unit stride along D")
    kernel, grid, args, kwargs = _write_kv_spec(key, value, k_cache, v_cache, slot_mapping)
    kernel[grid](*args, **kwargs)


# ----------------------------------------------------------------------------- attention


# Per-step integers are run-time values: a new batch size, split count or block-table width
# (the step's longest context) must not compile a new variant in the middle of traffic
# (Triton specializes ints on ==1 and %16 otherwise).
@triton.jit(do_not_specialize=["B", "T", "TILES", "num_splits", "min_split_iters", "stride_bt"])
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    ws_acc_ptr,
    ws_m_ptr,
    ws_l_ptr,
    locks_ptr,
    qn_w_ptr,
    kn_w_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    eps,
    stride_cos,
    stride_sin,
    B,
    T,
    num_splits,
    min_split_iters,
    HQ,
    HEAD_DIM,
    TILES,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    block_size,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FUSE_ROPE: tl.constexpr,
):
    # BLOCK_M = BLOCK_Q * GROUP_P rows: (token i, head j) pairs, j fastest.
    # FUSE_ROPE (decode: one new token per sequence): q_ptr is the qkv projection's output;
    # q and the new token's k get RMSNorm + rotary here, the new k/v are attended from
    # registers and written to the cache by split 0, so the cache is read only below
    # position seq_len - 1 and no program waits for another's write.
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_M)
    i = r // GROUP_P  # token within the tile
    j = r % GROUP_P  # query head within the GQA group
    head = kvh * GROUP + j
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    num_work = B * TILES

    if pid >= num_work:
        # Padding programs: rows past query_start_loc[B] are defined as zero (like the reference).
        if split == 0:
            total = tl.load(qsl_ptr + B)
            t = ((pid - num_work) * BLOCK_Q + i).to(tl.int64)
            rmask = (t >= total) & (t < T) & (j < GROUP)
            ptrs = o_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
            zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            tl.store(ptrs, to_out(zero, o_ptr), mask=rmask[:, None] & d_mask[None, :])
    else:
        b = pid // TILES
        qt = pid % TILES
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        if PAGED:
            seq_len = tl.load(seq_lens_ptr + b)
        else:
            seq_len = q_len  # dense: the keys are the queries' own rows
        qi = qt * BLOCK_Q + i
        row_valid = (qi < q_len) & (j < GROUP)
        tok = (q_start + qi).to(tl.int64)
        pos = seq_len - q_len + qi  # absolute position of each query row
        q_mask = row_valid[:, None] & d_mask[None, :]
        if FUSE_ROPE:
            rope_rows = tok[:, None]
            q = norm_rope_rows(
                q_ptr + rope_rows * stride_qt + head[:, None] * stride_qh,
                qn_w_ptr,
                cos_ptr + rope_rows * stride_cos,
                sin_ptr + rope_rows * stride_sin,
                row_valid,
                offs_d,
                HEAD_DIM,
                eps,
                o_ptr,
            )
            kv_base = q_ptr + rope_rows * stride_qt + (HQ + kvh) * stride_qh
            k_new = norm_rope_rows(
                kv_base,
                kn_w_ptr,
                cos_ptr + rope_rows * stride_cos,
                sin_ptr + rope_rows * stride_sin,
                row_valid,
                offs_d,
                HEAD_DIM,
                eps,
                k_ptr,
            )
            v_base = kv_base + tl.num_programs(1) * stride_qh
            v_new = tl.load(v_base + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
            if not DOT_FP32:
                q = q.to(k_ptr.dtype.element_ty)  # exact: rounded to the activation dtype
        else:
            q = tl.load(
                q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            if DOT_FP32:
                q = q.to(tl.float32)

        # Keys this tile can see: all of them, or (causal) up to its last query's position.
        if CAUSAL:
            kv_end = seq_len - q_len + tl.minimum(q_len, (qt + 1) * BLOCK_Q)
        else:
            kv_end = seq_len
        if FUSE_ROPE:
            kv_end = kv_end - 1  # the new token's k/v come from registers
        kv_end = tl.where(qt * BLOCK_Q < q_len, kv_end, 0)  # tile past this sequence: no work
        n_iters = (kv_end + BLOCK_N - 1) // BLOCK_N
        # This tile's own split count, from its actual context (read on the device, so a
        # graph captured with the longest context's grid still runs a short one in one part:
        # no partials, no merge); programs past it find an empty range and store nothing.
        if SPLIT:
            splits = tl.maximum(1, tl.minimum(num_splits, n_iters // min_split_iters))
        else:
            splits = 1
        per_split = (n_iters + splits - 1) // splits
        it_start = split * per_split
        it_end = tl.minimum(it_start + per_split, n_iters)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for it in range(it_start, it_end):
            offs_n = it * BLOCK_N + tl.arange(0, BLOCK_N)
            n_valid = offs_n < kv_end
            if PAGED:
                blk = tl.load(tables_ptr + b * stride_bt + offs_n // block_size, mask=n_valid, other=0)
                slot = offs_n % block_size
                k_rows = blk.to(tl.int64) * stride_kb + slot * stride_ks
                v_rows = blk.to(tl.int64) * stride_vb + slot * stride_vs
            else:
                k_rows = (q_start + offs_n).to(tl.int64) * stride_ks
                v_rows = (q_start + offs_n).to(tl.int64) * stride_vs
            kt_mask = d_mask[:, None] & n_valid[None, :]
            kt = tl.load(k_ptr + k_rows[None, :] + kvh * stride_kh + offs_d[:, None], mask=kt_mask, other=0.0)
            if DOT_FP32:  # fp32 inputs, or bf16 in the interpreter (its bf16 dot is wrong)
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale  # log2 domain
            mask = n_valid[None, :]
            if CAUSAL:
                mask = mask & (offs_n[None, :] <= pos[:, None])
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: no NaN
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_mask = n_valid[:, None] & d_mask[None, :]
            v = tl.load(v_ptr + v_rows[:, None] + kvh * stride_vh + offs_d[None, :], mask=v_mask, other=0.0)
            if DOT_FP32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if FUSE_ROPE:
            if split == splits - 1:  # the new token's column, in the last split
                s_new = tl.sum(q.to(tl.float32) * k_new, axis=1) * qk_scale
                s_new = tl.where(row_valid, s_new, float("-inf"))
                m_new = tl.maximum(m_i, s_new)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p_new = tl.exp2(s_new - m_safe)
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + p_new
                if not DOT_FP32:  # as the loop's p.to(v.dtype)
                    p_new = p_new.to(k_ptr.dtype.element_ty).to(tl.float32)
                acc = acc * alpha[:, None] + p_new[:, None] * v_new
                m_i = m_new
            if split == 0:  # the cache write, once per (token, KV head): rows of head j == 0
                slot_new = tl.load(slot_ptr + tok, mask=row_valid & (j == 0), other=-1).to(tl.int64)
                w_mask = (slot_new >= 0)[:, None] & d_mask[None, :]
                blk_new = (slot_new // block_size)[:, None]
                off_new = (slot_new % block_size)[:, None]
                kc = k_ptr + blk_new * stride_kb + off_new * stride_ks + kvh * stride_kh + offs_d[None, :]
                vc = v_ptr + blk_new * stride_vb + off_new * stride_vs + kvh * stride_vh + offs_d[None, :]
                tl.store(kc, to_out(k_new, k_ptr), mask=w_mask)
                tl.store(vc, to_out(v_new, v_ptr), mask=w_mask)

        o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        if not SPLIT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptrs, to_out(out, o_ptr), mask=q_mask)
        elif splits == 1:  # this tile's context is short: stored directly, by split 0 alone
            if split == 0:
                out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                tl.store(o_ptrs, to_out(out, o_ptr), mask=q_mask)
        elif split < splits:
            # Unnormalized partials to the workspace; the split that finishes last merges them
            # (no second kernel). The barrier makes every thread's stores precede the ticket,
            # whose acq_rel atomic publishes them (and, for the last, acquires the others').
            row = (split * T + tok) * HQ + head
            tl.store(ws_m_ptr + row, m_i, mask=row_valid)
            tl.store(ws_l_ptr + row, l_i, mask=row_valid)
            tl.store(ws_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_valid[:, None])
            tl.debug_barrier()
            lock = locks_ptr + pid * tl.num_programs(1) + kvh
            ticket = tl.atomic_add(lock, 1, sem="acq_rel")
            if ticket == splits - 1:
                tl.atomic_xchg(lock, 0)  # ready for the next launch (graph replays reuse it)
                out = _merge_splits(
                    ws_acc_ptr,
                    ws_m_ptr,
                    ws_l_ptr,
                    tok,
                    head,
                    row_valid,
                    offs_d,
                    T,
                    HQ,
                    splits,
                    BLOCK_M,
                    BLOCK_D,
                )
                tl.store(o_ptrs, to_out(out, o_ptr), mask=q_mask)


@triton.jit
def _merge_splits(
    ws_acc_ptr,
    ws_m_ptr,
    ws_l_ptr,
    tok,
    head,
    row_valid,
    offs_d,
    T,
    HQ,
    num_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Softmax-merge the num_splits partials (m, l, acc) of rows (tok, head): weights
    exp2(m_s - max m), empty splits (m = -inf) weigh 0. Loads bypass L1 (.cg): the
    partials were written by other programs."""
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m_s = tl.load(
            ws_m_ptr + (s * T + tok) * HQ + head, mask=row_valid, other=float("-inf"), cache_modifier=".cg"
        )
        m_max = tl.maximum(m_max, m_s)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        row = (s * T + tok) * HQ + head
        m_s = tl.load(ws_m_ptr + row, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(m_s - m_safe)
        l_sum += w * tl.load(ws_l_ptr + row, mask=row_valid, other=0.0, cache_modifier=".cg")
        a = tl.load(
            ws_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
            mask=row_valid[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        acc += a * w[:, None]
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]


@dataclass(frozen=True)
class AttentionPlan:
    """Launch parameters; rows per program = block_q * next_pow2(H_q / H_kv)."""

    block_q: int
    block_n: int = 64
    num_splits: int = 1  # the most splits a tile may use (the grid's third dimension)
    # a tile uses min(num_splits, its own K/V tiles // min_split_iters) splits, at least 1
    min_split_iters: int = 4
    num_warps: int = 4
    num_stages: int = 2


def plan_attention(
    batch: int,
    h_q: int,
    h_kv: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int | None,
    device: torch.device,
) -> AttentionPlan:
    """Heuristic tiles: 16 rows for decode-like batches, 64 for prefill; split the context
    (flash-decoding) when sequences x KV heads x tiles would give fewer than two programs per
    SM. ``max_seq_len`` bounds the split count; each tile then splits only as far as its own
    context fills (min_split_iters K/V tiles per split), so a plan made for the longest
    context (a captured graph's) costs a short one nothing."""
    return plan_for_sms(batch, h_q, h_kv, head_dim, max_query_len, max_seq_len, num_sms(device))


def plan_for_sms(
    batch: int, h_q: int, h_kv: int, head_dim: int, max_query_len: int, max_seq_len: int | None, sms: int
) -> AttentionPlan:
    """plan_attention on a GPU with ``sms`` multiprocessors."""
    group_p = next_pow2(h_q // h_kv)
    rows = 16 if max_query_len * group_p <= 16 else 64
    rows = max(rows, group_p)
    block_q = rows // group_p
    tiles = -(-max_query_len // block_q)
    work = batch * tiles * h_kv
    block_n = 64 if head_dim <= 128 else 32
    splits = 1
    if max_seq_len is not None and work < 2 * sms:
        chunks = -(-max_seq_len // block_n)
        splits = max(1, min(-(-2 * sms // work), chunks // AttentionPlan.min_split_iters, 16))
    return AttentionPlan(block_q=block_q, block_n=block_n, num_splits=splits)


@dataclass(frozen=True)
class _Rope:
    """What decode_attention fuses in front of attention (see reference.qk_norm_rope_kv)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor


_LOCKS: dict[torch.device, torch.Tensor] = {}
_OLD_LOCKS: list[torch.Tensor] = []  # replaced buffers: captured CUDA graphs may still use them


def _split_locks(n: int, device: torch.device) -> torch.Tensor:
    """At least n int32 ticket counters, all zero between launches (the kernel resets the ones
    it used), allocated once per device: a buffer per call would cost a fill kernel per step."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:
        if locks is not None:
            _OLD_LOCKS.append(locks)
        # A normal tensor even when first asked for under inference_mode (an engine step): the
        # kernel updates it in place, which an inference tensor refuses outside that mode.
        with torch.inference_mode(False):
            locks = _LOCKS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return locks


def _attn_spec(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    qsl: torch.Tensor,
    batch: int,
    scale: float,
    causal: bool,
    paged: bool,
    max_query_len: int,
    plan: AttentionPlan,
    rope: _Rope | None = None,
) -> tuple[tuple, tuple, dict]:
    """(grid, args, kwargs) of the attention kernel's launch (checked inputs)."""
    t, h_q, d = query.shape
    h_kv = k.shape[-2]
    group = h_q // h_kv
    group_p = next_pow2(group)
    block_d = max(16, next_pow2(d))
    if plan.block_q * group_p < 16 or plan.block_n < 16:
        raise ValueError(f"{plan}: tl.dot needs >= 16 rows (block_q * {group_p}) and block_n >= 16")
    tiles = max(1, -(-max_query_len // plan.block_q))
    splits = plan.num_splits
    if splits > 1:
        ws_acc = torch.empty((splits, t, h_q, block_d), dtype=torch.float32, device=query.device)
        ws_m = torch.empty((splits, t, h_q), dtype=torch.float32, device=query.device)
        ws_l = torch.empty((splits, t, h_q), dtype=torch.float32, device=query.device)
        locks = _split_locks(batch * tiles * h_kv, query.device)
    else:
        ws_acc = ws_m = ws_l = locks = out  # unused
    if paged:
        kb, ks, kh = k.stride(0), k.stride(1), k.stride(2)
        vb, vs, vh = v.stride(0), v.stride(1), v.stride(2)
        bt, block_size = tables.stride(0), k.shape[1]
    else:
        kb, ks, kh = 0, k.stride(0), k.stride(1)
        vb, vs, vh = 0, v.stride(0), v.stride(1)
        bt, block_size = 0, 1
    pad_programs = -(-t // plan.block_q)
    grid = (batch * tiles + pad_programs, h_kv, splits)
    dot_fp32 = query.dtype == torch.float32 or (INTERPRET and query.dtype == torch.bfloat16)
    args = (
        query,
        k,
        v,
        out,
        tables,
        seq_lens,
        qsl,
        ws_acc,
        ws_m,
        ws_l,
        locks,
        *(
            (rope.q_weight, rope.k_weight, rope.cos, rope.sin, rope.slot_mapping, rope.eps)
            if rope is not None
            else (out, out, out, out, out, 0.0)
        ),
        rope.cos.stride(0) if rope is not None else 0,
        rope.sin.stride(0) if rope is not None else 0,
        batch,
        t,
        splits,
        plan.min_split_iters,
        h_q,
        d,
        tiles,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kb,
        ks,
        kh,
        vb,
        vs,
        vh,
        bt,
        block_size,
    )
    kwargs = dict(
        GROUP=group,
        GROUP_P=group_p,
        BLOCK_Q=plan.block_q,
        BLOCK_M=plan.block_q * group_p,
        BLOCK_N=plan.block_n,
        BLOCK_D=block_d,
        PAGED=paged,
        CAUSAL=causal,
        SPLIT=splits > 1,
        DOT_FP32=dot_fp32,
        FUSE_ROPE=rope is not None,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return grid, args, kwargs


def _check_query(query: torch.Tensor, h_kv: int, d_kv: int) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [T, H_q, D], got {list(query.shape)}")
    _, h_q, d = query.shape
    if d != d_kv or h_q % h_kv:
        raise ValueError(f"query [.., {h_q}, {d}] incompatible with K/V [.., {h_kv}, {d_kv}]")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"Triton attention supports fp16/bf16/fp32, got {query.dtype}")


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    plan: AttentionPlan | None = None,
    out: torch.Tensor | None = None,
    _rope: _Rope | None = None,
) -> torch.Tensor:
    """Triton twin of ``reference.paged_attention`` (same arguments and result, see there).

    ``max_query_len`` / ``max_seq_len``: pass them when known (AttentionMetadata has both) to
    avoid a device sync; ``max_query_len`` sizes the grid, ``max_seq_len`` only the context
    split. For CUDA-graph capture pass ``max_query_len`` and a fixed ``plan``. K/V dtype may
    differ from the query's only for fp32 queries; the output has the query's dtype.
    """
    t, h_q, d = query.shape
    _, _, h_kv, d_kv = k_cache.shape
    _check_query(query, h_kv, d_kv)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
    batch = seq_lens.shape[0]
    if query_start_loc.shape != (batch + 1,):
        raise ValueError(f"query_start_loc needs B+1={batch + 1} entries, got {list(query_start_loc.shape)}")
    check_triton_device(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if query.stride(2) != 1:
        query = query.contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache / v_cache need unit stride along D")
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if t == 0 or batch == 0:
        return out.zero_()
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())  # device sync
    if max_seq_len is None and plan is None and not _capturing():
        max_seq_len = int(seq_lens.max())  # device sync
    if plan is None:
        plan = plan_attention(batch, h_q, h_kv, d, max_query_len, max_seq_len, query.device)
    grid, args, kwargs = _attn_spec(
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        batch,
        scale,
        causal,
        True,
        max(1, max_query_len),
        plan,
        _rope,
    )
    _attn_kernel[grid](*args, **kwargs)
    return out


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
    *,
    max_seq_len: int | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """``reference.qk_norm_rope_kv`` then causal ``paged_attention`` in one kernel, for steps
    where every sequence has at most one new token (decode): q/k RMSNorm and rotary, the new
    K/V written to the cache, attention over the context. Arguments as those two functions'
    (qkv ``[T, (H_q + 2 H_kv) D]``); returns ``[T, H_q, D]``."""
    t = qkv.shape[0]
    d = q_weight.shape[0]
    h_kv = k_cache.shape[2]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * h_kv) * d or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be [T, ({num_heads} + 2*{h_kv}) * {d}] with unit stride, got {list(qkv.shape)}"
        )
    if d % 2 or k_weight.shape != (d,) or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"norm weights [{d}] (even) and cos/sin [{t}, {d}] expected")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [T={t}], got {list(slot_mapping.shape)}")
    check_triton_device(qkv, q_weight, k_weight, cos, sin, slot_mapping)
    query, rope = _decode_inputs(qkv, q_weight, k_weight, eps, cos, sin, slot_mapping, num_heads)
    return paged_attention(
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        max_query_len=1,
        max_seq_len=max_seq_len,
        plan=plan,
        _rope=rope,
    )


def _decode_inputs(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, _Rope]:
    """decode_attention's query (a view of qkv) and what the kernel fuses in front."""
    t, d = qkv.shape[0], q_weight.shape[0]
    query = qkv[:, : num_heads * d].view(t, num_heads, d)  # row stride: qkv's
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    return query, _Rope(q_weight.contiguous(), k_weight.contiguous(), eps, cos, sin, slot_mapping)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    *,
    max_seqlen: int | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Attention within each of B packed segments (the vision tower: full attention inside each
    image). q ``[T, H_q, D]``, k/v ``[T, H_kv, D]``, cu_seqlens int ``[B+1]``; twin of
    ``reference.varlen_attention``."""
    t, h_q, d = q.shape
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != t:
        raise ValueError(f"k/v must both be [T={t}, H_kv, D], got {list(k.shape)} and {list(v.shape)}")
    _check_query(q, k.shape[1], k.shape[2])
    check_triton_device(q, k, v, cu_seqlens)
    q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0 or batch <= 0:
        return out.zero_()
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # device sync
    scale = d**-0.5 if scale is None else scale
    if plan is None:
        plan = plan_attention(batch, h_q, k.shape[1], d, max_seqlen, None, q.device)
    grid, args, kwargs = _attn_spec(
        q,
        k,
        v,
        out,
        cu_seqlens,
        cu_seqlens,
        cu_seqlens,
        batch,
        scale,
        causal,
        False,
        max(1, max_seqlen),
        plan,
    )
    _attn_kernel[grid](*args, **kwargs)
    return out


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def attention_bytes(batch: int, ctx: int, h_kv: int, d: int, elem: int = 2) -> int:
    """K and V bytes one decode step over ``ctx`` tokens reads (for bandwidth reports)."""
    return 2 * batch * ctx * h_kv * d * elem


# What aot_launches enumerates through the plan heuristic: the SM counts of H200 / H100 SXM and
# H100 PCIe, decode batch sizes of any max_num_seqs up to 256 (past SMs / KV heads sequences
# the plan stops changing), query lengths and contexts either side of every threshold.
_AOT_SMS = (132, 114)
_AOT_BATCHES = range(1, 257)
_AOT_QUERY_LENS = (*range(1, 33), *(2**i for i in range(6, 15)))
_AOT_CONTEXTS = (1, 256, 1024, 32768)


def _aot_plans(
    h_q: int, h_kv: int, d: int, query_lens: tuple[int, ...], contexts: tuple[int | None, ...]
) -> dict[AttentionPlan, tuple[int, int, int | None]]:
    """Distinct plans -> a (batch, max_query_len, max_seq_len) that picks it. Split counts > 1
    fold into 2: num_splits is a run-time int (do_not_specialize), one binary serves them all."""
    plans: dict[AttentionPlan, tuple[int, int, int | None]] = {}
    for sms, b, q, ctx in itertools.product(_AOT_SMS, _AOT_BATCHES, query_lens, contexts):
        p = plan_for_sms(b, h_q, h_kv, d, q, ctx, sms)
        plans.setdefault(replace(p, num_splits=min(p.num_splits, 2)), (b, q, ctx))
    return plans


def _aot_label(plan: AttentionPlan) -> str:
    return (
        f"BLOCK_Q={plan.block_q} BLOCK_N={plan.block_n} SPLIT={plan.num_splits > 1} "
        f"warps={plan.num_warps} stages={plan.num_stages}"
    )


def aot_launches(dims, dtype: torch.dtype) -> Iterator:  # (build_check.ModelDims, dtype) -> Launch
    """Every variant the dispatchers pick at the model's shapes, on meta tensors (for
    kernels.build_check): decode (fused q/k norm + rotary) and prefill on the paged cache,
    the vision tower's dense per-image attention, the KV-cache write."""
    from kernels.build_check import Launch

    meta = torch.device("meta")
    h_q, h_kv, d, bs = dims.heads, dims.kv_heads, dims.head_dim, dims.block_size

    def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device=meta)

    def paged(label: str, plans: dict, decode: bool) -> Iterator[Launch]:
        for plan, (b, q, ctx) in plans.items():
            t, blocks = b * q, -(-ctx // bs)
            k_cache, v_cache = empty(b * blocks, bs, h_kv, d), empty(b * blocks, bs, h_kv, d)
            rope = None
            if decode:
                w, cs = empty(d), empty(t, d)
                qkv = empty(t, (h_q + 2 * h_kv) * d)
                query, rope = _decode_inputs(qkv, w, w, 1e-6, cs, cs, empty(t, dt=torch.long), h_q)
            else:
                query = empty(t, h_q, d)  # qk_norm_rope_kv's output
            out = torch.empty_like(query, memory_format=torch.contiguous_format)
            lens = (empty(b, blocks, dt=torch.long), empty(b, dt=torch.long), empty(b + 1, dt=torch.long))
            _, args, kwargs = _attn_spec(
                query, k_cache, v_cache, out, *lens, b, d**-0.5, True, True, q, plan, rope
            )
            yield Launch(f"{label} {_aot_label(plan)}", _attn_kernel, args, kwargs)

    yield from paged("decode", _aot_plans(h_q, h_kv, d, (1,), _AOT_CONTEXTS), decode=True)
    # the server sends max_query_len 1 to decode_attention; paged_attention picks a prefill plan for it
    yield from paged("prefill", _aot_plans(h_q, h_kv, d, _AOT_QUERY_LENS, _AOT_CONTEXTS), decode=False)

    vh = dims.vision_heads
    vd = dims.vision_hidden // vh
    for plan, (b, q, _) in _aot_plans(vh, vh, vd, _AOT_QUERY_LENS, (None,)).items():
        x, cu = empty(b * q, vh, vd), empty(b + 1, dt=torch.long)
        _, args, kwargs = _attn_spec(
            x, x, x, torch.empty_like(x), cu, cu, cu, b, vd**-0.5, False, False, q, plan
        )
        yield Launch(f"vision {_aot_label(plan)}", _attn_kernel, args, kwargs)

    kv, slots = empty(1, h_kv, d), empty(1, dt=torch.long)
    cache = empty(1, bs, h_kv, d)
    kernel, _, args, kwargs = _write_kv_spec(kv, kv, cache, cache, slots)
    yield Launch("write_kv", kernel, args, kwargs)
