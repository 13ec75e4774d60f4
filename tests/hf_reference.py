"""The test oracle: transformers' Qwen3VLForConditionalGeneration on the same checkpoint,
fed by transformers' own tokenizer and Qwen2VLImageProcessorPil (not by our processor)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from server.model.loader import LoadedModel, dense_state_dict


def reference_model(loaded: LoadedModel) -> Qwen3VLForConditionalGeneration:
    """fp32 transformers model with the same effective weights (q*s for quantized layers:
    the bf16 fake-quant values in model.safetensors differ from q*s by bf16 rounding)."""
    raw = json.loads((loaded.path / "config.json").read_text())
    for key in ("qat", "quantization_config", "grace_demo", "architectures"):
        raw.pop(key, None)
    ref = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**raw)).float().eval()
    missing, unexpected = ref.load_state_dict(dense_state_dict(loaded.model), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing), missing  # tied to embed_tokens
    ref.tie_weights()
    return ref


class ReferenceInputs:
    """Chat -> input_ids / pixel_values / grids the way transformers' processor builds them."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        pre = json.loads((path / "preprocessor_config.json").read_text())
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=pre["patch_size"],
            temporal_patch_size=pre["temporal_patch_size"],
            merge_size=pre["merge_size"],
            size=pre["size"],
            image_mean=pre["image_mean"],
            image_std=pre["image_std"],
        )
        self.merge = pre["merge_size"]
        cfg = json.loads((path / "config.json").read_text())
        self.image_token_id = cfg["image_token_id"]

    def build(self, messages: list[dict], images: list) -> dict[str, torch.Tensor]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, torch.Tensor] = {}
        if images:
            px = self.image_processor(images=images, return_tensors="pt")
            grids = px["image_grid_thw"]
            pieces = text.split("<|image_pad|>")
            assert len(pieces) == len(images) + 1
            text = pieces[0]
            for grid, piece in zip(grids, pieces[1:]):
                text += "<|image_pad|>" * int(grid.prod() // self.merge**2) + piece
            out["pixel_values"] = px["pixel_values"]
            out["image_grid_thw"] = grids
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])
        out["input_ids"] = ids
        if images:
            out["mm_token_type_ids"] = (ids == self.image_token_id).int()
        return out


def with_inline_images(messages: list[dict], images: list) -> list[dict]:
    """The same conversation in our content-part spelling: each {"type": "image"} part (the
    reference's placeholder) carries its PIL image inline, in order."""
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(it)} if p["type"] == "image" else p for p in content]
        out.append({**m, "content": content})
    return out
