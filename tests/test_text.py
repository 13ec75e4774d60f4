"""Text handling: chat template + image expansion, prompt errors, incremental detokenization
with stop-string hold-back, and SamplingParams validation."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampling_params import SamplingParams
from server.model.images import ImageError
from server.model.model_config import ModelConfig
from server.model.processor import Processor, PromptError


@pytest.fixture(scope="module")
def processor(demo_dir) -> Processor:
    path = demo_dir("w8")
    return Processor(path, ModelConfig.from_file(path / "config.json"))


def _png_data_url(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_pads_expand_to_merged_patch_count(processor):
    url = _png_data_url(100, 60)
    inputs = processor.process_chat(
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
            }
        ]
    )
    (im,) = inputs.images
    pad = processor.config.image_token_id
    ids = inputs.prompt_token_ids
    assert ids.count(pad) == im.num_tokens == im.grid_thw[1] * im.grid_thw[2] // 4
    start = ids.index(pad)
    assert ids[start - 1] == processor.config.vision_start_token_id
    assert ids[start + im.num_tokens] == processor.config.vision_end_token_id
    same = processor.process_chat(
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": "hi"}],
            }
        ]
    )
    assert same.images[0].content_hash == im.content_hash  # bare-string image_url spelling too


@pytest.mark.parametrize(
    ("messages", "error", "fragment"),
    [
        ([], PromptError, "empty"),
        ([{"role": "user", "content": 5}], PromptError, "content must be"),
        ([{"role": "user", "content": [{"type": "audio"}]}], PromptError, "not supported"),
        ([{"role": "user", "content": [{"type": "text"}]}], PromptError, "text must be a string"),
        ([{"role": "user", "content": ["plain string part"]}], PromptError, "must be an object"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], PromptError, "url must be"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@@"}]}],
            ImageError,
            "invalid base64",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}]}],
            ImageError,
            "unsupported image URL scheme",
        ),
    ],
)
def test_bad_messages_raise_clear_errors(processor, messages, error, fragment):
    with pytest.raises(error, match=fragment):
        processor.process_chat(messages)


def test_raw_prompt_cannot_smuggle_image_tokens(processor):
    with pytest.raises(PromptError, match="image placeholder"):
        processor.process_prompt([processor.config.image_token_id, 5, 6])
    with pytest.raises(PromptError, match="image placeholders"):
        processor.build_inputs("<|image_pad|>", [])


def test_detokenizer_never_emits_half_characters(processor):
    text = "caf\u00e9 \u4e2d\u6587 \U0001f642 done"
    ids = processor.encode(text)
    detok = IncrementalDetokenizer(processor)
    pieces = []
    for t in ids:
        detok.add_tokens([t])
        delta = detok.take_delta()
        assert "\ufffd" not in delta
        pieces.append(delta)
    detok.flush()
    pieces.append(detok.take_delta(final=True))
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 3  # it really streamed


def test_stop_string_hold_back_and_cut(processor):
    ids = processor.encode("the cat sat on the mat. the end")
    detok = IncrementalDetokenizer(processor, stop=["on the mat", "xyz"])
    streamed = ""
    for t in ids:
        detok.add_tokens([t])
        streamed += detok.take_delta()
        if detok.stopped_by:
            break
        # nothing that could still turn into a stop string has been handed out
        assert not streamed.endswith(("o", "on", "on ", "on t", "x", "xy"))
    streamed += detok.take_delta(final=True)
    assert detok.stopped_by == "on the mat"
    assert streamed == detok.text == "the cat sat "


def test_stop_string_kept_when_asked(processor):
    detok = IncrementalDetokenizer(processor, stop=["sat"], include_stop_str_in_output=True)
    detok.add_tokens(processor.encode("the cat sat down"))
    assert detok.text == "the cat sat"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_normalizes():
    p = SamplingParams(stop="x", top_k=-1)
    assert p.stop == ["x"] and p.top_k == 0 and not p.greedy
    assert SamplingParams(temperature=0).greedy


def test_min_tokens_holds_stop_strings_back(processor):
    """Like vLLM, a stop string only counts once min_tokens tokens exist."""
    ids = processor.encode("the cat sat on the mat and the cat ran")
    detok = IncrementalDetokenizer(processor, stop=["cat"], min_tokens=4)
    for t in ids:
        detok.add_tokens([t])
        if detok.stopped_by:
            break
    assert detok.stopped_by == "cat"
    assert detok.text.startswith("the cat sat") and detok.text.endswith("and the ")


def test_invalid_unicode_is_a_prompt_error(processor):
    """A lone UTF-16 surrogate (valid JSON, invalid text) is a client error, not a crash."""
    with pytest.raises(PromptError, match="cannot be tokenized"):
        processor.encode("a\ud800")
    with pytest.raises(PromptError):
        processor.process_chat([{"role": "user", "content": "x\udfff"}])
