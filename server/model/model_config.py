"""Typed view of a Qwen3-VL config.json, tolerant of transformers-4 and -5 spellings.

Everything the model needs (sizes, token ids, rope settings, quantization block) is read
here, so the demo checkpoint and the real 2B model run the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConfigError(ValueError):
    """config.json is missing something we need or has a value we cannot serve."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    max_position_embeddings: int
    hidden_act: str = "silu"
    attention_bias: bool = False


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class QatConfig:
    bits: int
    group_size: int
    skip_keywords: tuple[str, ...] = ("visual", "merger", "lm_head", "embed_tokens")


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool
    dtype: torch.dtype
    qat: QatConfig | None = None
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        text_raw = dict(cfg.get("text_config") or cfg)  # flat configs keep text settings at top level
        vision_raw = cfg.get("vision_config")
        if not vision_raw:
            raise ConfigError("config.json has no vision_config: not a Qwen3-VL checkpoint")
        text = _parse_text(text_raw, cfg)
        vision = _parse_vision(vision_raw)
        tie = cfg.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
        if "tie_word_embeddings" in text_raw:
            tie = bool(text_raw["tie_word_embeddings"]) or bool(cfg.get("tie_word_embeddings", False))
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or text_raw.get("dtype") or "bfloat16"
        qat_raw = cfg.get("qat")
        qat = None
        if qat_raw:
            qat = QatConfig(
                bits=int(qat_raw["bits"]),
                group_size=int(qat_raw.get("group_size", 128)),
                skip_keywords=tuple(qat_raw.get("skip_keywords") or QatConfig.skip_keywords),
            )
        return cls(
            text=text,
            vision=vision,
            image_token_id=int(cfg.get("image_token_id", 151655)),
            video_token_id=int(cfg.get("video_token_id", 151656)),
            vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
            tie_word_embeddings=bool(tie),
            dtype=_DTYPES.get(str(dtype_name).replace("torch.", ""), torch.bfloat16),
            qat=qat,
            quantization_config=cfg.get("quantization_config"),
            raw=cfg,
        )


def _parse_text(t: dict[str, Any], top: dict[str, Any]) -> TextConfig:
    # transformers 4 writes rope_scaling + rope_theta; transformers 5 writes rope_parameters.
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or top.get("rope_scaling") or {})
    theta = rope.get("rope_theta", t.get("rope_theta", top.get("rope_theta", 5_000_000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} (only default M-RoPE is served)")
    heads = int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
    section = tuple(int(s) for s in rope.get("mrope_section", (24, 20, 20)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ConfigError(
            f"mrope_section {list(section)} must have 3 parts summing to head_dim/2={head_dim // 2}"
        )
    return TextConfig(
        vocab_size=int(t["vocab_size"]),
        hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]),
        num_hidden_layers=int(t["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        mrope_section=section,  # type: ignore[arg-type]
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        max_position_embeddings=int(t.get("max_position_embeddings", 262144)),
        hidden_act=str(t.get("hidden_act", "silu")),
        attention_bias=bool(t.get("attention_bias", False)),
    )


def _parse_vision(v: dict[str, Any]) -> VisionConfig:
    return VisionConfig(
        depth=int(v.get("depth", v.get("num_hidden_layers", 24))),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
        in_channels=int(v.get("in_channels", 3)),
        patch_size=int(v.get("patch_size", 16)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        out_hidden_size=int(v["out_hidden_size"]),
        num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", ())),
        hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
    )
