"""kernels.reference: paged KV cache write + varlen paged attention vs dense attention; norms."""

from __future__ import annotations

import math

import pytest
import torch
from paged_batches import SPECS

from kernels import reference

BLOCK = 16


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float):
    """q [q_len, Hq, D] at positions q_start.., k/v [ctx, Hkv, D] -> [q_len, Hq, D], fp64, explicit loops."""
    q_len, h_q, _ = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(h_q):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(q_len):
            visible = q_start + i + 1  # keys 0..p
            s = (kh[:visible] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, dim=0) @ vh[:visible]
    return out


def build_batch(seq_specs, h_q=4, h_kv=2, d=32, dtype=torch.float32, seed=0, num_blocks=64):
    """seq_specs: list of (context_len, q_len). Returns everything paged_attention needs + dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, BLOCK, h_kv, d, generator=gen).to(dtype)  # garbage in unused slots
    v_cache = torch.randn(num_blocks, BLOCK, h_kv, d, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled physical blocks
    max_blocks = max(math.ceil(c / BLOCK) for c, _ in seq_specs) + 1
    tables = torch.full((len(seq_specs), max_blocks), -1, dtype=torch.int32)
    keys, values, queries, slot_maps = [], [], [], []
    for b, (ctx, q_len) in enumerate(seq_specs):
        nb = math.ceil(ctx / BLOCK)
        blocks = [free.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(blocks)
        keys.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        values.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        queries.append(torch.randn(q_len, h_q, d, generator=gen).to(dtype))
        pos = torch.arange(ctx)
        slot_maps.append(torch.tensor(blocks)[pos // BLOCK] * BLOCK + pos % BLOCK)
    # Write every context token (prefix + new) through write_kv_cache, like the engine does.
    reference.write_kv_cache(
        torch.cat(keys), torch.cat(values), k_cache, v_cache, torch.cat(slot_maps).to(torch.int64)
    )
    q_lens = [q for _, q in seq_specs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c for c, _ in seq_specs], dtype=torch.int32)
    return dict(
        query=torch.cat(queries),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables,
        seq_lens=seq_lens,
        query_start_loc=qsl,
        keys=keys,
        values=values,
        queries=queries,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_attention_matches_dense(dtype: torch.dtype) -> None:
    d = 32
    batch = build_batch(SPECS, h_q=4, h_kv=2, d=d, dtype=dtype, seed=1)
    scale = d**-0.5
    out = reference.paged_attention(
        batch["query"],
        batch["k_cache"],
        batch["v_cache"],
        batch["block_tables"],
        batch["seq_lens"],
        batch["query_start_loc"],
        scale,
    )
    assert out.dtype == dtype and out.shape == batch["query"].shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    qsl = batch["query_start_loc"].tolist()
    for b, (ctx, q_len) in enumerate(SPECS):
        ref = dense_causal_attention(
            batch["queries"][b], batch["keys"][b], batch["values"][b], ctx - q_len, scale
        )
        got = out[qsl[b] : qsl[b + 1]].double()
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=f"sequence {b} {SPECS[b]}")


def test_paged_attention_non_causal_and_mha() -> None:
    specs = [(20, 20), (33, 5)]
    batch = build_batch(specs, h_q=2, h_kv=2, d=16, seed=2)
    out = reference.paged_attention(
        batch["query"],
        batch["k_cache"],
        batch["v_cache"],
        batch["block_tables"],
        batch["seq_lens"],
        batch["query_start_loc"],
        0.3,
        causal=False,
    )
    qsl = batch["query_start_loc"].tolist()
    for b in range(len(specs)):
        q, k, v = batch["queries"][b], batch["keys"][b], batch["values"][b]
        s = torch.einsum("qhd,khd->hqk", q, k) * 0.3
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]], ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_rejects_bad_inputs() -> None:
    batch = build_batch([(10, 4)], seed=3)
    args = (batch["query"], batch["k_cache"], batch["v_cache"], batch["block_tables"])
    with pytest.raises(ValueError, match="query tokens"):
        reference.paged_attention(*args, torch.tensor([3]), batch["query_start_loc"], 1.0)
    with pytest.raises(ValueError, match="blocks"):
        reference.paged_attention(*args, torch.tensor([10_000]), batch["query_start_loc"], 1.0)


def test_write_kv_cache_skips_padding() -> None:
    gen = torch.Generator().manual_seed(4)
    k_cache = torch.randn(4, BLOCK, 2, 8, generator=gen)
    v_cache = torch.randn(4, BLOCK, 2, 8, generator=gen)
    k0, v0 = k_cache.clone(), v_cache.clone()
    key = torch.randn(5, 2, 8, generator=gen)
    value = torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([3 * BLOCK + 2, -1, 0, -1, BLOCK + 15], dtype=torch.int64)
    reference.write_kv_cache(key, value, k_cache, v_cache, slots)
    written = {(3, 2): 0, (0, 0): 2, (1, 15): 4}
    for blk in range(4):
        for off in range(BLOCK):
            if (blk, off) in written:
                t = written[(blk, off)]
                assert torch.equal(k_cache[blk, off], key[t]) and torch.equal(v_cache[blk, off], value[t])
            else:  # padding tokens (-1) and untouched slots keep their old contents
                assert torch.equal(k_cache[blk, off], k0[blk, off])
                assert torch.equal(v_cache[blk, off], v0[blk, off])
    # dtype conversion into a bf16 cache, and an out-of-range slot is refused
    kb, vb = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    reference.write_kv_cache(key, value, kb, vb, slots)
    assert torch.equal(kb[3, 2], key[0].to(torch.bfloat16))
    with pytest.raises(ValueError, match="out of range"):
        reference.write_kv_cache(key[:1], value[:1], k_cache, v_cache, torch.tensor([4 * BLOCK]))


def test_rms_norm_and_silu_and_mul() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 64, generator=gen).to(torch.bfloat16)
    w = (torch.rand(64, generator=gen) + 0.5).to(torch.bfloat16)
    y = reference.rms_norm(x, w, 1e-6)
    x64 = x.double()
    ref = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=1.6e-2, atol=1e-2)

    g = torch.randn(5, 2 * 48, generator=gen).to(torch.float16)
    out = reference.silu_and_mul(g)
    gate, up = g[:, :48].double(), g[:, 48:].double()
    assert out.dtype == torch.float16 and out.shape == (5, 48)
    torch.testing.assert_close(out.double(), gate * torch.sigmoid(gate) * up, rtol=2e-3, atol=2e-3)
