"""Checkpoint formats -> our Qwen3VL module (see GRACE_FORMAT.md).

Formats: GRACE QAT (safetensors + qat_quantized_weights.bin with log_scales), GRACE
AWQ-packed W4, and plain bf16 (optionally round-to-nearest quantized at load). Shards are
streamed tensor by tensor: quantized weights become int codes as soon as they are read, so
peak memory is about one copy of the served weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from kernels import QuantizationError, QuantizedWeight, quantize

from .demo import DEMO_NAMES, resolve_demo
from .layers import Linear, release_freed_memory
from .model_config import ModelConfig
from .qwen3_vl import Qwen3VL

log = logging.getLogger(__name__)

SIDECAR = "qat_quantized_weights.bin"
AWQ_MODULES = "awq_quantized_modules.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", SIDECAR, "*.jinja", "*.txt", "tokenizer*", "*.model"]


class CheckpointError(ValueError):
    """The checkpoint cannot be served as it is; the message names the file or tensor."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes in our model: parameter path, and for fused linears
    which part of how many (q|k|v -> qkv_proj, gate|up -> gate_up_proj)."""

    path: str
    part: int = 0
    parts: int = 1


_TEXT_RULES = [
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.qkv_proj.\2", 0, 3),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.qkv_proj.\2", 1, 3),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.qkv_proj.\2", 2, 3),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.o_proj.\2", 0, 1),
    (r"layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", r"layers.\1.\2.weight", 0, 1),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.gate_up_proj.weight", 0, 2),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.gate_up_proj.weight", 1, 2),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.down_proj.weight", 0, 1),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight", 0, 1),
    (r"embed_tokens\.weight", "embed_tokens.weight", 0, 1),
    (r"norm\.weight", "norm.weight", 0, 1),
]
_VISION_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", r"visual.patch_embed.\1"),
    (r"pos_embed\.weight", "visual.pos_embed.weight"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.linear_(fc1|fc2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    (r"merger\.norm\.(weight|bias)", r"visual.merger.norm.\1"),
    (r"merger\.linear_(fc1|fc2)\.(weight|bias)", r"visual.merger.\1.\2"),
    (r"deepstack_merger_list\.(\d+)\.norm\.(weight|bias)", r"visual.deepstack_mergers.\1.norm.\2"),
    (r"deepstack_merger_list\.(\d+)\.linear_(fc1|fc2)\.(weight|bias)", r"visual.deepstack_mergers.\1.\2.\3"),
]
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|num_batches_tracked)$")


def canonical_name(name: str) -> str:
    """Older Qwen-VL releases use `model.*` / `visual.*`; newer `model.language_model.*` /
    `model.visual.*`. Map both to the newer spelling."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model.") :]
    return name


def target_of(name: str) -> Target | None:
    """Our parameter for a (canonical) checkpoint tensor name, or None if it is not ours."""
    if name == "lm_head.weight":
        return Target("lm_head")
    for prefix, rules in (("model.language_model.", _TEXT_RULES), ("model.visual.", None)):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rules is not None:
            for pattern, repl, part, parts in rules:
                if re.fullmatch(pattern, rest):
                    return Target(re.sub(pattern, repl, rest), part, parts)
        else:
            for pattern, repl in _VISION_RULES:
                if re.fullmatch(pattern, rest):
                    return Target(re.sub(pattern, repl, rest))
    return None


# ---------------------------------------------------------------------------------------
# Locating a checkpoint


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A demo name, a local folder, or a hub id (downloaded once; honours HF_HUB_OFFLINE)."""
    if model in DEMO_NAMES:
        return resolve_demo(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth, offline cache miss: all one message for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(f"could not fetch {model!r} from the hub{hint}: {e}") from e


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing: {missing}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(path.glob("model-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no model.safetensors (or shards with an index) in {path}")


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(f: BinaryIO, name: str) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of an open .safetensors file."""
    size = int.from_bytes(f.read(8), "little")
    try:
        header = json.loads(f.read(size))
    except ValueError as e:
        raise CheckpointError(f"{name}: unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_tensor(f: BinaryIO, base: int, key: str, info: dict, name: str) -> torch.Tensor:
    """One tensor read straight into its own memory: no mmap, so the file's pages are not
    counted in this process's RSS, and no second copy (safe_open maps the whole file)."""
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{name}: tensor {key} has an unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(base + begin)
    if end > begin and f.readinto(out.numpy()) != end - begin:
        raise CheckpointError(f"{name}: file is truncated (tensor {key})")
    return out.view(dtype).reshape(info["shape"])


def _iter_tensors(files: list[Path], desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    headers = []
    for path in files:
        with open(path, "rb") as f:
            headers.append(_safetensors_header(f, path.name))
    total = sum(len(h) for h, _ in headers)
    with tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for path, (header, base) in zip(files, headers):
            with open(path, "rb", buffering=0) as f:
                for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    yield key, _read_tensor(f, base, key, info, path.name)
                    bar.update()


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: Qwen3VL
    config: ModelConfig
    path: Path
    quantization: str  # "w8g128", "w4g128", "w4g128-awq", "none"


def load_model(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    revision: str | None = None,
    quantize_lm_head: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint into our Qwen3VL on `device`.

    dtype: activation/dense-weight dtype (default: `default_dtype`, bfloat16 on CUDA and for
    big models on CPU, float32 for small ones such as the demo).
    quantization: for checkpoints without GRACE scales, "w8g128"/"w4g128" quantizes at load
    (round-to-nearest, not the QAT scales); None/"none" serves them dense.
    quantize_lm_head: logits from a W8G128 round-to-nearest copy of the head (server/model/lm_head.py).
    """
    path = resolve_model_path(str(model), revision)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"no config.json in {path}")
    config = ModelConfig.from_file(cfg_file)
    device = torch.device(device)

    awq = _read_awq_modules(path, config)
    sidecar = _read_sidecar(path, config)
    if quantization not in (None, "none", "w8g128", "w4g128"):
        raise CheckpointError(f"unknown quantization {quantization!r}: expected w8g128, w4g128 or none")
    rtn_bits = {"w8g128": 8, "w4g128": 4}.get(quantization or "none")
    if rtn_bits and (sidecar or awq):
        raise CheckpointError(
            "this checkpoint is already quantized; --quantization only applies to bf16 checkpoints"
        )
    if rtn_bits:
        log.warning(
            "quantizing at load to %s with round-to-nearest scales (not the GRACE QAT scales)", quantization
        )

    with torch.device("meta"):
        net = Qwen3VL(config)
    if dtype is None:
        dtype, why = default_dtype(device, num_parameters(net))
        log.info("dtype %s: %s", str(dtype).replace("torch.", ""), why)
    params: dict[str, torch.Tensor | QuantizedWeight] = {}
    pending: dict[str, dict[int, torch.Tensor | QuantizedWeight]] = {}
    expected = _expected_shapes(net)
    splits = fused_splits(config)
    seen_quantized: set[str] = set()

    def place(target: Target, value: torch.Tensor | QuantizedWeight, source: str) -> None:
        if target.parts == 1:
            params[target.path] = value
            return
        parts = pending.setdefault(target.path, {})
        parts[target.part] = value
        if len(parts) == target.parts:
            ordered = [parts[i] for i in range(target.parts)]
            if any(isinstance(p, QuantizedWeight) for p in ordered):
                if not all(isinstance(p, QuantizedWeight) for p in ordered):
                    raise CheckpointError(
                        f"{source}: fused parts of {target.path} mix quantized and dense weights"
                    )
                params[target.path] = QuantizedWeight.cat(ordered)  # type: ignore[arg-type]
            else:
                params[target.path] = torch.cat(ordered, dim=0)  # type: ignore[arg-type]
            del pending[target.path]

    files = _safetensors_files(path)
    awq_parts: dict[str, dict[str, torch.Tensor]] = {}
    wanted = {n for n in _all_hf_names(net) if not (n == "lm_head.weight" and config.tie_word_embeddings)}
    seen: set[str] = set()
    v = config.vision
    patch_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for raw_name, tensor in _iter_tensors(files, f"loading {path.name}"):
        name = canonical_name(raw_name)
        seen.add(name)
        module, _, leaf = name.rpartition(".")
        if module in awq and leaf in ("qweight", "qzeros", "scales"):
            got = awq_parts.setdefault(module, {})
            got[leaf] = tensor
            if len(got) == 3:
                try:
                    qw = QuantizedWeight.from_awq(
                        got["qweight"], got["qzeros"], got["scales"], awq[module], name=module
                    )
                except QuantizationError as e:
                    raise CheckpointError(str(e)) from e
                target = target_of(module + ".weight")
                assert target is not None
                _check_shape(expected, splits, target, (qw.out_features, qw.in_features), module)
                place(target, qw.to(device), module)
                seen_quantized.add(module)
                seen.add(module + ".weight")
                del awq_parts[module]
            continue
        target = target_of(name)
        if target is None:
            if not _IGNORED.match(name):
                log.warning("ignoring unexpected checkpoint tensor %s", raw_name)
            continue
        if target.path == "visual.patch_embed.weight":
            if tuple(tensor.shape) != patch_shape:
                raise CheckpointError(
                    f"{raw_name}: shape {list(tensor.shape)} does not match the config's {list(patch_shape)}"
                )
            tensor = tensor.reshape(tensor.shape[0], -1)  # Conv3d with stride == kernel -> Linear
        if target.path == "lm_head" and config.tie_word_embeddings:
            continue
        _check_shape(expected, splits, target, tuple(tensor.shape), raw_name)
        if sidecar is not None and leaf == "weight" and _is_decoder_linear(target) and module not in sidecar:
            raise CheckpointError(
                f"{module}: quantized module has no log_scale entry in {SIDECAR} (missing sidecar entry)"
            )
        if sidecar is not None and module in sidecar and leaf == "weight":
            try:
                value: torch.Tensor | QuantizedWeight = QuantizedWeight.from_grace(
                    tensor,
                    sidecar[module],
                    config.qat.bits,
                    config.qat.group_size,
                    name=module,  # type: ignore[union-attr]
                ).to(device)
            except QuantizationError as e:
                raise CheckpointError(str(e)) from e
            seen_quantized.add(module)
        elif rtn_bits and _is_decoder_linear(target):
            value = quantize(tensor.float(), bits=rtn_bits, group_size=128).to(device)
        else:
            value = tensor.to(device=device, dtype=dtype)
        place(target, value, raw_name)

    if awq_parts:
        first = next(iter(awq_parts))
        raise CheckpointError(
            f"AWQ module {first} is missing {sorted({'qweight', 'qzeros', 'scales'} - set(awq_parts[first]))}"
        )
    listed = set(sidecar or ()) | set(awq)
    if listed - seen_quantized:
        missing = sorted(listed - seen_quantized)[0]
        raise CheckpointError(f"quantized module {missing} is listed but its weight is not in the checkpoint")
    missing = sorted(wanted - seen)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    assert not pending, pending  # every fused part arrived (all wanted names were seen)

    _install(net, params, expected, device, dtype)
    if quantize_lm_head:
        net.quantize_lm_head()
        log.warning(
            "lm_head quantized at load to w8g128 (round-to-nearest; changes the logits): %.1f MB",
            net.quantized_head.nbytes / 1e6,  # type: ignore[union-attr]
        )
    quant = "none"
    if sidecar is not None:
        quant = f"w{config.qat.bits}g{config.qat.group_size}"  # type: ignore[union-attr]
    elif awq:
        quant = "w4g128-awq"
    elif rtn_bits:
        quant = str(quantization)
    release_freed_memory()  # the verification's temporaries
    return LoadedModel(net.eval(), config, path, quant)


# Above this many parameters a CPU model runs in bfloat16: half the resident weights and KV
# cache, and faster matmuls where the CPU has bf16 instructions. Below it (the demo) float32
# keeps greedy output identical to transformers' fp32 reference.
CPU_BF16_MIN_PARAMS = 100_000_000


def num_parameters(net: Qwen3VL) -> int:
    """Parameters of the network, quantized linears counted at their dense size (works on meta)."""
    linears = {id(m.weight) for m in net.modules() if isinstance(m, Linear) and m.weight is not None}
    dense = sum(p.numel() for p in net.parameters() if id(p) not in linears)
    return dense + sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, Linear))


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX, via oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device, num_params: int) -> tuple[torch.dtype, str]:
    """The compute dtype when --dtype is not given, and the reason (logged at load)."""
    if device.type == "cuda":
        return torch.bfloat16, "the CUDA default"
    if num_params >= CPU_BF16_MIN_PARAMS:
        native = (
            "natively (AVX512-BF16/AMX)" if cpu_has_bf16() else "without bf16 instructions (slower matmuls)"
        )
        return torch.bfloat16, (
            f"{num_params / 1e9:.2f} B parameters on CPU (>= {CPU_BF16_MIN_PARAMS / 1e9:.1f} B): bfloat16 halves "
            f"the resident weights and KV cache; this CPU runs it {native}; --dtype float32 overrides"
        )
    return torch.float32, (
        f"{num_params / 1e6:.1f} M parameters on CPU (< {CPU_BF16_MIN_PARAMS / 1e9:.1f} B): float32, "
        "exact against transformers; --dtype bfloat16 overrides"
    )


def _is_decoder_linear(target: Target) -> bool:
    return target.path.startswith("layers.") and target.path.endswith(("proj.weight",))


def _expected_shapes(net: Qwen3VL) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    for name, mod in net.named_modules():
        if isinstance(mod, Linear):
            shapes[f"{name}.weight"] = (mod.out_features, mod.in_features)
    if not net.cfg.tie_word_embeddings:
        t = net.cfg.text
        shapes["lm_head"] = (t.vocab_size, t.hidden_size)
    return shapes


def fused_splits(config: ModelConfig) -> dict[str, list[int]]:
    """Rows of each part of a fused linear (q|k|v differ under GQA)."""
    t = config.text
    kv = t.num_key_value_heads * t.head_dim
    return {
        "qkv_proj": [t.num_attention_heads * t.head_dim, kv, kv],
        "gate_up_proj": [t.intermediate_size] * 2,
    }


def _check_shape(
    expected: dict[str, tuple[int, ...]],
    splits: dict[str, list[int]],
    target: Target,
    shape: tuple[int, ...],
    source: str,
) -> None:
    want = expected.get(target.path)
    if want is None:
        raise CheckpointError(f"{source}: the model has no parameter {target.path}")
    if target.parts > 1:
        kind = target.path.rsplit(".", 2)[-2]
        want = (splits[kind][target.part], *want[1:])
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{source}: shape {list(shape)} does not match the config's {list(want)}")


def _read_sidecar(path: Path, config: ModelConfig) -> dict[str, torch.Tensor] | None:
    """module name -> log_scale, from qat_quantized_weights.bin (weights_only: tensors only)."""
    file = path / SIDECAR
    if not file.exists():
        if config.qat is not None:
            raise CheckpointError(
                f"config.json has a qat block but {SIDECAR} is missing from {path}: "
                "the integer codes cannot be recovered without the learned scales"
            )
        return None
    if config.qat is None:
        raise CheckpointError(f"{SIDECAR} is present but config.json has no qat block (bits, group_size)")
    try:
        try:  # mmap: the real sidecar holds ~3 GB of bf16 copies we never read
            raw = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            raw = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{SIDECAR} cannot be read as a tensor-only checkpoint: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{SIDECAR} must hold a dict of tensors, found {type(raw).__name__}")
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{SIDECAR}: entry {bad[0]} is a {type(raw[bad[0]]).__name__}, not a tensor")
    scales = {canonical_name(k[: -len(".log_scale")]): v for k, v in raw.items() if k.endswith(".log_scale")}
    if not scales:
        raise CheckpointError(f"{SIDECAR} has no .log_scale entries")
    return scales


def _read_awq_modules(path: Path, config: ModelConfig) -> dict[str, int]:
    """module name -> group size for AWQ-packed modules."""
    file = path / AWQ_MODULES
    if not file.exists():
        qc = config.quantization_config or {}
        if str(qc.get("quant_method", "")).lower() == "awq":
            raise CheckpointError(f"config.json says AWQ but {AWQ_MODULES} is missing from {path}")
        return {}
    meta = json.loads(file.read_text())
    if int(meta.get("bits", 4)) != 4:
        raise CheckpointError(f"{AWQ_MODULES}: only 4-bit AWQ is supported, found bits={meta.get('bits')}")
    group = int(meta.get("group_size", 128))
    return {canonical_name(m): group for m in meta["modules"]}


def _install(net: Qwen3VL, params: dict, expected: dict, device: torch.device, dtype: torch.dtype) -> None:
    assert set(params) >= set(expected), sorted(set(expected) - set(params))  # checked by name already
    net.to_empty(device=device)
    modules = dict(net.named_modules())
    for key, value in params.items():
        if key == "lm_head":
            net.lm_head = torch.nn.Parameter(value, requires_grad=False)
            continue
        mod_name, _, leaf = key.rpartition(".")
        mod = modules[mod_name]
        if isinstance(mod, Linear) and leaf == "weight":
            if isinstance(value, QuantizedWeight):
                mod.set_quantized(value)
            else:
                mod.set_dense(value)
        else:
            getattr(mod, leaf).data = value.to(dtype)
    net.init_buffers()  # rotary tables were built on the meta device


# ---------------------------------------------------------------------------------------
# The inverse mapping: our weights as a dense HF state dict (the test oracle's input)


def dense_state_dict(net: Qwen3VL) -> dict[str, torch.Tensor]:
    """Effective fp32 weights under transformers' key names (quantized ones dequantized as
    q*s), for loading the same model into Qwen3VLForConditionalGeneration."""
    out: dict[str, torch.Tensor] = {}
    own: dict[str, torch.Tensor] = {n: p.detach() for n, p in net.named_parameters()}
    for name, mod in net.named_modules():
        if isinstance(mod, Linear):
            own[f"{name}.weight"] = (
                mod.qweight.dequantize(torch.float32) if mod.qweight is not None else mod.weight.detach()  # type: ignore[union-attr]
            )
    splits = fused_splits(net.cfg)
    v = net.cfg.vision
    names = _all_hf_names(net)
    for hf in names:
        target = target_of(hf)
        assert target is not None, hf
        if target.path == "lm_head":
            out[hf] = (net.lm_head if net.lm_head is not None else net.embed_tokens.weight).detach().float()
            continue
        value = own[target.path]
        if target.parts > 1:
            kind = target.path.rsplit(".", 2)[-2]
            value = value.split(splits[kind], dim=0)[target.part]
        if target.path == "visual.patch_embed.weight":
            value = value.reshape(
                v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
            )
        out[hf] = value.float().clone()
    return out


def _all_hf_names(net: Qwen3VL) -> list[str]:
    from .demo import _text_keys, _vision_keys  # the one place that lists HF names by structure

    t, v = net.cfg.text, net.cfg.vision
    text = dict(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        head_dim=t.head_dim,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        num_hidden_layers=t.num_hidden_layers,
    )
    vision = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        in_channels=v.in_channels,
        temporal_patch_size=v.temporal_patch_size,
        patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size,
        num_position_embeddings=v.num_position_embeddings,
        depth=v.depth,
        deepstack_visual_indexes=list(v.deepstack_visual_indexes),
    )
    names = list(_text_keys("model.language_model", text, t.vocab_size)) + list(
        _vision_keys("model.visual", vision, v.out_hidden_size)
    )
    return [*names, "lm_head.weight"]
