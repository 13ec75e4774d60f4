"""Our own Qwen3-VL: text decoder (GQA, q/k-norm, interleaved M-RoPE, DeepStack) and the
vision tower (patch embed, interpolated learned positions, 2-D rotary, per-image attention,
2x2 patch merger). Inputs are flat token batches over a paged KV cache, so the engine can
batch any mix of prefill chunks and decodes without touching this file."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import backend as kernel_backend
from kernels.reference import rotate_half
from server.transfer import to_device

from .layers import (
    AttentionMetadata,
    Linear,
    MRotaryEmbedding,
    RMSNorm,
    attention,
    release_freed_memory,
    silu_and_mul,
    use_triton,
)
from .lm_head import QuantizedHead
from .model_config import ModelConfig, TextConfig, VisionConfig

# ---------------------------------------------------------------------------------------
# Vision tower


@dataclass(frozen=True)
class ImageSegments:
    """Where each image (each frame of a video) lies in the tower's packed rows, built once per
    tower forward: lengths on the host for the per-image SDPA of the reference path,
    cu_seqlens on the activations' device for the one varlen kernel call per block."""

    lengths: list[int]
    cu_seqlens: torch.Tensor  # int32 [num_images + 1]

    @classmethod
    def build(cls, lengths: list[int], device: torch.device) -> ImageSegments:
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(lengths, to_device(bounds, device))

    @property
    def max_len(self) -> int:  # from the host list: the kernel then needs no device sync
        return max(self.lengths, default=0)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = Linear(d, 3 * d, bias=True)
        self.proj = Linear(d, d, bias=True)
        self.fc1 = Linear(d, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, d, bias=True)
        self.backend = "auto"  # attention: "auto" | "reference" | "triton", as in DecoderLayer

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: ImageSegments
    ) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.num_heads, -1).unbind(1)
        # Rotary in fp32 like the reference, whatever the activation dtype.
        q = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(x.dtype)
        k = (k.float() * cos[:, None] + rotate_half(k.float()) * sin[:, None]).to(x.dtype)
        # Full attention within each image, none across images.
        if use_triton(x, self.backend):  # all images of the step in one kernel call
            from kernels.attention import varlen_attention

            attn = varlen_attention(q, k, v, segments.cu_seqlens, max_seqlen=segments.max_len)
        else:  # one SDPA per image, as transformers does: CPU greedy parity stays exact
            outs = []
            start = 0
            for length in segments.lengths:
                sl = slice(start, start + length)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
                    ).transpose(0, 1)
                )
                start += length
            attn = torch.cat(outs)
        x = x + self.proj(attn.reshape(n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class PatchMerger(nn.Module):
    """2x2 neighbouring patches -> one LLM token. DeepStack mergers normalize after the shuffle."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.fc1 = Linear(self.merged, self.merged, bias=True)
        self.fc2 = Linear(self.merged, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (
            self.norm(x.view(-1, self.merged))
            if self.postshuffle_norm
            else self.norm(x).view(-1, self.merged)
        )
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class ImageFeatures:
    """Vision output for one image: LLM-width embeddings and one DeepStack tensor per index."""

    embeds: torch.Tensor  # [num_tokens, hidden]
    deepstack: torch.Tensor  # [num_deepstack, num_tokens, hidden]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = Linear(patch_dim, d, bias=True)  # the Conv3d with stride == kernel, as a matmul
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, d)
        self.grid_side = int(cfg.num_position_embeddings**0.5)
        self.register_buffer("rope_inv_freq", torch.empty(d // cfg.num_heads // 4), persistent=False)
        self.init_buffers()
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_mergers = nn.ModuleList(
            [PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes]
        )

    def init_buffers(self) -> None:
        spatial = self.cfg.hidden_size // self.cfg.num_heads // 2
        dev = self.rope_inv_freq.device if self.rope_inv_freq.device.type != "meta" else None
        self.rope_inv_freq = 1.0 / (
            10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float, device=dev) / spatial)
        )

    def _block_order(self, h: int, w: int) -> torch.Tensor:
        """Raster index of each patch in the processor's 2x2-merge-block order."""
        m = self.cfg.spatial_merge_size
        idx = torch.arange(h * w).view(h // m, m, w // m, m).transpose(1, 2)
        return idx.reshape(-1)

    def _pos_embeds(self, t: int, h: int, w: int) -> torch.Tensor:
        """Learned square position table resampled bilinearly (align_corners) to h x w."""
        side = self.grid_side

        def taps(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            src = torch.arange(size, dtype=torch.float32) * (side - 1) / max(size - 1, 1)
            floor = src.floor()
            idx = (floor.long()[:, None] + torch.arange(2)).clamp(0, side - 1)
            wts = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
            return idx, wts

        hi, hw = taps(h)
        wi, ww = taps(w)
        index = (hi[:, None, :, None] * side + wi[None, :, None, :]).reshape(h * w, 4)
        weight = (hw[:, None, :, None] * ww[None, :, None, :]).reshape(h * w, 4)
        dev = self.pos_embed.weight.device
        emb = (self.pos_embed(to_device(index, dev)) * to_device(weight, dev)[..., None]).sum(1)
        return emb.index_select(0, to_device(self._block_order(h, w), dev)).repeat(t, 1)

    def _rotary(self, t: int, h: int, w: int) -> torch.Tensor:
        rows = torch.arange(h)[:, None].expand(h, w).reshape(-1)
        cols = torch.arange(w)[None, :].expand(h, w).reshape(-1)
        order = self._block_order(h, w)
        pos = to_device(
            torch.stack([rows[order], cols[order]], dim=-1).repeat(t, 1), self.rope_inv_freq.device
        )
        freqs = pos[..., None].float() * self.rope_inv_freq  # [N, 2, head_dim/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        return torch.cat([freqs, freqs], dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]
    ) -> list[ImageFeatures]:
        dtype = self.pos_embed.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype))
        x = x + torch.cat([self._pos_embeds(*g) for g in grid_thw]).to(dtype)
        angles = torch.cat([self._rotary(*g) for g in grid_thw])
        cos, sin = angles.cos(), angles.sin()
        segments = ImageSegments.build([h * w for t, h, w in grid_thw for _ in range(t)], x.device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_mergers[self.cfg.deepstack_visual_indexes.index(i)](x))
        merged = self.merger(x)
        unit = self.cfg.spatial_merge_size**2
        sizes = [t * h * w // unit for t, h, w in grid_thw]
        embeds = merged.split(sizes)
        stacked = (
            torch.stack(deepstack) if deepstack else merged.new_zeros(0, merged.shape[0], merged.shape[1])
        )
        ds = stacked.split(sizes, dim=1)
        return [ImageFeatures(e, d) for e, d in zip(embeds, ds)]


# ---------------------------------------------------------------------------------------
# Text decoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.scale = hd**-0.5
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)  # fused q|k|v
        self.o_proj = Linear(self.q_size, h)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(h, 2 * cfg.intermediate_size)  # fused gate|up
        self.down_proj = Linear(cfg.intermediate_size, h)
        self.backend = "auto"  # attention + activation kernels: "auto" | "reference" | "triton"

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden state is x + residual (residual None: x), kept as two terms so each
        residual add happens inside the next norm's kernel; returns the next (x, residual)."""
        n = x.shape[0]
        h, residual = self.input_layernorm.add(x, residual)
        qkv = self.qkv_proj(h)
        attn = attention(
            qkv, self.q_norm, self.k_norm, cos, sin, kv_cache, meta, self.num_heads, self.scale, self.backend
        )
        h, residual = self.post_attention_layernorm.add(self.o_proj(attn.reshape(n, self.q_size)), residual)
        return self.down_proj(silu_and_mul(self.gate_up_proj(h), self.backend)), residual


@dataclass
class MultimodalEmbeds:
    """Image features placed into a flat batch: `rows` are the image-token positions of the
    batch (ascending), `embeds`/`deepstack` hold the matching rows (a chunk may carry only
    part of an image: the runner slices the rows that fall into it). Positions rather than a
    boolean mask: masked indexing on a GPU reads the mask back to the host (a sync)."""

    rows: torch.Tensor  # long [n], on the model's device
    embeds: torch.Tensor  # [n, hidden]
    deepstack: torch.Tensor  # [num_deepstack, n, hidden]


class Qwen3VL(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(t) for _ in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary = MRotaryEmbedding(t.head_dim, t.rope_theta, t.mrope_section, t.mrope_interleaved)
        self.lm_head: nn.Parameter | None = None  # None when tied to embed_tokens (or quantized)
        self.quantized_head: QuantizedHead | None = None  # --quantize-lm-head: see quantize_lm_head
        self.backend = "auto"  # the logits' kernels (the layers keep their own)
        self.visual = VisionTower(cfg.vision)

    def init_buffers(self) -> None:
        """Recompute non-persistent tables (after the model was built on the meta device)."""
        self.rotary.init_buffers()
        self.visual.init_buffers()

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def to_device(self, device: torch.device | str) -> Qwen3VL:
        self.to(device)
        for lin in self.linears():
            if lin.qweight is not None:
                lin.qweight = lin.qweight.to(device)
        if self.quantized_head is not None:
            self.quantized_head = self.quantized_head.to(device)
        return self

    def set_backend(self, backend: str) -> None:
        """Kernels for linears, attention, norms and activations of the decoder and the vision
        blocks: "auto" (Triton on CUDA, plain torch elsewhere), "reference" or "triton" (kernels/backend.py)."""
        kernel_backend.check(backend)
        self.backend = backend
        for mod in self.modules():
            if isinstance(mod, (Linear, RMSNorm, DecoderLayer, VisionBlock)):
                mod.backend = backend
        if self.device.type == "cpu" and backend != "triton":
            self.dequantize_linears()

    def dequantize_linears(self) -> None:
        """CPU path: each quantized linear becomes one dense weight in the model's dtype and its
        codes are freed, so one copy of the weights stays resident (a dequantizing matmul per
        call runs 2.3x slower at the real shapes, see docs/BENCHMARKS.md). In bfloat16 the
        values are bf16(q * s): the GRACE checkpoint's own fake-quantized weights."""
        for lin in self.linears():
            if lin.qweight is not None:
                lin.set_dense(lin.qweight.dequantize(self.dtype))
        if self.quantized_head is not None:  # a dense copy of the W8 head's values, beside the embedding
            self.lm_head = nn.Parameter(
                self.quantized_head.weight.dequantize(self.dtype), requires_grad=False
            )
            self.quantized_head = None
        release_freed_memory()

    def quantize_lm_head(self) -> None:
        """Compute logits with a W8G128 round-to-nearest copy of the head (server/model/lm_head.py);
        the embedding lookup keeps its table. An untied dense head is dropped."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        self.quantized_head = QuantizedHead.from_dense(head.detach())
        self.lm_head = None
        release_freed_memory()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def encode_images(
        self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]
    ) -> list[ImageFeatures]:
        return self.visual(to_device(pixel_values, self.device), grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        mm: MultimodalEmbeds | None = None,
    ) -> torch.Tensor:
        """input_ids [T], positions [3, T] (M-RoPE t/h/w) -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        if mm is not None and mm.embeds.shape[0]:
            x = x.index_copy(0, mm.rows, mm.embeds.to(x.dtype))
        cos, sin = self.rotary(positions, x.dtype)
        n_deepstack = mm.deepstack.shape[0] if mm is not None and mm.embeds.shape[0] else 0
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, kv_caches[i], meta)
            if i < n_deepstack:  # the sum first, then the features, as the reference adds them
                x = (residual + x).index_add(0, mm.rows, mm.deepstack[i].to(x.dtype))  # type: ignore[union-attr]
                residual = None
        return self.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized_head is not None:
            return self.quantized_head.logits(hidden, self.backend)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight).float()


# ---------------------------------------------------------------------------------------
# M-RoPE positions of a prompt


def mrope_positions(
    token_ids: list[int], image_grids: list[tuple[int, int, int]], image_token_id: int, merge_size: int
) -> tuple[torch.Tensor, int]:
    """3-D positions for a prompt: text advances all three axes together; an image's tokens
    get (t, h, w) offsets from the running position, after which text continues at
    max position + 1. Returns positions [3, L] and the rope delta for decode
    (position of token i >= L is i + delta on every axis)."""
    ids = torch.as_tensor(token_ids)
    length = ids.numel()
    pos = torch.empty(3, length, dtype=torch.long)
    is_img = (ids == image_token_id).tolist()
    grids = iter(image_grids)
    i, cur = 0, 0
    while i < length:
        if not is_img[i]:
            j = i
            while j < length and not is_img[j]:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
        else:
            t, h, w = next(grids)
            gh, gw = h // merge_size, w // merge_size
            n = t * gh * gw
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pos[:, i : i + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(gh, gw)
            j = i + n
        i = j
    delta = (int(pos.max()) + 1 - length) if length else 0
    return pos, delta
