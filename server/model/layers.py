"""Building blocks of the Qwen3-VL network: linears (dense or quantized), norms, rotary,
and the one attention call-site that reads and writes the paged KV cache."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import QuantizedWeight, torch_attention
from kernels import reference as ref
from kernels.backend import use_triton


def release_freed_memory() -> None:
    """Hand memory freed by the load's temporaries back to the OS (glibc keeps freed heap
    blocks mapped: ~1 GB of RSS after loading the 2B model on CPU); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


class Linear(nn.Module):
    """y = x @ W^T (+ b), with W either a dense tensor or a group-quantized QuantizedWeight.

    Quantized weights are not nn.Parameters (int codes + scales); they live in `self.qweight`
    and move with `to_device()` of the model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: QuantizedWeight | None = None
        self.backend = "auto"

    def set_dense(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.qweight = None

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        self.qweight = qweight
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return kernels.qmatmul(x, self.qweight, backend=self.backend, bias=self.bias)
        assert self.weight is not None, "Linear used before its weight was loaded"
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = f"w{self.qweight.bits}g{self.qweight.group_size}" if self.qweight is not None else "dense"
        return f"in={self.in_features}, out={self.out_features}, {kind}"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x, self.backend):
            from kernels import norms

            return norms.rms_norm(x, self.weight, self.eps)
        return ref.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm (one
        kernel on Triton); residual None: (norm(x), x)."""
        if residual is None:
            return self(x), x
        if use_triton(x, self.backend):
            from kernels import norms

            return norms.add_rms_norm(x, residual, self.weight, self.eps)
        return ref.add_rms_norm(x, residual, self.weight, self.eps)


def silu_and_mul(x: torch.Tensor, backend: str) -> torch.Tensor:
    if use_triton(x, backend):
        from kernels import norms

        return norms.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class MRotaryEmbedding(nn.Module):
    """Qwen3-VL multimodal rotary: 3-D positions (t, h, w) share one frequency table; each
    frequency slot takes its angle from one of the three axes (interleaved T,H,W,T,H,W... for
    the first 3*min(section) slots, as in Qwen3-VL; contiguous sections if not interleaved)."""

    def __init__(
        self, head_dim: int, theta: float, mrope_section: tuple[int, int, int], interleaved: bool
    ) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.mrope_section, self.interleaved = mrope_section, interleaved
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("axis", torch.empty(head_dim // 2, dtype=torch.long), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the tables; called again after building the model on the meta device."""
        d, half = self.head_dim, self.head_dim // 2
        dev = self.inv_freq.device if self.inv_freq.device.type != "meta" else None
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device=dev) / d))
        axis = torch.zeros(half, dtype=torch.long)  # which of t/h/w drives each frequency slot
        if self.interleaved:
            for dim, offset in ((1, 1), (2, 2)):
                axis[offset : self.mrope_section[dim] * 3 : 3] = dim
        else:
            sec = self.mrope_section
            bounds = [0, sec[0], sec[0] + sec[1], half]
            for dim in range(3):
                axis[bounds[dim] : bounds[dim + 1]] = dim
        self.axis = axis.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, sin [T, head_dim] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, half]
        idx = self.axis.view(1, 1, -1).expand(1, freqs.shape[1], -1)
        freqs = freqs.gather(0, idx)[0]  # [T, half]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class AttentionMetadata:
    """Where each token of a flat batch reads and writes the paged KV cache.

    The batch packs B sequences' new tokens back to back. For sequence b its new tokens are
    query_start_loc[b]:query_start_loc[b+1], they are the last tokens of a context of
    seq_lens[b] tokens, whose KV lives in blocks block_tables[b]. slot_mapping[i] is the cache
    slot (block * block_size + offset) token i writes; -1 skips a padding token.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # The plain-torch attention's per-step plan, made by the first layer that needs it and
    # read by the others (the same lengths for every layer).
    torch_plan: torch_attention.StepPlan | None = field(default=None, repr=False, compare=False)


def attention(
    qkv: torch.Tensor,
    q_norm: RMSNorm,
    k_norm: RMSNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    num_heads: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """The attention call-site of the decoder, from the fused qkv projection: q/k RMSNorm,
    M-RoPE, this step's K/V written to the cache, then attention over the whole cached
    context of each sequence (prefill, prefill with a cached prefix, decode). On Triton a
    decode step is one kernel, other steps two; the plain-torch path runs the reference twins,
    with attention as batched SDPA (kernels/torch_attention.py)."""
    k_cache, v_cache = kv_cache
    norms = (qkv, q_norm.weight, k_norm.weight, q_norm.eps, cos, sin, k_cache, v_cache, meta.slot_mapping)
    if not use_triton(qkv, backend):
        if meta.torch_plan is None:
            meta.torch_plan = torch_attention.plan_step(
                meta.seq_lens, meta.query_start_loc, k_cache.shape[1], meta.block_tables.shape[1]
            )
        q = ref.qk_norm_rope_kv(*norms, num_heads)
        return torch_attention.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scale,
            plan=meta.torch_plan,
        )
    from kernels import attention as kernel

    tables = (meta.block_tables, meta.seq_lens, meta.query_start_loc)
    if meta.max_query_len == 1:
        return kernel.decode_attention(*norms, *tables, num_heads, scale, max_seq_len=meta.max_seq_len)
    from kernels import rope

    q = rope.qk_norm_rope_kv(*norms, num_heads)
    return kernel.paged_attention(
        q, k_cache, v_cache, *tables, scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len
    )
