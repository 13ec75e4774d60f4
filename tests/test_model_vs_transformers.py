"""Our Qwen3-VL against transformers' on the demo checkpoints (fp32, CPU): logits of every
prompt position, and 32-token greedy generation through LLM.chat."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hf_reference import ReferenceInputs, reference_model, with_inline_images
from PIL import Image

from server import LLM, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.sequence import ScheduledChunk, SequenceData
from server.model.loader import load_model
from server.model.processor import Processor
from server.model.qwen3_vl import mrope_positions


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth gradients + noise: closer to a photo than pure noise, still deterministic
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(h + w, 1))], -1
    )
    noise = rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _conversation(case: str) -> tuple[list[dict], list[Image.Image]]:
    if case == "text":
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Describe what a small red circle looks like, please."},
        ], []
    if case == "one_image":
        im = _image(120, 180, 1)
        return [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
            }
        ], [im]
    if case == "two_images":
        a, b = _image(64, 250, 2), _image(200, 90, 3)
        content = [
            {"type": "text", "text": "Compare"},
            {"type": "image"},
            {"type": "text", "text": "with"},
            {"type": "image"},
        ]
        return [{"role": "user", "content": content}], [a, b]
    raise KeyError(case)


@pytest.fixture(scope="module")
def w8(demo_dir):
    loaded = load_model(demo_dir("w8"))
    return (
        loaded,
        reference_model(loaded),
        Processor(loaded.path, loaded.config),
        ReferenceInputs(loaded.path),
    )


def _our_logits(loaded, processor, messages, chunks: int) -> tuple[list[int], torch.Tensor]:
    inputs = processor.process_chat(messages)
    ids = inputs.prompt_token_ids
    pos, delta = mrope_positions(ids, [im.grid_thw for im in inputs.images], loaded.config.image_token_id, 2)
    seq = SequenceData.from_prompt(ids, inputs.images, pos, delta)
    runner = ModelRunner(loaded.model, num_blocks=64, block_size=16)
    table = list(np.random.default_rng(0).permutation(64)[: (len(ids) + 15) // 16])  # scattered blocks
    bounds = np.linspace(0, len(ids), chunks + 1).astype(int)
    hidden = [
        runner.forward([ScheduledChunk(seq, int(s), int(e), table)]) for s, e in itertools.pairwise(bounds)
    ]
    with torch.no_grad():
        return ids, loaded.model.compute_logits(torch.cat(hidden))


@pytest.mark.parametrize("case", ["text", "one_image", "two_images"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_logits_match_transformers(w8, case, chunks):
    """Every prompt position's logits equal the reference's (prefill whole, or in 3 chunks
    whose boundaries fall inside images), on scattered KV blocks."""
    loaded, ref, processor, ref_inputs = w8
    messages, images = _conversation(case)
    ids, ours = _our_logits(loaded, processor, with_inline_images(messages, images), chunks)
    ref_in = ref_inputs.build(messages, images)
    assert ids == ref_in["input_ids"][0].tolist(), (
        "our chat template + image expansion differ from transformers'"
    )
    if images and chunks == 3:
        img = np.flatnonzero(np.array(ids) == loaded.config.image_token_id)
        cuts = np.linspace(0, len(ids), 4).astype(int)[1:-1]
        assert any(img.min() < c <= img.max() for c in cuts), "a chunk boundary should split an image"
    with torch.no_grad():
        expected = ref(**ref_in).logits[0]
    scale = expected.abs().max()
    err = (ours - expected).abs().max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("kind", ["w8", "w4", "awq", "bf16"])
def test_greedy_generation_matches_transformers(demo_dir, kind):
    """32 greedy tokens through LLM.chat equal transformers' generate, text and image chats."""
    llm = LLM(str(demo_dir(kind)), device="cpu", max_model_len=1024)
    ref = reference_model(load_model(demo_dir(kind)))
    ref_inputs = ReferenceInputs(demo_dir(kind))
    eos = llm.processor.eos_token_ids
    for case in ("text", "one_image", "two_images"):
        messages, images = _conversation(case)
        out = llm.chat(with_inline_images(messages, images), SamplingParams(temperature=0, max_tokens=32))[0]
        ref_in = ref_inputs.build(messages, images)
        with torch.no_grad():
            gen = ref.generate(
                **ref_in, max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
            )
        expected = gen[0, ref_in["input_ids"].shape[1] :].tolist()
        got = out.outputs[0].token_ids
        assert got == expected, f"{kind}/{case}: ours {got} vs transformers {expected}"
        assert len(set(got)) > 8, f"{kind}/{case}: demo output should be varied, got {got}"
