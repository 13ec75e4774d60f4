"""Chat messages -> token ids + preprocessed images, and token ids -> text.

The chat template comes from the checkpoint (rendered in a sandboxed Jinja environment, as
transformers does); the tokenizer is the checkpoint's tokenizer.json via `tokenizers`.
Each image part becomes `<|vision_start|><|image_pad|><|vision_end|>` in the template and the
single pad is then expanded to one pad per merged patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import Tokenizer

from .images import ImageSettings, ProcessedImage, decode_data_url, hash_bytes, load_image, preprocess_image
from .model_config import ModelConfig


class PromptError(ValueError):
    """The request's messages or prompt cannot be turned into model input (HTTP 400)."""


class ImageCountError(PromptError):
    """The rendered prompt has a different number of image placeholders than images."""


@dataclass
class PromptInputs:
    """Everything the engine needs for one prompt."""

    prompt_token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)
    prompt: str | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands for it
    in the vocabulary (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _raise(message: str) -> None:
    raise TemplateError(message)


LONG_TEXT_CHARS = 4096  # longer texts (and id lists) are tokenized without holding the GIL


class Processor:
    def __init__(
        self, path: str | Path, config: ModelConfig, image_overrides: dict[str, Any] | None = None
    ) -> None:
        path = Path(path)
        self.config = config
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        # UTF-8 bytes of the longest token string: byte-level and metaspace alphabets spell a
        # byte with at least one byte, so this bounds the text bytes one token can cover
        self._byte_level = type(self.tokenizer.decoder).__name__ == "ByteLevel"
        added = self.tokenizer.get_added_tokens_decoder()
        self._added_ids = set(added)
        self.special_ids = frozenset(
            i for i, t in added.items() if t.special
        )  # what skip_special_tokens drops
        self._token_bytes: dict[int, bytes] = {}
        self.max_token_bytes = max(len(t.encode()) for t in self.tokenizer.get_vocab(with_added_tokens=True))
        self.chat_template = _read_chat_template(path)
        pre = path / "preprocessor_config.json"
        pre_cfg = json.loads(pre.read_text()) if pre.exists() else {}
        self.image_settings = ImageSettings.from_preprocessor_config(pre_cfg, **(image_overrides or {}))
        if self.image_settings.patch_size != config.vision.patch_size:
            raise ValueError("preprocessor_config.json patch_size disagrees with the vision config")
        self.eos_token_ids = read_eos_token_ids(path, self.tokenizer)
        self.generation_defaults = _generation_defaults(path)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, even when it is part of a UTF-8 character (decoding it alone
        gives U+FFFD): concatenated over the output they give back its text's bytes."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self._added_ids or not self._byte_level:
            out = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        else:
            out = bytes(_BYTE_OF_CHAR.get(ch, 0) for ch in piece)
        self._token_bytes[token_id] = out
        return out

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Long texts go through the batch API, which releases the GIL
        while it works (single encode() holds it: a 1 MB text in a worker thread stalled the
        event loop for seconds)."""
        try:
            if len(text) < LONG_TEXT_CHARS:
                return self.tokenizer.encode(text, add_special_tokens=False).ids
            return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError as e:  # e.g. a lone UTF-16 surrogate: not valid Unicode text
            raise PromptError(f"the text cannot be tokenized (invalid Unicode?): {e}") from e

    def min_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of any text of `num_chars` characters, known without
        tokenizing it: no token covers more than max_token_bytes bytes, nor a character less
        than one byte."""
        return -(-num_chars // self.max_token_bytes)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = list(token_ids)
        if len(ids) < LONG_TEXT_CHARS:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]  # frees the GIL

    # -- chat ------------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if self._template is None:
            raise PromptError("this model has no chat template; use completions with a plain prompt")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except TemplateError as e:
            raise PromptError(f"chat template error: {e}") from e

    def process_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> PromptInputs:
        """OpenAI-style messages (content: str or parts `text`/`image_url`/`image`) -> inputs."""
        if not messages:
            raise PromptError("messages must not be empty")
        normalized: list[dict[str, Any]] = []
        sources: list[Any] = []
        for i, msg in enumerate(messages):
            content = msg.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    kind, value = _classify_part(part, f"messages[{i}].content[{j}]")
                    if kind == "image":
                        sources.append(value)
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": value})
                content = parts
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise PromptError(f"messages[{i}].content must be a string or a list of content parts")
            normalized.append({**msg, "content": content})
        text = self.render_chat(normalized, add_generation_prompt, **template_kwargs)
        images = [self.load(src) for src in sources]
        return self.build_inputs(text, images)

    def process_prompt(self, prompt: str | list[int]) -> PromptInputs:
        """A raw completion prompt (text or token ids), no images."""
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt)
        if self.config.image_token_id in ids:
            raise PromptError("image placeholder tokens are only allowed through chat messages with images")
        return PromptInputs(ids, [], prompt if isinstance(prompt, str) else None)

    def load(self, source: Any) -> ProcessedImage:
        """A data: URL, raw bytes, or a PIL image -> preprocessed pixels."""
        s = self.image_settings
        if isinstance(source, Image.Image):
            return preprocess_image(source, s)
        if isinstance(source, str):
            source = decode_data_url(source, s.max_encoded_bytes)
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
            return preprocess_image(load_image(data, s), s, content_hash=hash_bytes(data, s))
        raise PromptError(f"unsupported image source {type(source).__name__}")

    def build_inputs(self, text: str, images: list[ProcessedImage]) -> PromptInputs:
        """Tokenize and expand each image pad to the image's token count."""
        ids = self.encode(text)
        pad = self.config.image_token_id
        n_pads = ids.count(pad)
        if n_pads != len(images):
            raise ImageCountError(
                f"the prompt has {n_pads} image placeholders but {len(images)} images were given"
            )
        out: list[int] = []
        it = iter(images)
        for t in ids:
            if t == pad:
                out.extend([pad] * next(it).num_tokens)
            else:
                out.append(t)
        return PromptInputs(out, images, text)


def _classify_part(part: Any, where: str) -> tuple[str, Any]:
    if not isinstance(part, dict):
        raise PromptError(f"{where} must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where}.text must be a string")
        return "text", text
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise PromptError(f"{where}.image_url.url must be a string")
        return "image", url
    if kind == "image":
        value = part.get("image")
        if value is None:
            raise PromptError(f"{where}.image is missing")
        return "image", value
    raise PromptError(f"{where}.type {kind!r} is not supported (use 'text' or 'image_url')")


def _read_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            tpl = json.loads(f.read_text()).get("chat_template")
            if isinstance(tpl, str):
                return tpl
            if isinstance(tpl, list):  # named templates: take "default"
                named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                if named.get("default"):
                    return named["default"]
    return None


def read_eos_token_ids(path: Path, tok: Tokenizer) -> list[int]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    tc = path / "tokenizer_config.json"
    if tc.exists():
        eos_tok = json.loads(tc.read_text()).get("eos_token")
        eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
        if isinstance(eos_tok, str) and tok.token_to_id(eos_tok) is not None:
            ids.append(tok.token_to_id(eos_tok))
    if not ids and tok.token_to_id("<|im_end|>") is not None:
        ids.append(tok.token_to_id("<|im_end|>"))
    return list(dict.fromkeys(int(i) for i in ids))


def _generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults the model ships (used when a request leaves them out, like vLLM)."""
    gen = path / "generation_config.json"
    if not gen.exists():
        return {}
    raw = json.loads(gen.read_text())
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: raw[k] for k in keys if k in raw}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
