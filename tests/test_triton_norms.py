"""Fused RMSNorm (+ residual add) and SiLU-and-mul Triton kernels (kernels/norms.py) vs the
reference twins; CPU under the Triton interpreter, or on a GPU when present."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import norms, reference
from kernels import triton_utils as tu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref.cpu()) < TOL[y.dtype]
    if y.dtype != torch.float32:  # one rounding from the same fp32 value: nearly all bit-equal
        assert (y.cpu() == ref.cpu()).float().mean() > 0.95


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 200), (2, 4, 64)])  # 200: not a power of two
def test_rms_norm_and_add(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    res = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    close(norms.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    y, h = norms.add_rms_norm(x, res, w, 1e-6)
    y_ref, h_ref = reference.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(h, h_ref)  # the residual stream is bit-exact
    close(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 2 * 1100, generator=gen) * 4).to(dtype).to(DEVICE)  # two column blocks
    close(norms.silu_and_mul(x), reference.silu_and_mul(x))
    with pytest.raises(ValueError, match="even"):
        norms.silu_and_mul(x[:, :7])


def test_rms_norm_checks_and_strided_rows() -> None:
    x = torch.randn(4, 2, 96, device=DEVICE)[:, 1]  # rows with stride 192
    w = torch.rand(96, device=DEVICE) + 0.5
    close(norms.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    with pytest.raises(ValueError, match="weight"):
        norms.rms_norm(x, w[:10], 1e-5)
