"""Paged attention in plain torch for the CPU path: the same contract as
``reference.paged_attention`` (its oracle), built on torch's fused SDPA.

The reference gathers, upcasts and repeats each sequence's keys per query head and runs five
ops per sequence; on CPU every op is a parallel region whose barrier waits on the slowest
thread, so that is where a decode step went (45 % of a real-shape batch-1 step, 88 % of a demo
server under load). Here all decode rows (one query token each) run as one batched SDPA call
over a gathered, padded context, and a prefill chunk as one call: a handful of ops per layer.

GQA without repeating K/V: the query heads of one KV head are laid out as extra query rows of
that head (rows ordered group-major, then token), so SDPA sees ``H_kv`` heads with
``group * q_len`` rows each; a boolean mask carries the padding and the causal limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows run as one SDPA call: their sequences, query tokens, the blocks of the
    longest context and which of its positions each row owns."""

    rows: torch.Tensor  # long [n]: sequence indices
    tokens: torch.Tensor  # long [n]: their query rows
    longest: int
    valid: torch.Tensor  # bool [n, longest]


@dataclass(frozen=True)
class StepPlan:
    """What every layer of a step shares (built once per step, not per layer): the decode
    groups and the (sequence, seq_len, first query row, q_len) of each multi-token chunk."""

    decode: list[DecodeGroup]
    chunks: list[tuple[int, int, int, int]]


def plan_step(
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, table_width: int
) -> StepPlan:
    """The lengths are read on the host (``tolist``): the CPU path, or a GPU that fell back here."""
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    if len(qsl) != len(lens) + 1:
        raise ValueError(f"query_start_loc needs B+1={len(lens) + 1} entries, got {len(qsl)}")
    q_lens = [qsl[b + 1] - qsl[b] for b in range(len(lens))]
    for b, (q_len, seq_len) in enumerate(zip(q_lens, lens)):
        if q_len > seq_len or -(-seq_len // block_size) > table_width:
            raise ValueError(
                f"sequence {b}: {q_len} query tokens, seq_len {seq_len}, table width {table_width}"
            )
    dev = seq_lens.device
    decode = []
    for rows in decode_groups([b for b, q_len in enumerate(q_lens) if q_len == 1], lens):
        longest = lens[rows[0]]  # groups are longest first
        own = torch.tensor([lens[b] for b in rows], device=dev)
        valid = torch.arange(longest, device=dev) < own[:, None]
        index = torch.tensor(rows, device=dev)
        decode.append(DecodeGroup(index, torch.tensor([qsl[b] for b in rows], device=dev), longest, valid))
    chunks = [(b, lens[b], qsl[b], q_len) for b, q_len in enumerate(q_lens) if q_len > 1]
    return StepPlan(decode, chunks)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """``reference.paged_attention``'s arguments and result (``[T, H_q, D]``, padding rows zero).
    `plan`: the step's ``plan_step`` (made here when None)."""
    h_q, d = query.shape[1:]
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != d or h_q % h_kv:
        raise ValueError(f"query [.., {h_q}, {d}] incompatible with cache {list(k_cache.shape)}")
    if plan is None:
        plan = plan_step(seq_lens, query_start_loc, block_size, block_tables.shape[1])
    out = torch.zeros_like(query)
    for group in plan.decode:
        _decode(query, k_cache, v_cache, block_tables, group, scale, out)
    for b, seq_len, start, q_len in plan.chunks:
        _chunk(query, k_cache, v_cache, block_tables[b], seq_len, start, q_len, scale, causal, out)
    return out


# Padding a decode group to its longest context costs (rows x longest) gathered tokens; one
# long sequence among many short ones must not multiply the step's memory by the batch size.
PAD_SLACK_TOKENS = 16384


def decode_groups(rows: list[int], lens: list[int]) -> list[list[int]]:
    """The decode rows split into groups run as one SDPA call each: longest first, a group
    closed when padding it would gather more than twice its real tokens plus a slack."""
    groups: list[list[int]] = []
    real = 0
    for b in sorted(rows, key=lambda b: -lens[b]):
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= 2 * (real + lens[b]) + PAD_SLACK_TOKENS:
            groups[-1].append(b)
            real += lens[b]
        else:
            groups.append([b])
            real = lens[b]
    return groups


def _gather(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[..., n_blocks] block ids -> [..., H_kv, seq_len, D] in position order."""
    x = cache[blocks.clamp(min=0)]  # [..., n_blocks, block_size, H_kv, D]; -1 (no block) is masked
    x = x.flatten(-4, -3)[..., :seq_len, :, :]
    return x.transpose(-3, -2)


def _decode(query, k_cache, v_cache, block_tables, group: DecodeGroup, scale, out) -> None:
    """One decode group at once: [n, H_kv, group, D] queries over a padded context."""
    h_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    n = len(group.tokens)
    blocks = block_tables[group.rows, : -(-group.longest // block_size)].long()
    # Slots past a shorter sequence's end hold anything (another sequence's data, NaN): zero
    # them, since a masked score still multiplies its V row by 0 (NaN * 0 = NaN).
    pad = ~group.valid[:, None, :, None]
    k = _gather(k_cache, blocks, group.longest).to(query.dtype).masked_fill_(pad, 0)  # [n, H_kv, S, D]
    v = _gather(v_cache, blocks, group.longest).to(query.dtype).masked_fill_(pad, 0)
    q = query[group.tokens].view(n, h_kv, query.shape[1] // h_kv, -1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=group.valid[:, None, None, :], scale=scale)
    out[group.tokens] = y.reshape(n, -1, query.shape[2])


def _chunk(query, k_cache, v_cache, table, seq_len, start, q_len, scale, causal, out) -> None:
    """One sequence's q_len > 1 new tokens (a prefill chunk, maybe over a cached prefix)."""
    h_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    h_q, d = query.shape[1], query.shape[2]
    group = h_q // h_kv
    blocks = table[: -(-seq_len // block_size)].long()
    k = _gather(k_cache, blocks, seq_len).to(query.dtype)  # [H_kv, S, D]
    v = _gather(v_cache, blocks, seq_len).to(query.dtype)
    # [q_len, H_q, D] -> [H_kv, group * q_len, D], rows group-major then token
    q = query[start : start + q_len].view(q_len, h_kv, group, d).permute(1, 2, 0, 3).reshape(h_kv, -1, d)
    mask = None
    if causal:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).repeat(group)  # each row's
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [H_kv, group*q_len, D]
    out[start : start + q_len] = y.view(h_kv, group, q_len, d).permute(2, 0, 1, 3).reshape(q_len, h_q, d)
