"""Paged-attention test batches shared by the Triton and the plain-torch attention tests:
random K/V written into a NaN-poisoned cache of shuffled blocks, so a read of a slot a
sequence does not own (or a missed write) shows as NaN."""

from __future__ import annotations

import math

import torch

from kernels import reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
BLOCK = 16

SPECS = [
    (37, 37),  # prefill, no prefix, partial last block
    (16, 16),  # exactly one block
    (70, 1),  # decode
    (50, 13),  # prefill over a cached prefix of 37
    (1, 1),  # first token
    (129, 1),  # decode, many blocks
    (96, 40),  # chunked prefill ending on a block boundary
]


TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
BLOCK = 16


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_batch(specs, h_q, h_kv, d, dtype, seed, pad_rows=0, num_blocks=None, device="cpu"):
    """specs: (context_len, q_len) per sequence. K/V of every context token written through the
    reference writer into a NaN-poisoned cache of shuffled blocks; tables padded with -1."""
    gen = torch.Generator().manual_seed(seed)
    need = sum(math.ceil(c / BLOCK) for c, _ in specs)
    num_blocks = num_blocks or need + 3
    k_cache = torch.full((num_blocks, BLOCK, h_kv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((num_blocks, BLOCK, h_kv, d), float("nan"), dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(math.ceil(c / BLOCK) for c, _ in specs) + 1
    tables = torch.full((len(specs), max_blocks), -1, dtype=torch.int32)
    keys, values, queries, slots = [], [], [], []
    for b, (ctx, q_len) in enumerate(specs):
        blocks = [free.pop() for _ in range(math.ceil(ctx / BLOCK))]
        tables[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        keys.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        values.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        queries.append(torch.randn(q_len, h_q, d, generator=gen).to(dtype))
        pos = torch.arange(ctx)
        slots.append(torch.tensor(blocks, dtype=torch.int64)[pos // BLOCK] * BLOCK + pos % BLOCK)
    reference.write_kv_cache(torch.cat(keys), torch.cat(values), k_cache, v_cache, torch.cat(slots))
    query = torch.cat([*queries, torch.randn(pad_rows, h_q, d, generator=gen).to(dtype)])
    qsl = torch.tensor([0, *torch.tensor([q for _, q in specs]).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32)
    return [t.to(device) for t in (query, k_cache, v_cache, tables, seq_lens, qsl)]
