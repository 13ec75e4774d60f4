"""Triton KV-cache write, paged attention and varlen (vision) attention vs kernels.reference.

CPU: Triton interpreter (see tests/test_triton_qmatmul.py for how TRITON_INTERPRET is set);
GPU: the same tests on CUDA tensors. Outputs and untouched cache slots are NaN-poisoned, so a
missed write or a write to the wrong slot fails.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import paged_batches
import pytest
from paged_batches import BLOCK, SPECS, TOL, rel_err

from kernels import attention, reference
from kernels import triton_utils as tu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)


def make_batch(*args, **kwargs):
    return paged_batches.make_batch(*args, device=DEVICE, **kwargs)


def run_and_check(args, scale, causal, plan=None, max_query_len=None) -> None:
    query = args[0]
    out = torch.full_like(query, float("nan"))
    y = attention.paged_attention(*args, scale, causal, max_query_len=max_query_len, plan=plan, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} elements unwritten"
    ref = reference.paged_attention(*[a.cpu() for a in args], scale, causal)
    err = rel_err(y.cpu(), ref)
    assert err < TOL[query.dtype], f"rel err {err:.2e} (plan {plan})"
    if query.dtype == torch.bfloat16 and tu.INTERPRET:
        # fp32 inside, rounded once at the store (as the reference): nearly all bits agree. A
        # computation in the interpreter's broken bf16 arithmetic would not.
        total_rows = int(args[5][-1])
        same = (y[:total_rows].cpu() == ref[:total_rows]).float().mean().item()
        assert same > 0.9, f"only {same:.0%} of results bit-equal to the reference"
    total = int(args[5][-1])
    assert (y[total:] == 0).all()  # padding rows are zero, like the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("h_q", "h_kv", "d"), [(4, 2, 32), (6, 2, 24), (4, 4, 64)])
def test_paged_attention_matches_reference(dtype: torch.dtype, h_q: int, h_kv: int, d: int) -> None:
    # GQA 2:1, a non-power-of-two group (3) with a non-power-of-two head_dim, and MHA.
    args = make_batch(SPECS, h_q, h_kv, d, dtype, seed=h_q * 100 + d, pad_rows=3)
    run_and_check(args, d**-0.5, True)
    if dtype == torch.float32:  # tile variants: several query tiles per sequence, tiny K/V tiles
        block_q = max(8, 16 // tu.next_pow2(h_q // h_kv))  # >= 16 rows per tile (tl.dot)
        run_and_check(args, 0.3, True, attention.AttentionPlan(block_q=block_q, block_n=16), max_query_len=40)
        run_and_check(args, 0.3, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_context(dtype: torch.dtype) -> None:
    # Flash-decoding path: the context split over programs, then merged; a split can be empty.
    specs = [(70, 1), (1, 1), (129, 1), (33, 1)]
    args = make_batch(specs, 4, 2, 32, dtype, seed=5, pad_rows=2)
    for splits in (2, 3):  # every split in use (min_split_iters=1), some of them empty
        plan = attention.AttentionPlan(block_q=8, block_n=16, num_splits=splits, min_split_iters=1)
        run_and_check(args, 0.2, True, plan)
    # the heuristic picks a split on its own for a tiny batch with long contexts
    plan = attention.plan_attention(1, 4, 2, 128, 1, 4096, torch.device(DEVICE))
    assert plan.num_splits > 1 and plan.block_q * 2 >= 16


@pytest.mark.parametrize("fused", [False, True])
def test_each_tile_splits_only_as_far_as_its_own_context_fills(fused: bool) -> None:
    """A plan bounds the splits (a CUDA graph's is made for max_model_len); each tile uses
    min(num_splits, its K/V tiles // min_split_iters), at least 1, read from seq_lens on the
    device. Contexts on both sides of each threshold (block_n 16, 4 tiles per split, at most
    3 splits: 1, 1, 1, 2, 2, 3, 3 splits), merged or stored directly, all equal the reference;
    the tickets of the tiles that split are reset; with a huge min_split_iters every tile runs
    unsplit (no merge). A kernel merging over the plan's split count instead of the tile's
    would wait for tickets that never come and leave rows unwritten (NaN-poisoned out). The
    unsplit tiles take no ticket: their counters, preset to a stale 7, stay 7 and their rows
    are right (a tile that split with a stale counter would never merge)."""
    contexts = [1, 49, 64, 113, 128, 193, 208]  # K/V tiles of 16: 1, 4, 4, 8, 8, 13, 13 (decode: -1)
    locks = attention._split_locks(4096, torch.device(DEVICE))
    for min_iters in (4, 10**6):
        plan = attention.AttentionPlan(block_q=8, block_n=16, num_splits=3, min_split_iters=min_iters)
        unsplit = 3 if min_iters == 4 else len(contexts)  # decode tiles: lock = tile * 2 KV heads + head
        locks[: 2 * unsplit] = 7
        if fused:
            args = _decode_batch(contexts, 4, 2, 32, torch.float32, seed=11, pad_rows=1)
            ref = reference.decode_attention(**_on(args, "cpu"))
            y = attention.decode_attention(**_on(args, DEVICE), plan=plan).cpu()
            assert torch.isfinite(y).all() and rel_err(y, ref) < TOL[torch.float32]
        else:
            args = make_batch([(c, 1) for c in contexts], 4, 2, 32, torch.float32, seed=10, pad_rows=1)
            run_and_check(args, 0.2, True, plan)
        assert (locks[: 2 * unsplit] == 7).all(), "a tile with a short context took a ticket"
        locks[: 2 * unsplit] = 0
        assert int(locks.abs().sum()) == 0


def test_plans_split_long_contexts_until_the_sms_have_two_programs_each() -> None:
    # 132 SMs, the real model's 16 / 8 heads of 128: batch 1 and 24 split a long context
    # (24 x 8 = 192 programs < 2 x 132: 2 splits), batch 64 does not; a 50-token bound none.
    plan = attention.plan_for_sms
    assert plan(1, 16, 8, 128, 1, 32768, 132).num_splits == 16
    assert plan(24, 16, 8, 128, 1, 32768, 132).num_splits == 2
    assert plan(64, 16, 8, 128, 1, 32768, 132).num_splits == 1
    assert plan(1, 16, 8, 128, 1, 50, 132).num_splits == 1


def test_split_merge_in_kernel_resets_its_tickets_and_a_stale_ticket_is_caught() -> None:
    """The last split of each tile merges the partials (no second kernel); it leaves its
    ticket counters at zero, so the next launch (a graph replay) merges again. A counter left
    non-zero (a mutated kernel that forgot the reset) leaves rows unwritten: caught."""
    specs = [(70, 1), (129, 1), (33, 1)]
    args = make_batch(specs, 4, 2, 32, torch.float32, seed=6)
    plan = attention.AttentionPlan(block_q=8, block_n=16, num_splits=3, min_split_iters=1)
    for _ in range(2):
        run_and_check(args, 0.2, True, plan)
        assert int(attention._LOCKS[args[0].device].abs().sum()) == 0
    attention._LOCKS[args[0].device][1] = 3  # program 0, KV head 1: not reset after a launch
    out = torch.full_like(args[0], float("nan"))
    attention.paged_attention(*args, 0.2, True, max_query_len=1, plan=plan, out=out)
    assert not torch.isfinite(out).all()
    attention._LOCKS[args[0].device].zero_()


def test_ticket_counters_first_made_under_inference_mode_work_outside_it() -> None:
    """The engine's first split launch runs under inference_mode; the counters it allocates must
    still be usable by a later launch outside it (a test, a tuner): an inference tensor is not."""
    specs = [(70, 1), (33, 1)]
    args = make_batch(specs, 4, 2, 32, torch.float32, seed=7)
    plan = attention.AttentionPlan(block_q=8, block_n=16, num_splits=3, min_split_iters=1)
    saved = attention._LOCKS.pop(args[0].device, None)
    try:
        with torch.inference_mode():
            run_and_check(args, 0.2, True, plan)
        assert not attention._LOCKS[args[0].device].is_inference()
        run_and_check(args, 0.2, True, plan)
        assert int(attention._LOCKS[args[0].device].abs().sum()) == 0
    finally:
        if saved is not None:
            attention._LOCKS[args[0].device] = saved


def test_per_step_integers_compile_no_new_variants() -> None:
    """Batch size, token count, query tiles and split count change from step to step; Triton
    would specialize ints (== 1, % 16) and compile a new variant mid-traffic. The interpreter
    compiles nothing, so the declaration is what is checked here."""
    kernel = attention._attn_kernel
    declared = kernel.kwargs["do_not_specialize"] if tu.INTERPRET else kernel.do_not_specialize
    names = [kernel.arg_names[i] if isinstance(i, int) else i for i in declared]
    assert {"B", "T", "TILES", "num_splits"} <= set(names)


def test_split_context_with_prefill_chunk() -> None:
    # Splits with several query rows: some rows see none of a late split's keys (causal).
    args = make_batch([(50, 13), (40, 40)], 4, 2, 32, torch.float32, seed=8)
    run_and_check(
        args, 0.2, True, attention.AttentionPlan(block_q=8, block_n=16, num_splits=3, min_split_iters=1)
    )


def test_all_rows_padding_and_empty_sequences() -> None:
    args = make_batch([(20, 3), (5, 1)], 4, 2, 32, torch.float16, seed=2, pad_rows=4)
    # a sequence with no new tokens this step (q_len 0) between the others
    query, k_cache, v_cache, tables, seq_lens, qsl = args
    qsl = torch.tensor([0, 3, 3, 4], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([20, 9, 5], dtype=torch.int32, device=DEVICE)
    tables = torch.cat([tables[:1], tables[:1], tables[1:]])
    run_and_check([query, k_cache, v_cache, tables, seq_lens, qsl], 0.2, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    t, h, d, blocks = 11, 2, 24, 4
    # key/value as strided views of a fused qkv row, like the model's split
    qkv = torch.randn(t, 3 * h * d, generator=gen).to(dtype)
    key = qkv[:, h * d : 2 * h * d].view(t, h, d)
    value = qkv[:, 2 * h * d :].view(t, h, d)
    slots = torch.randperm(blocks * BLOCK, generator=gen)[:t]
    slots[[2, 7]] = -1  # padding tokens: skipped
    caches = [torch.full((blocks, BLOCK, h, d), float("nan"), dtype=dtype) for _ in range(4)]
    reference.write_kv_cache(key, value, caches[0], caches[1], slots)
    kc, vc = caches[2].to(DEVICE), caches[3].to(DEVICE)
    attention.write_kv_cache(key.to(DEVICE), value.to(DEVICE), kc, vc, slots.to(DEVICE))
    # bit-identical, including which slots stayed NaN
    assert torch.equal(kc.cpu().nan_to_num(7.0), caches[0].nan_to_num(7.0))
    assert torch.equal(vc.cpu().nan_to_num(7.0), caches[1].nan_to_num(7.0))
    assert int(torch.isnan(kc).any(-1).any(-1).sum()) == blocks * BLOCK - (t - 2)


def test_write_kv_cache_casts_to_cache_dtype() -> None:
    key = torch.randn(5, 2, 16, device=DEVICE)
    cache = torch.zeros(2, BLOCK, 2, 16, dtype=torch.bfloat16, device=DEVICE)
    cache_v = torch.zeros_like(cache)
    slots = torch.arange(5, device=DEVICE) + 3
    attention.write_kv_cache(key, key, cache, cache_v, slots)
    # round to nearest even, as torch does (the interpreter alone would truncate)
    assert torch.equal(cache[0, 3:8], key.to(torch.bfloat16))
    with pytest.raises(ValueError, match="slot_mapping"):
        attention.write_kv_cache(key, key, cache, cache_v, slots[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_attention(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    lens = [20, 0, 7, 33]  # images of different sizes, one empty segment
    t, h, d = sum(lens), 4, 16
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    y = attention.varlen_attention(q, k, v, cu)
    ref = reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu())
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < TOL[dtype]
    yc = attention.varlen_attention(q, k, v, cu, 0.5, causal=True)
    assert (
        rel_err(yc.cpu(), reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), 0.5, True))
        < TOL[dtype]
    )


def test_reference_varlen_attention_is_sdpa_per_segment() -> None:
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(14, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(14, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(14, 2, 8, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, 14])
    out = reference.varlen_attention(q, k, v, cu)
    for s, e in ((0, 5), (5, 14)):
        kk = k[s:e].repeat_interleave(2, dim=1).transpose(0, 1)
        vv = v[s:e].repeat_interleave(2, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[s:e].transpose(0, 1), kk, vv)
        torch.testing.assert_close(out[s:e], want.transpose(0, 1), rtol=1e-5, atol=1e-6)  # fp32 inside


def test_argument_checks() -> None:
    args = make_batch([(20, 3)], 4, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="16 rows"):
        attention.paged_attention(*args, 0.1, plan=attention.AttentionPlan(block_q=4))
    with pytest.raises(ValueError, match="incompatible"):
        attention.paged_attention(args[0][:, :3], *args[1:], 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        attention.paged_attention(*args[:5], args[5][:1], 0.1)


def _decode_batch(contexts, h_q, h_kv, d, dtype, seed, pad_rows=0):
    """Decode step inputs: each sequence's context K/V in a NaN-poisoned cache (via
    make_batch), one new token per sequence as a qkv row, padding rows with slot -1."""
    _, k_cache, v_cache, tables, seq_lens, qsl = make_batch(
        [(c, 1) for c in contexts], h_q, h_kv, d, dtype, seed, pad_rows=pad_rows
    )
    gen = torch.Generator().manual_seed(seed + 1)
    t = len(contexts) + pad_rows
    qkv = (torch.randn(t, (h_q + 2 * h_kv) * d, generator=gen) * 2).to(dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 40
    angles = torch.cat([angles, angles], dim=-1)
    tab = tables.cpu().long()
    slots = [int(tab[b, (c - 1) // BLOCK]) * BLOCK + (c - 1) % BLOCK for b, c in enumerate(contexts)]
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    for cache in (k_cache, v_cache):  # the new tokens' slots: written by the step, read by none
        cache.view(-1, h_kv, d)[slots] = float("nan")
    args = dict(
        qkv=qkv,
        q_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
        k_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
        eps=1e-6,
        cos=angles.cos().to(dtype),
        sin=angles.sin().to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=torch.tensor(slots + [-1] * pad_rows),
        block_tables=tables.cpu(),
        seq_lens=seq_lens.cpu(),
        query_start_loc=qsl.cpu(),
        num_heads=h_q,
        scale=d**-0.5,
    )
    return args


def _on(args: dict, device: str) -> dict:
    return {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("h_q", "h_kv", "d", "splits"), [(4, 2, 32, 1), (4, 2, 32, 3), (6, 2, 24, 2)])
def test_decode_attention_fuses_norm_rope_and_kv_write(dtype, h_q, h_kv, d, splits) -> None:
    contexts = [70, 1, 129, 33]  # a first token (no cached context) among them
    args = _decode_batch(contexts, h_q, h_kv, d, dtype, seed=h_q + d + splits, pad_rows=2)
    ref_args = _on(args, "cpu")
    ref = reference.decode_attention(**ref_args)
    got_args = _on(args, DEVICE)
    block_q = 16 // tu.next_pow2(h_q // h_kv)
    plan = attention.AttentionPlan(block_q=block_q, block_n=16, num_splits=splits, min_split_iters=1)
    y = attention.decode_attention(**got_args, plan=plan).cpu()
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype]
    assert (y[len(contexts) :] == 0).all()  # padding rows
    # the new tokens' K/V are in their (NaN-poisoned) slots, nothing else changed
    slots = args["slot_mapping"][: len(contexts)]
    for name in ("k_cache", "v_cache"):
        got, want = got_args[name].cpu(), ref_args[name]
        assert torch.equal(got.isnan(), want.isnan())
        new = got.view(-1, h_kv, d)[slots]
        assert torch.isfinite(new).all()
        assert rel_err(new, want.view(-1, h_kv, d)[slots]) < TOL[dtype]
        rest_got, rest_want = got.clone().view(-1, h_kv, d), want.clone().view(-1, h_kv, d)
        rest_got[slots] = rest_want[slots] = 0
        assert torch.equal(rest_got.nan_to_num(), rest_want.nan_to_num())


def test_decode_attention_perturbed_rotary_or_norm_is_caught() -> None:
    args = _decode_batch([40, 17], 4, 2, 32, torch.float32, seed=9)
    ref = reference.decode_attention(**_on(args, "cpu"))
    swapped = attention.decode_attention(**_on(dict(args, cos=args["sin"], sin=args["cos"]), DEVICE))
    assert rel_err(swapped.cpu(), ref) > 1e-2
    other_norm = _on(dict(args, k_weight=args["q_weight"]), DEVICE)
    attention.decode_attention(**other_norm)
    want_k = _on(args, "cpu")["k_cache"]
    reference.decode_attention(**dict(_on(args, "cpu"), k_cache=want_k))
    assert rel_err(other_norm["k_cache"].cpu().nan_to_num(), want_k.nan_to_num()) > 1e-4
