"""--quantize-lm-head (server/model/lm_head.py) on the demo checkpoint: off, the logits are the
bf16 (here fp32) head's, bit for bit; on, they come from the W8G128 round-to-nearest copy of the
tied embedding, close to the dense head's, with high greedy agreement and about half the bytes.

The Triton head runs in the interpreter on CPU (TRITON_INTERPRET=1, set before `kernels` is
imported, as in tests/test_triton_qmatmul.py); the engine on CPU uses a dense copy of the W8
head's values instead (Qwen3VL.dequantize_linears).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from kernels import quantize
from kernels import triton_utils as tu
from server import LLM, SamplingParams
from server.config import parse_config
from server.model import lm_head
from server.model.lm_head import QuantizedHead
from server.model.loader import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [
    "Describe a red circle.",
    "The quick brown fox",
    "Once upon a time there",
    "List three colors:",
    "What is 2 + 2?",
    "Tell me about the sea.",
]
N_TOKENS = 24
FP32 = torch.float32  # the comparisons are exact to 1e-5 in fp32 (the CPU demo's dtype anyway)
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hidden(model, rows: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows)
    return torch.randn(rows, model.cfg.text.hidden_size, generator=gen).to(DEVICE, model.dtype)


def test_flag_is_declared_and_off_by_default() -> None:
    assert parse_config([], env={}).engine_args().quantize_lm_head is False
    assert parse_config(["--quantize-lm-head"], env={}).engine_args().quantize_lm_head is True


def test_off_logits_are_the_dense_heads(demo_dir) -> None:
    model = load_model(demo_dir("w8"), device=DEVICE, dtype=FP32).model
    model.set_backend("auto")
    assert model.quantized_head is None and model.cfg.tie_word_embeddings
    h = _hidden(model)
    assert torch.equal(model.compute_logits(h), F.linear(h, model.embed_tokens.weight).float())


@needs_triton
def test_on_logits_are_the_w8_copy_of_the_tied_embedding(demo_dir) -> None:
    dense = load_model(demo_dir("w8"), device=DEVICE, dtype=FP32).model
    model = load_model(demo_dir("w8"), device=DEVICE, dtype=FP32, quantize_lm_head=True).model
    embed = dense.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, embed)  # the lookup keeps its table
    codes = quantize(embed.float(), bits=8, group_size=128)  # one call over the whole head
    assert torch.equal(model.quantized_head.weight.qweight, codes.qweight)
    assert torch.equal(model.quantized_head.weight.scales, codes.scales)
    w8 = codes.dequantize(torch.float32)

    h = _hidden(model)
    want = h.float() @ w8.t()
    dense_logits = dense.compute_logits(h)
    for backend in ("triton", "reference"):  # reference: the GPU fallback (CPU dequantizes below)
        got = model.quantized_head.logits(h, backend)
        assert got.dtype == torch.float32 and got.shape == dense_logits.shape
        assert rel_err(got, want) < 1e-5, backend
        # Close to the dense head (0.7 % here; a 4-bit head is ~10 %), but not it: a head that
        # kept the dense weights fails here.
        assert 1e-4 < rel_err(got, dense_logits) < 2e-2, backend

    model.set_backend("triton")  # on CPU: the interpreter, the W8 head kept
    assert model.quantized_head is not None
    assert rel_err(model.compute_logits(h), want) < 1e-5
    if DEVICE == "cpu":
        model.set_backend("auto")  # CPU: linears and the head become dense copies of their values
        assert model.quantized_head is None
        assert torch.equal(model.lm_head, w8.to(model.dtype))
        assert rel_err(model.compute_logits(h), want) < 1e-5


@needs_triton
def test_row_and_block_splits_change_nothing(demo_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(demo_dir("w8"), device=DEVICE, dtype=FP32, quantize_lm_head=True).model
    head = model.quantized_head
    h = _hidden(model, rows=5)
    want = {b: head.logits(h, b) for b in ("triton", "reference")}
    monkeypatch.setattr(lm_head, "TRITON_ROWS", 2)  # 3 Triton calls: rows 2 + 2 + 1
    monkeypatch.setattr(lm_head, "REFERENCE_ROWS", 100)  # head blocks, the last one partial
    monkeypatch.setattr(lm_head, "QUANTIZE_ROWS", 100)
    for b in ("triton", "reference"):
        assert rel_err(head.logits(h, b), want[b]) < 1e-6, b
    again = QuantizedHead.from_dense(model.embed_tokens.weight)
    assert torch.equal(again.weight.qweight, head.weight.qweight)
    assert torch.equal(again.weight.scales, head.weight.scales)


def test_bytes_of_the_w8_head(demo_dir) -> None:
    model = load_model(demo_dir("w8"), device=DEVICE, dtype=FP32, quantize_lm_head=True).model
    n, k = model.embed_tokens.weight.shape
    bf16 = 2 * n * k
    w8 = model.quantized_head.nbytes
    assert w8 == n * k + n * (k // 128) * 4  # int8 codes + one fp32 scale per group
    print(f"\nlm_head {n}x{k}: bf16 {bf16} B, W8G128 {w8} B ({w8 / bf16:.1%}), saved {bf16 - w8} B")
    assert w8 < 0.52 * bf16


def test_greedy_agreement_with_the_dense_head(demo_dir) -> None:
    """Teacher-forced: along the dense head's greedy tokens, how often the W8 head picks the same
    next token (one batched call of 1-token continuations); free-running agreement is printed."""
    path = str(demo_dir("w8"))
    kw = dict(device=DEVICE, dtype="float32", max_model_len=512, num_kv_blocks=64)
    dense, w8 = LLM(path, **kw), LLM(path, quantize_lm_head=True, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=N_TOKENS)
    ref = dense.generate(PROMPTS, greedy)
    refs = [r.outputs[0].token_ids for r in ref]
    forced = [r.prompt_token_ids + t[:i] for r, t in zip(ref, refs) for i in range(len(t))]
    want = [tok for t in refs for tok in t]
    got = [
        o.outputs[0].token_ids[0] for o in w8.generate(forced, SamplingParams(temperature=0, max_tokens=1))
    ]
    forced_same = sum(a == b for a, b in zip(got, want))
    free = [o.outputs[0].token_ids for o in w8.generate(PROMPTS, greedy)]
    free_same = sum(a == b for t, f in zip(refs, free) for a, b in zip(t, f))
    first_diff = [next((i for i, (a, b) in enumerate(zip(t, f)) if a != b), None) for t, f in zip(refs, free)]
    print(
        f"\ngreedy agreement W8 vs dense lm_head, {len(PROMPTS)} prompts x {N_TOKENS} tokens: "
        f"teacher-forced {forced_same}/{len(want)} = {forced_same / len(want):.1%}; free-running "
        f"(same position) {free_same}/{len(want)} = {free_same / len(want):.1%}, first divergence {first_diff}"
    )
    assert len(want) >= len(PROMPTS) * N_TOKENS // 2
    assert forced_same >= 0.9 * len(want)
