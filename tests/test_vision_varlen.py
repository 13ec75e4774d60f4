"""Vision tower: one varlen kernel call per block for all images (Triton path) vs one SDPA per
image (reference path), on a tiny random tower with images and a video of different sizes.

CPU: Triton interpreter (see tests/test_triton_qmatmul.py for how TRITON_INTERPRET is set);
GPU: the same tests on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kernels import triton_utils as tu
from server.model import qwen3_vl
from server.model.model_config import ModelConfig, VisionConfig
from server.model.qwen3_vl import ImageSegments, VisionBlock, VisionTower

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # those of tests/test_triton_attention.py
# head_dim 64 as in Qwen3-VL-2B's tower (1024 / 16 heads)
CFG = VisionConfig(
    depth=2,
    hidden_size=128,
    intermediate_size=256,
    num_heads=2,
    in_channels=3,
    patch_size=2,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,
    deepstack_visual_indexes=(0,),
)
GRID = [(1, 4, 6), (2, 2, 4), (1, 8, 2)]  # segments of 24, 8, 8, 16 rows: a video's 2 frames


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tiny_tower(dtype: torch.dtype) -> VisionTower:
    gen = torch.Generator().manual_seed(0)
    tower = VisionTower(CFG)
    for mod in tower.modules():
        if isinstance(mod, qwen3_vl.Linear):  # O(1) activations: attention is no small term
            mod.set_dense(
                torch.randn(mod.out_features, mod.in_features, generator=gen) / mod.in_features**0.5
            )
            mod.bias.copy_(0.1 * torch.randn(mod.out_features, generator=gen))
        elif isinstance(mod, torch.nn.LayerNorm):
            mod.weight.data = 1 + 0.1 * torch.randn(mod.weight.shape, generator=gen)
    tower = tower.to(DEVICE, dtype)
    tower.init_buffers()  # rotary frequencies stay fp32, as the loader keeps them
    return tower


def pixels() -> torch.Tensor:
    patch_dim = CFG.in_channels * CFG.temporal_patch_size * CFG.patch_size**2
    rows = sum(t * h * w for t, h, w in GRID)
    return torch.randn(rows, patch_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def set_attention_backend(tower: VisionTower, backend: str) -> None:
    for block in tower.blocks:  # linears stay as they are: only the attention call differs
        block.backend = backend


def triton_vs_reference(dtype: torch.dtype) -> float:
    """Largest relative error of the tower's outputs (embeddings, DeepStack) per image."""
    tower = tiny_tower(dtype)
    x = pixels()
    set_attention_backend(tower, "reference")
    want = tower(x, GRID)
    set_attention_backend(tower, "triton")
    got = tower(x, GRID)
    assert len(got) == len(want) == len(GRID)
    errs = []
    for g, w in zip(got, want):
        assert torch.isfinite(g.embeds).all() and torch.isfinite(g.deepstack).all()
        errs += [rel_err(g.embeds, w.embeds), rel_err(g.deepstack, w.deepstack)]
    return max(errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_tower_matches_per_image_sdpa(dtype: torch.dtype) -> None:
    assert triton_vs_reference(dtype) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrong_cu_seqlens_fails_the_comparison(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first image merged with the next in cu_seqlens only (the host lengths, which the
    reference path uses, stay right): attention then crosses images and the check must see it."""
    build = ImageSegments.build.__func__

    def merged(cls, lengths: list[int], device: torch.device) -> ImageSegments:
        right = build(cls, lengths, device)
        return ImageSegments(lengths, torch.cat([right.cu_seqlens[:1], right.cu_seqlens[2:]]))

    monkeypatch.setattr(ImageSegments, "build", classmethod(merged))
    assert triton_vs_reference(dtype) > 10 * TOL[dtype]


def test_segments_built_once_per_tower_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """cu_seqlens is made by the tower and handed to every block (not rebuilt per block)."""
    tower = tiny_tower(torch.float32)
    seen: list[ImageSegments] = []
    forward = VisionBlock.forward

    def spy(self, x, cos, sin, segments):
        seen.append(segments)
        return forward(self, x, cos, sin, segments)

    monkeypatch.setattr(VisionBlock, "forward", spy)
    tower(pixels(), GRID)
    assert len(seen) == CFG.depth and all(s is seen[0] for s in seen)
    assert seen[0].cu_seqlens.tolist() == [0, 24, 32, 40, 56]
    assert seen[0].cu_seqlens.dtype == torch.int32 and seen[0].max_len == 24


def test_set_backend_reaches_the_vision_blocks(demo_dir) -> None:
    cfg = ModelConfig.from_file(demo_dir("bf16") / "config.json")
    with torch.device("meta"):  # shapes only: set_backend walks the modules
        model = qwen3_vl.Qwen3VL(cfg)
    model.set_backend("reference")
    assert {b.backend for b in model.visual.blocks} == {"reference"}
