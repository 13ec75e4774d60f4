"""One rule picks the kernels (kernels/backend.py), and a Triton kernel that fails at start
costs speed, not service: the engine logs which kernel and why, switches the model to the
reference kernels and serves on them (CPU: the Triton kernels run in the interpreter)."""

from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import backend
from kernels import triton_utils as tu
from server import LLM, SamplingParams
from server.model.layers import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)


class _BrokenKernel:
    """Stands in for a @triton.jit kernel whose launch (compile) raises."""

    def __getitem__(self, grid: object) -> None:
        raise RuntimeError("forced compile failure")


def test_resolve_is_the_one_rule() -> None:
    assert backend.resolve("auto", "cpu") == "reference"
    assert backend.resolve("triton", "cpu") == "triton"
    assert backend.resolve("reference", "cuda") == "reference"
    assert backend.resolve("auto", "cuda") == ("triton" if backend.triton_installed() else "reference")
    assert not backend.use_triton(torch.ones(2), "auto")
    assert backend.use_triton(torch.ones(2), "triton")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        backend.resolve("cuda", "cpu")


@needs_triton
def test_failing_kernel_names_the_op_the_model_called(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import norms

    monkeypatch.setattr(norms, "_rms_norm_kernel", _BrokenKernel())
    with pytest.raises(RuntimeError) as raised:
        norms.rms_norm(torch.ones(2, 4, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)
    assert backend.failing_kernel(raised.value) == "kernels.norms.rms_norm"  # not _launch_norm
    with pytest.raises(RuntimeError) as raised:
        _BrokenKernel()[1]
    assert backend.failing_kernel(raised.value) == "unknown"  # raised outside the kernel modules


@needs_triton
def test_failed_kernel_at_start_falls_back_to_reference(
    demo_dir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kernels import norms

    kw = dict(device=DEVICE, dtype="float32", max_model_len=256, num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=8)
    prompt = "A small red circle"
    expected = LLM(str(demo_dir("w8")), kernel_backend="reference", **kw).generate(prompt, params)

    monkeypatch.setattr(norms, "_rms_norm_kernel", _BrokenKernel())
    with caplog.at_level(logging.WARNING, logger="server.engine.core"):
        llm = LLM(str(demo_dir("w8")), kernel_backend="triton", **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "Triton kernel kernels.norms." in m and "during warm-up" in m and "forced compile failure" in m
        for m in warnings
    ), warnings
    core = llm.engine
    assert core.stats().kernel_backend == "reference"
    assert {m.backend for m in core.model.modules() if isinstance(m, RMSNorm)} == {"reference"}
    got = llm.generate(prompt, params)
    assert got[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
