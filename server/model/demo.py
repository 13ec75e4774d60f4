"""The tiny demo checkpoint: a few-MB Qwen3-VL in exactly the GRACE formats.

`python -m server.model.demo OUT_DIR [--bits 8|4] [--format qat|awq|bf16] [--seed N]`

It is what `make serve` serves, what the tests use, and what transformers loads as the
reference. Everything is deterministic for a seed: weights come from a seeded torch
generator and the byte-level BPE tokenizer is trained on a fixed built-in corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels import QuantizedWeight, quantize

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added but not special, as in the real tokenizer (ids 151657/8, 151665-8 there): decoding with
# skip_special_tokens keeps them, so tool calls and reasoning survive into the output text.
EXTRA_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

# Qwen3-VL-2B-Instruct's own chat template, verbatim (tests/test_tool_calls.py compares it with
# the vendored copy in tests/data): tools in the system turn, assistant tool_calls as
# <tool_call> blocks, tool results as <tool_response> blocks in a user turn, each image as
# <|vision_start|><|image_pad|><|vision_end|> (expanded later to one pad per merged patch).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "are",
    "image",
    "picture",
    "photo",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "shows",
    "there",
    "one",
    "two",
    "three",
    "color",
    "shape",
    "describe",
    "what",
    "where",
    "how",
    "many",
    "people",
    "tree",
    "house",
    "car",
    "sky",
    "water",
    "light",
    "dark",
    "bright",
    "circle",
    "square",
    "line",
    "hello",
    "world",
    "question",
    "answer",
    "model",
    "vision",
    "language",
    "token",
    "server",
    "fast",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "number",
    "text",
    "letter",
    "word",
    "sentence",
    "paragraph",
    "page",
    "book",
    "read",
    "write",
    "see",
    "look",
    "find",
    "count",
    "name",
    "place",
    "time",
]

DEMO_TEXT = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    mrope_section=[12, 10, 10],
    rope_theta=5_000_000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
DEMO_VISION = dict(
    depth=3,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0, 1],
)
DEMO_MIN_PIXELS = 32 * 32
DEMO_MAX_PIXELS = 32 * 32 * 64  # at most 64 image tokens per image: cheap on CPU


def _corpus(seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(400):
        n = int(torch.randint(4, 16, (1,), generator=g))
        idx = torch.randint(0, len(_CORPUS_WORDS), (n,), generator=g).tolist()
        words = [_CORPUS_WORDS[i] for i in idx]
        lines.append(" ".join(words).capitalize() + ".")
    lines += ["0123456789 +-*/=()[]{}<>,.;:!?'\" é ü ß 中文 日本語 🙂"]
    return lines


def build_tokenizer(seed: int, vocab_size: int = 480):
    """Byte-level BPE with Qwen's special tokens, then its added non-special ones, appended after
    the learned vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_ADDED_TOKENS])
    return tok


def _vision_keys(prefix: str, v: dict, out_hidden: int) -> dict[str, tuple[int, ...]]:
    d, inter = v["hidden_size"], v["intermediate_size"]
    c, t, p, m = v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["spatial_merge_size"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.patch_embed.proj.weight": (d, c, t, p, p),
        f"{prefix}.patch_embed.proj.bias": (d,),
        f"{prefix}.pos_embed.weight": (v["num_position_embeddings"], d),
    }
    for i in range(v["depth"]):
        b = f"{prefix}.blocks.{i}"
        shapes |= {
            f"{b}.norm1.weight": (d,),
            f"{b}.norm1.bias": (d,),
            f"{b}.norm2.weight": (d,),
            f"{b}.norm2.bias": (d,),
            f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d),
            f"{b}.attn.proj.bias": (d,),
            f"{b}.mlp.linear_fc1.weight": (inter, d),
            f"{b}.mlp.linear_fc1.bias": (inter,),
            f"{b}.mlp.linear_fc2.weight": (d, inter),
            f"{b}.mlp.linear_fc2.bias": (d,),
        }
    merged = d * m * m
    mergers = [f"{prefix}.merger"] + [
        f"{prefix}.deepstack_merger_list.{j}" for j in range(len(v["deepstack_visual_indexes"]))
    ]
    for j, mp in enumerate(mergers):
        norm = d if j == 0 else merged  # deepstack mergers normalize after the 2x2 shuffle
        shapes |= {
            f"{mp}.norm.weight": (norm,),
            f"{mp}.norm.bias": (norm,),
            f"{mp}.linear_fc1.weight": (merged, merged),
            f"{mp}.linear_fc1.bias": (merged,),
            f"{mp}.linear_fc2.weight": (out_hidden, merged),
            f"{mp}.linear_fc2.bias": (out_hidden,),
        }
    return shapes


def _text_keys(prefix: str, t: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    h, inter, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    nq, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.embed_tokens.weight": (vocab, h),
        f"{prefix}.norm.weight": (h,),
    }
    for i in range(t["num_hidden_layers"]):
        b = f"{prefix}.layers.{i}"
        shapes |= {
            f"{b}.input_layernorm.weight": (h,),
            f"{b}.post_attention_layernorm.weight": (h,),
            f"{b}.self_attn.q_proj.weight": (nq * hd, h),
            f"{b}.self_attn.k_proj.weight": (nkv * hd, h),
            f"{b}.self_attn.v_proj.weight": (nkv * hd, h),
            f"{b}.self_attn.o_proj.weight": (h, nq * hd),
            f"{b}.self_attn.q_norm.weight": (hd,),
            f"{b}.self_attn.k_norm.weight": (hd,),
            f"{b}.mlp.gate_proj.weight": (inter, h),
            f"{b}.mlp.up_proj.weight": (inter, h),
            f"{b}.mlp.down_proj.weight": (h, inter),
        }
    return shapes


def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random weights scaled so that greedy output varies. A random tied-embedding model
    otherwise echoes its last token (the residual keeps the token's own embedding, and
    lm_head is that embedding): keep embeddings small, let the residual branches dominate,
    and sharpen attention with large q/k-norm gains so outputs depend on context."""
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return 2.0 * (1.0 + 0.1 * torch.randn(shape, generator=g))
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if "embed_tokens" in name:
        return 0.05 * torch.randn(shape, generator=g)
    if "pos_embed" in name:
        return 0.5 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])
    gain = 4.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
    return gain * torch.randn(shape, generator=g) / math.sqrt(fan_in)


def is_quantized_name(name: str, skip_keywords: tuple[str, ...]) -> bool:
    """GRACE quantizes every nn.Linear whose dotted name contains none of the skip words."""
    module = name.rsplit(".", 1)[0]
    return (
        name.endswith(".weight")
        and ("_proj" in module)
        and not any(k in module for k in skip_keywords)
        and "norm" not in module.rsplit(".", 1)[-1]
    )


def write_demo_checkpoint(out_dir: str | Path, bits: int = 8, fmt: str = "qat", seed: int = 0) -> Path:
    """Write the demo checkpoint into out_dir (created) and return it."""
    if fmt not in ("qat", "awq", "bf16"):
        raise ValueError(f"unknown demo format {fmt!r}: expected qat, awq or bf16")
    if fmt == "awq" and bits != 4:
        raise ValueError("the AWQ format is 4-bit only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(seed)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = 64 * math.ceil(tok.get_vocab_size() / 64)  # padded like real checkpoints
    text_cfg = dict(DEMO_TEXT)
    vision_cfg = dict(DEMO_VISION, out_hidden_size=text_cfg["hidden_size"])
    skip = ["visual", "merger", "lm_head", "embed_tokens"]

    g = torch.Generator().manual_seed(seed)
    shapes = _text_keys("model.language_model", text_cfg, vocab) | _vision_keys(
        "model.visual", vision_cfg, text_cfg["hidden_size"]
    )
    tensors: dict[str, torch.Tensor] = {}
    sidecar: dict[str, torch.Tensor] = {}
    awq_modules: list[str] = []
    for name, shape in shapes.items():
        w = _init(name, shape, g)
        if fmt != "bf16" and is_quantized_name(name, tuple(skip)):
            module = name[: -len(".weight")]
            qw = quantize(w, bits=bits, group_size=128)
            # QAT-learned scales are not exactly max/qmax: jitter them so the loader cannot
            # assume round-to-nearest scales, then requantize onto that grid.
            jitter = torch.exp(0.05 * torch.randn(qw.scales.shape, generator=g))
            scales = (qw.scales * jitter).float()
            log_scale = scales.log().flatten()
            scales = log_scale.exp().reshape(scales.shape)  # exactly what the loader will compute
            qmax = 2 ** (bits - 1) - 1
            n, k = w.shape
            codes = torch.clamp(torch.round(w.reshape(n, -1, 128) / scales[..., None]), -qmax - 1, qmax)
            qw = QuantizedWeight.from_codes(codes.reshape(n, k).to(torch.int8), scales, bits, 128)
            if fmt == "qat":
                fake = qw.dequantize(torch.float32).to(torch.bfloat16)
                tensors[name] = fake
                sidecar[f"{module}.weight"] = fake.clone()
                sidecar[f"{module}.log_scale"] = log_scale.clone()
            else:
                # AWQ stores fp16 scales: round first so the codes sit on the stored grid.
                qw = QuantizedWeight.from_codes(qw.codes(), qw.scales.half().float(), bits, 128)
                qweight, qzeros, awq_scales = qw.to_awq()
                tensors[f"{module}.qweight"] = qweight
                tensors[f"{module}.qzeros"] = qzeros
                tensors[f"{module}.scales"] = awq_scales
                awq_modules.append(module)
        else:
            tensors[name] = w.to(torch.bfloat16)

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if fmt == "qat":
        torch.save(sidecar, out / "qat_quantized_weights.bin")
    if fmt == "awq":
        (out / "awq_quantized_modules.json").write_text(
            json.dumps({"bits": 4, "group_size": 128, "modules": awq_modules}, indent=1)
        )

    text_json = {
        "model_type": "qwen3_vl_text",
        "vocab_size": vocab,
        "hidden_size": text_cfg["hidden_size"],
        "intermediate_size": text_cfg["intermediate_size"],
        "num_hidden_layers": text_cfg["num_hidden_layers"],
        "num_attention_heads": text_cfg["num_attention_heads"],
        "num_key_value_heads": text_cfg["num_key_value_heads"],
        "head_dim": text_cfg["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": text_cfg["max_position_embeddings"],
        "rms_norm_eps": text_cfg["rms_norm_eps"],
        # transformers-4 spelling, as the GRACE release was written; the loader accepts both.
        "rope_scaling": {
            "rope_type": "default",
            "mrope_section": text_cfg["mrope_section"],
            "mrope_interleaved": True,
        },
        "rope_theta": text_cfg["rope_theta"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": text_json,
        "vision_config": dict(
            vision_cfg, model_type="qwen3_vl", hidden_act="gelu_pytorch_tanh", initializer_range=0.02
        ),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "grace_demo": {"seed": seed, "format": fmt, "bits": bits if fmt != "bf16" else 16},
    }
    if fmt == "qat":
        config["qat"] = {
            "bits": bits,
            "group_size": 128,
            "skip_keywords": skip,
            "num_replaced": len(sidecar) // 2,
        }
    if fmt == "awq":
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": ["visual", "lm_head"],
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": ids["<|endoftext|>"],
                "pad_token_id": ids["<|endoftext|>"],
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "do_sample": True,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
            },
            indent=2,
        )
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": text_cfg["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
                "add_bos_token": False,
            },
            indent=2,
        )
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen3VLProcessor",
                "patch_size": vision_cfg["patch_size"],
                "temporal_patch_size": vision_cfg["temporal_patch_size"],
                "merge_size": vision_cfg["spatial_merge_size"],
                "size": {"shortest_edge": DEMO_MIN_PIXELS, "longest_edge": DEMO_MAX_PIXELS},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )
    return out


DEMO_NAMES = {
    "demo": ("qat", 8),
    "demo-w8": ("qat", 8),
    "demo-w4": ("qat", 4),
    "demo-awq": ("awq", 4),
    "demo-bf16": ("bf16", 8),
}


def demo_cache_dir() -> Path:
    root = os.environ.get("GRACE_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grace-serve"
    )
    return Path(root)


def _source_fingerprint() -> str:
    # A change to this file or the kernels' packing invalidates cached demo checkpoints.
    h = hashlib.sha256(Path(__file__).read_bytes())
    import kernels.quant as kq

    h.update(Path(kq.__file__).read_bytes())
    return h.hexdigest()[:12]


def resolve_demo(name: str, seed: int = 0) -> Path:
    """Build the named demo checkpoint once into the cache folder and return its path."""
    fmt, bits = DEMO_NAMES[name]
    target = demo_cache_dir() / f"{name}-seed{seed}-{_source_fingerprint()}"
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    write_demo_checkpoint(tmp, bits=bits, fmt=fmt, seed=seed)
    try:
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written folder
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8)
    ap.add_argument("--format", choices=("qat", "awq", "bf16"), default="qat")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = write_demo_checkpoint(args.out_dir, bits=args.bits, fmt=args.format, seed=args.seed)
    print(f"wrote {args.format} demo checkpoint ({args.bits}-bit) to {path}")


if __name__ == "__main__":
    main()
