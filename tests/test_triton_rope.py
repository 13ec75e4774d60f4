"""The fused q/k RMSNorm + rotary + KV-cache write kernel (kernels/rope.py) vs its twin
reference.qk_norm_rope_kv; CPU under the Triton interpreter, or on a GPU when present."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import reference, rope
from kernels import triton_utils as tu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS, BLOCK_SIZE = 5, 4


def _inputs(dtype: torch.dtype, t: int, h_q: int, h_kv: int, d: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (h_q + 2 * h_kv) * d, generator=gen) * 2).to(dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 50
    angles = torch.cat([angles, angles], dim=-1)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=gen)[:t]
    slots[t // 2] = -1  # a padding token: no cache write
    cache = torch.full((BLOCKS, BLOCK_SIZE, h_kv, d), 7.0, dtype=dtype)
    args = dict(
        qkv=qkv,
        q_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
        k_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
        eps=1e-6,
        cos=angles.cos().to(dtype),
        sin=angles.sin().to(dtype),
        k_cache=cache,
        v_cache=cache.clone(),
        slot_mapping=slots,
        num_heads=h_q,
    )
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _run(fn, args: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    q = fn(**a)
    return q.cpu(), a["k_cache"].cpu(), a["v_cache"].cpu()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < TOL[y.dtype]
    if y.dtype != torch.float32:  # same rounding points: nearly all bit-equal
        assert (y == ref).float().mean() > 0.95


@pytest.mark.parametrize("dtype", DTYPES)  # bf16: computed in fp32 inside, rounded at the ops
@pytest.mark.parametrize(("h_q", "h_kv", "d"), [(16, 8, 128), (3, 1, 48), (4, 2, 64)])  # 48: half 24
def test_matches_reference(dtype: torch.dtype, h_q: int, h_kv: int, d: int) -> None:
    args = _inputs(dtype, 7, h_q, h_kv, d, seed=h_q)
    q, kc, vc = _run(rope.qk_norm_rope_kv, args)
    q_ref, kc_ref, vc_ref = _run(
        reference.qk_norm_rope_kv, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    )
    _close(q, q_ref)
    written = args["slot_mapping"].cpu()
    written = written[written >= 0]
    blk, off = written // BLOCK_SIZE, written % BLOCK_SIZE
    _close(kc[blk, off], kc_ref[blk, off])
    assert torch.equal(vc, vc_ref)  # v is copied, untouched slots keep their value
    untouched = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[written] = False
    assert (kc.view(-1, h_kv, d)[untouched] == 7).all()


def test_a_perturbed_input_is_caught() -> None:
    """The comparison above fails when the kernel is fed something else: a swapped cos/sin
    (a rotary sign or half mix-up looks the same) or the other norm's weight."""
    args = _inputs(torch.float32, 5, 4, 2, 64, seed=3)
    q_ref, kc_ref, _ = _run(
        reference.qk_norm_rope_kv, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    )
    q, _, _ = _run(rope.qk_norm_rope_kv, dict(args, cos=args["sin"], sin=args["cos"]))
    assert _rel(q, q_ref) > 0.1
    _, kc, _ = _run(rope.qk_norm_rope_kv, dict(args, k_weight=args["q_weight"]))
    assert _rel(kc, kc_ref) > 1e-3


def test_argument_checks() -> None:
    args = _inputs(torch.float32, 3, 4, 2, 64)
    with pytest.raises(ValueError, match="qkv must be"):
        rope.qk_norm_rope_kv(**dict(args, num_heads=3))
    with pytest.raises(ValueError, match="cos/sin"):
        rope.qk_norm_rope_kv(**dict(args, cos=args["cos"][:2]))
    with pytest.raises(ValueError, match="dtype"):
        rope.qk_norm_rope_kv(**dict(args, q_weight=args["q_weight"].half()))
