"""Random-weight models at any shape, built in memory (no files): what the engine and kernel
benchmarks run on a GPU at the real 2B shapes without shipping or downloading weights."""

from __future__ import annotations

import torch

from kernels import QuantizedWeight

from .layers import Linear
from .model_config import ModelConfig
from .qwen3_vl import Qwen3VL

# Qwen3-VL-2B (DESIGN.md "Real 2B shapes")
REAL_2B_CONFIG: dict = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "rope_theta": 5000000.0,
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
}


@torch.no_grad()
def random_model(
    config: dict | ModelConfig,
    bits: int | None = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Qwen3VL:
    """A Qwen3VL with random weights; decoder linears W{bits}G128-quantized (None: dense)."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        net = Qwen3VL(cfg)
    net.to_empty(device=device)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight") or ".norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
        p.data = p.data.to(dtype)
    for name, mod in net.named_modules():
        if not isinstance(mod, Linear):
            continue
        n, k = mod.out_features, mod.in_features
        if bits and name.startswith("layers."):
            qmax = 2 ** (bits - 1)
            codes = torch.randint(-qmax, qmax, (n, k), generator=g, device=device, dtype=torch.int8)
            scales = torch.rand(n, k // 128, generator=g, device=device) * 1e-3 + 1e-4
            mod.set_quantized(QuantizedWeight.from_codes(codes, scales, bits, 128))
        else:
            mod.set_dense(
                torch.randn(n, k, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
            )
    net.init_buffers()
    return net.eval()
