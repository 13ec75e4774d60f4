"""The demo model with Triton kernels (CPU: Triton interpreter) generates the same greedy tokens
as with the reference kernels: quantized linears, KV write, paged attention, RMSNorm and
SiLU-and-mul all through the Triton kernels (kernel_backend="triton")."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

from kernels import attention, norms, qmatmul_triton
from kernels import triton_utils as tu
from server import LLM, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))


CHATS = {
    "text": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Describe what a small red circle looks like, please."},
    ],
    "image": [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What is this?"}],
        }
    ],
}


def _generate(llm: LLM, case: str, n: int) -> list[int]:
    out = llm.chat(CHATS[case], SamplingParams(temperature=0, max_tokens=n))[0]
    return out.outputs[0].token_ids


@pytest.mark.parametrize("kind", ["w8", "w4"])  # AWQ loads into the same layout (test_triton_qmatmul)
def test_greedy_tokens_triton_equal_reference(demo_dir, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(demo_dir(kind))
    kw = dict(device=DEVICE, dtype="float32", max_model_len=512, num_kv_blocks=48)
    cases = ("text", "image") if kind == "w8" else ("text",)
    n = 12
    ref_llm = LLM(path, kernel_backend="reference", **kw)
    expected = {case: _generate(ref_llm, case, n) for case in cases}

    llm = LLM(path, kernel_backend="triton", **kw)
    calls = {"qmatmul": 0, "paged_attention": 0, "rms_norm": 0, "silu_and_mul": 0}
    for owner, name in (
        (qmatmul_triton, "qmatmul"),
        (attention, "paged_attention"),
        (norms, "rms_norm"),
        (norms, "silu_and_mul"),
    ):
        real = getattr(owner, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    for case in cases:
        got = _generate(llm, case, n)
        assert got == expected[case], f"{kind}/{case}: triton {got} vs reference {expected[case]}"
        assert len(set(got)) > 6, f"{kind}/{case}: demo output should be varied, got {got}"
    assert all(calls.values()), f"some Triton kernels were never called: {calls}"
