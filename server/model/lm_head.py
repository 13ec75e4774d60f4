"""The optional W8G128 lm_head (``--quantize-lm-head``): logits from a round-to-nearest int8 copy
of the head (the tied embedding for Qwen3-VL-2B) instead of the bf16 one.

Why: every decode step streams the whole head; for the 2B model (151936 x 2048) that is 622 MB
in bf16, about 30 % of the step's bytes, against 320 MB as W8G128 codes + fp32 scales. Off by
default: GRACE ships a bf16 head (not quantization-aware trained) and this changes the logits;
docs/BENCHMARKS.md has its greedy agreement with the bf16 head. The embedding lookup keeps the
bf16 table, so with a tied head this copy adds its bytes to memory while saving them on every
step's read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kernels import QuantizedWeight, quantize
from kernels import reference as ref
from kernels.backend import use_triton

BITS, GROUP_SIZE = 8, 128
QUANTIZE_ROWS = 8192  # head rows quantized at a time: bounds the fp32 temporaries (64 MB at K 2048)
# Logit rows per Triton call: M stays in the gemv/gemm plans; a dequant plan would need a scratch
# copy of the whole head in the activation dtype (622 MB for the 2B model), the bytes this saves.
TRITON_ROWS = 128
REFERENCE_ROWS = 16384  # head rows dequantized at a time by the plain-torch path (GPU fallback)


@dataclass
class QuantizedHead:
    """A W8G128 lm_head: ``logits = hidden @ W^T`` in fp32, with W the round-to-nearest codes."""

    weight: QuantizedWeight

    @classmethod
    def from_dense(cls, head: torch.Tensor) -> QuantizedHead:
        """Quantize ``head [vocab, hidden]`` on its device (exact per row: groups run along K)."""
        parts = [
            quantize(rows.float(), BITS, GROUP_SIZE, name="lm_head") for rows in head.split(QUANTIZE_ROWS)
        ]
        return cls(QuantizedWeight.cat(parts))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def to(self, device: torch.device | str) -> QuantizedHead:
        return QuantizedHead(self.weight.to(device))

    def logits(self, hidden: torch.Tensor, backend: str) -> torch.Tensor:
        """fp32 ``[T, vocab]`` for ``hidden [T, hidden]`` with the kernels of ``backend``."""
        w = self.weight
        if use_triton(hidden, backend):
            rows = hidden.split(TRITON_ROWS) if hidden.shape[0] > TRITON_ROWS else (hidden,)
            return torch.cat([kernels.qmatmul(h, w, backend=backend) for h in rows]).float()
        # Plain torch would dequantize the whole head in fp32 per call (1.2 GB for the 2B model):
        # go by blocks of head rows. (On CPU the model holds a dense copy instead: Qwen3VL.dequantize_linears.)
        blocks = [
            QuantizedWeight(BITS, w.group_size, q.shape[0], w.in_features, q, s)
            for q, s in zip(w.qweight.split(REFERENCE_ROWS), w.scales.split(REFERENCE_ROWS))
        ]
        return torch.cat([ref.qmatmul(hidden, b) for b in blocks], dim=-1).float()
