"""server.model.loader: every checkpoint format round-trips, and corrupt ones are refused.

Each demo format (W8 QAT, W4 QAT, AWQ W4, bf16) is written once per session; tests that
corrupt a checkpoint first copy it into their own tmp dir. Every test says which input it
tried.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import QuantizedWeight
from server.model.demo import write_demo_checkpoint
from server.model.layers import Linear
from server.model.loader import CheckpointError, canonical_name, dense_state_dict, load_model
from server.model.model_config import ModelConfig

SIDECAR = "qat_quantized_weights.bin"
AWQ_JSON = "awq_quantized_modules.json"
LM = "model.language_model"
VIS = "model.visual"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # restated from GRACE_FORMAT.md, not imported
DECODER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
FUSED = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_DEMOS = {"qat8": ("qat", 8), "qat4": ("qat", 4), "awq": ("awq", 4), "bf16": ("bf16", 8)}


# ---------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """demo(kind, seed=0) -> path of a demo checkpoint written once per session. Read-only!"""
    cache: dict[tuple[str, int], Path] = {}

    def get(kind: str, seed: int = 0) -> Path:
        if (kind, seed) not in cache:
            fmt, bits = _DEMOS[kind]
            out = tmp_path_factory.mktemp(f"demo-{kind}-seed{seed}")
            cache[kind, seed] = write_demo_checkpoint(out, bits=bits, fmt=fmt, seed=seed)
        return cache[kind, seed]

    return get


@pytest.fixture(scope="session")
def reference(demo: Callable[..., Path]) -> Callable[[str], tuple]:
    """reference(kind) -> (LoadedModel, dense_state_dict) of the unmodified demo, loaded once."""
    cache: dict[str, tuple] = {}

    def get(kind: str) -> tuple:
        if kind not in cache:
            lm = load_model(demo(kind))
            cache[kind] = (lm, dense_state_dict(lm.model))
        return cache[kind]

    return get


@pytest.fixture
def copy_of(demo: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """copy_of(kind) -> a private, writable copy of a demo checkpoint."""

    def make(kind: str, seed: int = 0) -> Path:
        dst = tmp_path / f"{kind}-seed{seed}"
        shutil.copytree(demo(kind, seed), dst)
        return dst

    return make


def read_st(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def write_st(path: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / name), metadata={"format": "pt"})


def edit_st(path: Path, fn: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = read_st(path)
    fn(tensors)
    write_st(path, tensors)


def read_sidecar(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / SIDECAR, map_location="cpu", weights_only=True)


def edit_sidecar(path: Path, fn: Callable[[dict], object]) -> None:
    side = read_sidecar(path)
    fn(side)
    torch.save(side, path / SIDECAR)


def edit_config(path: Path, fn: Callable[[dict], object]) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def refused(path: Path | str, *fragments: str, pattern: str | None = None, **kwargs) -> CheckpointError:
    """load_model(path) must raise CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message: {msg}"
    if pattern is not None:
        assert re.search(pattern, msg), f"/{pattern}/ not in error message: {msg}"
    return info.value


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def qat_modules(side: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".log_scale")] for k in side if k.endswith(".log_scale"))


def assert_plain_tensors_equal(st: dict, sd: dict, quantized: set[str]) -> None:
    """Every non-quantized checkpoint tensor (embeddings, norms, vision) comes back bit-exact."""
    plain = [k for k in st if k.rsplit(".", 1)[0] not in quantized]
    assert any(k.startswith(VIS) for k in plain) and f"{LM}.embed_tokens.weight" in plain
    for key in plain:
        assert sd[key].dtype == torch.float32, key
        assert torch.equal(sd[key], st[key].float()), key
    # tied embeddings: lm_head is the embedding matrix
    assert torch.equal(sd["lm_head.weight"], sd[f"{LM}.embed_tokens.weight"])


def awq_unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """Straightforward AWQ unpacking: int32 [R, C] -> int64 [R, 8C] values 0..15, natural order.
    Column 8c + AWQ_ORDER[i] sits in bits 4i..4i+3 of word c."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    r, c = words.shape
    out = torch.empty(r, 8 * c, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        out[:, col::8] = (words >> (4 * i)) & 0xF
    return out


def _marker_function() -> None:  # pickled by reference into a sidecar: must be refused
    pass


class _WritesMarker:
    """Unpickling this calls open(path, "w"): a file appears iff the pickle executed code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------
# 1. Round trips


@pytest.mark.parametrize(("kind", "bits"), [("qat8", 8), ("qat4", 4)])
def test_qat_round_trip(kind: str, bits: int, demo, reference) -> None:
    """Input: the W8/W4 QAT demo as written. Every quantized module's dequantized weight,
    cast to bf16, equals the stored fake-quantized bf16 weight bit for bit (the strictest true
    statement: fp32 equality does not hold, q*s in fp32 is generally not a bf16 value), and in
    fp32 it equals q*exp(log_scale) with q = round(W/s) computed here. Scales are the sidecar's."""
    path = demo(kind)
    lm, sd = reference(kind)
    st, side = read_st(path), read_sidecar(path)
    cfg = json.loads((path / "config.json").read_text())
    modules = qat_modules(side)
    assert lm.quantization == f"w{bits}g128"
    assert len(modules) == cfg["qat"]["num_replaced"] == 7 * lm.config.text.num_hidden_layers

    not_fp32_exact = 0
    for m in modules:
        stored = st[f"{m}.weight"]
        deq = sd[f"{m}.weight"]
        assert stored.dtype == torch.bfloat16 and deq.dtype == torch.float32
        assert torch.equal(deq.to(torch.bfloat16), stored), f"{m}: dequantized != stored bf16"
        n, k = stored.shape
        s = side[f"{m}.log_scale"].float().exp().reshape(n, k // 128, 1)
        q = torch.round(stored.float().reshape(n, k // 128, 128) / s)
        assert -(2 ** (bits - 1)) <= int(q.min()) and int(q.max()) <= 2 ** (bits - 1) - 1
        assert torch.equal(deq, (q * s).reshape(n, k)), f"{m}: dequantized != q*s"
        not_fp32_exact += int(not torch.equal(deq, stored.float()))
    assert not_fp32_exact > 0  # documents why bf16 equality is the strictest statement

    for i, layer in enumerate(lm.model.layers):
        for proj in DECODER_LINEARS:
            lin = getattr(layer, proj)
            assert isinstance(lin.qweight, QuantizedWeight) and lin.weight is None, (i, proj)
            assert (lin.qweight.bits, lin.qweight.group_size) == (bits, 128), (i, proj)
        for fused, parts in FUSED.items():
            names = [f"{LM}.layers.{i}.{p}" for p in parts]
            want = torch.cat(
                [side[f"{m}.log_scale"].float().exp().reshape(len(st[f"{m}.weight"]), -1) for m in names]
            )
            assert torch.equal(getattr(layer, fused).qweight.scales, want), (i, fused)
    for name, mod in lm.model.visual.named_modules():
        if isinstance(mod, Linear):
            assert mod.qweight is None and mod.weight is not None, f"vision {name} must stay dense"

    assert set(sd) == set(st) | {"lm_head.weight"}
    assert_plain_tensors_equal(st, sd, set(modules))


def test_awq_round_trip(demo, reference) -> None:
    """Input: the AWQ W4 demo as written. Each listed module's dequantized weight equals, bit for
    bit in fp32, scales * (code - zero) from the unpacking written in this test."""
    path = demo("awq")
    lm, sd = reference("awq")
    st = read_st(path)
    meta = json.loads((path / AWQ_JSON).read_text())
    modules = meta["modules"]
    assert lm.quantization == "w4g128-awq"
    assert len(modules) == 7 * lm.config.text.num_hidden_layers
    for m in modules:
        qweight, qzeros, scales = st[f"{m}.qweight"], st[f"{m}.qzeros"], st[f"{m}.scales"]
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        codes = awq_unpack_ref(qweight)  # [K, N]
        zeros = awq_unpack_ref(qzeros)  # [K/128, N]
        assert bool((zeros == 8).all())
        w = ((codes - zeros.repeat_interleave(128, 0)).float() * scales.float().repeat_interleave(128, 0)).t()
        assert sd[f"{m}.weight"].shape == w.shape
        assert torch.equal(sd[f"{m}.weight"], w), m
    for layer in lm.model.layers:
        for proj in DECODER_LINEARS:
            qw = getattr(layer, proj).qweight
            assert isinstance(qw, QuantizedWeight) and (qw.bits, qw.group_size) == (4, 128)
    assert_plain_tensors_equal(st, sd, set(modules))


def test_bf16_loads_dense(demo, reference) -> None:
    """Input: the bf16 demo (no sidecar). Every Linear is dense; every tensor bit-exact."""
    lm, sd = reference("bf16")
    st = read_st(demo("bf16"))
    assert lm.quantization == "none"
    for name, mod in lm.model.named_modules():
        if isinstance(mod, Linear):
            assert mod.qweight is None, name
    assert set(sd) == set(st) | {"lm_head.weight"}
    assert_plain_tensors_equal(st, sd, set())


# ---------------------------------------------------------------------------------------
# 2. Quantizing a bf16 checkpoint at load


_DECODER_KEY = re.compile(r".*\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_quantized_at_load(bits: int, demo, reference) -> None:
    """Input: the bf16 demo with quantization="w{bits}g128". Decoder linears become QuantizedWeight
    with that bit width; |W - deq| <= s/2 with s = max|W|/qmax per group of 128; the rest is
    untouched."""
    _, dense = reference("bf16")
    lm = load_model(demo("bf16"), quantization=f"w{bits}g128")
    assert lm.quantization == f"w{bits}g128"
    qmax = 2 ** (bits - 1) - 1
    for layer in lm.model.layers:
        for proj in DECODER_LINEARS:
            qw = getattr(layer, proj).qweight
            assert isinstance(qw, QuantizedWeight) and (qw.bits, qw.group_size) == (bits, 128)
            assert int(qw.codes().abs().max()) <= qmax
    for name, mod in lm.model.visual.named_modules():
        if isinstance(mod, Linear):
            assert mod.qweight is None, name
    sd = dense_state_dict(lm.model)
    assert sd.keys() == dense.keys()
    n_quantized = 0
    for key, w in dense.items():
        if not _DECODER_KEY.fullmatch(key):
            assert torch.equal(sd[key], w), key
            continue
        n_quantized += 1
        n, k = w.shape
        w3 = w.reshape(n, k // 128, 128)
        s = w3.abs().amax(-1, keepdim=True) / qmax
        err = (sd[key].reshape(n, k // 128, 128) - w3).abs()
        bound = s / 2 + 2.0**-22 * w3.abs()  # s/2 plus fp32 rounding of the product
        assert bool((err <= bound).all()), f"{key}: max err/s {float((err / s).max()):.4f} > 0.5"
        assert float(err.max()) > 0, f"{key} was not quantized"
    assert n_quantized == 7 * lm.config.text.num_hidden_layers


@pytest.mark.parametrize(
    ("kind", "quantization"), [("qat8", "w8g128"), ("qat4", "w4g128"), ("awq", "w4g128")]
)
def test_quantization_refused_on_quantized_checkpoint(kind: str, quantization: str, demo) -> None:
    """Input: an already-quantized checkpoint plus quantization=... -> refused."""
    refused(demo(kind), "already quantized", quantization=quantization)


@pytest.mark.parametrize("quantization", ["int8", "w8g64", "w3g128", "awq"])
def test_unknown_quantization_refused(quantization: str, demo) -> None:
    """Input: the bf16 demo with an unknown quantization string -> refused, naming it."""
    refused(demo("bf16"), repr(quantization), "w8g128", quantization=quantization)


# ---------------------------------------------------------------------------------------
# 3. Corruptions


@pytest.mark.parametrize(
    "module",
    [
        "mlp.down_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "mlp.gate_proj",
        "self_attn.k_proj",
        "mlp.up_proj",
    ],
)
def test_sidecar_missing_log_scale(module: str, copy_of) -> None:
    """Input: W8 QAT with model.language_model.layers.1.<module>.log_scale (and its .weight)
    deleted from the sidecar -> refused, naming layer 1's module and saying the entry is missing."""
    path = copy_of("qat8")
    full = f"{LM}.layers.1.{module}"
    edit_sidecar(path, lambda s: (s.pop(f"{full}.log_scale"), s.pop(f"{full}.weight")))
    leaf = module.rsplit(".", 1)[1]
    refused(path, "layers.1.", leaf, pattern=r"missing|no entry|no log_scale")


def test_sidecar_log_scale_wrong_length(copy_of) -> None:
    """Input: W8 QAT with layers.1.mlp.gate_proj.log_scale one element short -> refused, named."""
    path = copy_of("qat8")
    key = f"{LM}.layers.1.mlp.gate_proj.log_scale"
    edit_sidecar(path, lambda s: s.__setitem__(key, s[key][:-1].clone()))
    refused(path, f"{LM}.layers.1.mlp.gate_proj", "log_scale", "1023")


@pytest.mark.parametrize("kind", ["qat8", "qat4"])
def test_codes_out_of_range(kind: str, copy_of) -> None:
    """Input: QAT with layers.2.self_attn.o_proj.weight multiplied by 3 in model.safetensors ->
    recovered codes exceed the signed range: refused naming the module and 'range'."""
    path = copy_of(kind)
    key = f"{LM}.layers.2.self_attn.o_proj.weight"
    edit_st(path, lambda t: t.__setitem__(key, (t[key].float() * 3).to(torch.bfloat16)))
    refused(path, f"{LM}.layers.2.self_attn.o_proj", "range")


def test_log_scale_off_grid(copy_of) -> None:
    """Input: W8 QAT with layers.0.mlp.up_proj.log_scale shifted by log(1.02) (scales 2 % off) ->
    q*s no longer reproduces W: refused naming the module and the grid."""
    path = copy_of("qat8")
    key = f"{LM}.layers.0.mlp.up_proj.log_scale"
    edit_sidecar(path, lambda s: s.__setitem__(key, s[key] + torch.log(torch.tensor(1.02))))
    refused(path, f"{LM}.layers.0.mlp.up_proj", "grid")


def test_sidecar_from_another_checkpoint(copy_of, demo) -> None:
    """Input: the W8 QAT demo (seed 0) with the sidecar of the seed-1 demo -> refused, naming a
    module (codes out of range or off the grid)."""
    path = copy_of("qat8")
    shutil.copyfile(demo("qat8", seed=1) / SIDECAR, path / SIDECAR)
    refused(path, f"{LM}.layers.", pattern=r"range|grid")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_log_scale(bad: float, copy_of) -> None:
    """Input: W8 QAT with one element of layers.1.mlp.gate_proj.log_scale set to nan/inf/-inf."""
    path = copy_of("qat8")
    key = f"{LM}.layers.1.mlp.gate_proj.log_scale"

    def poison(s: dict) -> None:
        s[key] = s[key].clone()
        s[key][5] = bad

    edit_sidecar(path, poison)
    refused(path, f"{LM}.layers.1.mlp.gate_proj", "non-finite")


@pytest.mark.parametrize(
    ("kind", "key", "got", "want"),
    [
        ("qat8", f"{LM}.layers.0.post_attention_layernorm.weight", "[255]", "[256]"),
        ("qat8", f"{LM}.layers.0.self_attn.k_proj.weight", "[127, 256]", "[128, 256]"),
        ("bf16", f"{LM}.layers.0.self_attn.k_proj.weight", "[127, 256]", "[128, 256]"),
        ("qat4", f"{VIS}.blocks.1.attn.qkv.bias", "[191]", "[192]"),
        ("awq", f"{LM}.norm.weight", "[255]", "[256]"),
    ],
)
def test_tensor_wrong_shape(kind: str, key: str, got: str, want: str, copy_of) -> None:
    """Input: the checkpoint with the last row of `key` dropped -> refused naming the tensor and
    both shapes."""
    path = copy_of(kind)
    edit_st(path, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    refused(path, key, got, want)


def test_patch_embed_wrong_5d_shape(copy_of) -> None:
    """Input: W8 QAT with model.visual.patch_embed.proj.weight stored as [64, 2, 3, 16, 16]
    (temporal and channel dims swapped; config says [64, 3, 2, 16, 16]) -> must be refused."""
    path = copy_of("qat8")
    key = f"{VIS}.patch_embed.proj.weight"
    edit_st(path, lambda t: t.__setitem__(key, t[key].transpose(1, 2).contiguous()))
    refused(path, key, "[64, 2, 3, 16, 16]", "[64, 3, 2, 16, 16]")


@pytest.mark.parametrize(
    ("kind", "key", "fragment"),
    [
        ("qat8", f"{VIS}.blocks.0.norm1.weight", "visual.blocks.0.norm1.weight"),
        ("qat8", f"{VIS}.blocks.0.mlp.linear_fc1.weight", "visual.blocks.0.mlp.linear_fc1.weight"),
        ("qat8", f"{LM}.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.k_proj"),
        ("bf16", f"{LM}.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.k_proj"),
    ],
)
def test_tensor_missing(kind: str, key: str, fragment: str, copy_of) -> None:
    """Input: the checkpoint with `key` deleted from model.safetensors -> refused, naming it (as
    the checkpoint spells it, up to the model./language_model. prefix) and saying it is missing."""
    path = copy_of(kind)
    edit_st(path, lambda t: t.pop(key))
    refused(path, fragment, pattern=r"missing|not in the checkpoint|incomplete|not found")


def test_qat_block_without_sidecar(copy_of) -> None:
    """Input: W8 QAT with qat_quantized_weights.bin deleted (config still has the qat block)."""
    path = copy_of("qat8")
    (path / SIDECAR).unlink()
    refused(path, SIDECAR, "qat", "missing")


def test_sidecar_without_qat_block(copy_of) -> None:
    """Input: W8 QAT with the qat block removed from config.json (sidecar still present)."""
    path = copy_of("qat8")
    edit_config(path, lambda c: c.pop("qat"))
    refused(path, SIDECAR, "qat block")


def test_awq_zero_point_not_8(copy_of) -> None:
    """Input: AWQ with one zero point of layers.1.mlp.up_proj changed from 8 to 9."""
    path = copy_of("awq")
    key = f"{LM}.layers.1.mlp.up_proj.qzeros"

    def bump(t: dict) -> None:
        t[key] = t[key].clone()
        t[key][0, 0] += 1  # lowest nibble of word 0 = column 0's zero point

    edit_st(path, bump)
    refused(path, f"{LM}.layers.1.mlp.up_proj", "zero", "9")


@pytest.mark.parametrize("leaf", ["qzeros", "qweight", "scales"])
def test_awq_part_missing(leaf: str, copy_of) -> None:
    """Input: AWQ with layers.1.mlp.up_proj.<leaf> deleted -> refused naming module and leaf."""
    path = copy_of("awq")
    edit_st(path, lambda t: t.pop(f"{LM}.layers.1.mlp.up_proj.{leaf}"))
    refused(path, f"{LM}.layers.1.mlp.up_proj", leaf)


def test_awq_modules_json_missing(copy_of) -> None:
    """Input: AWQ (config says quant_method awq) with awq_quantized_modules.json deleted."""
    path = copy_of("awq")
    (path / AWQ_JSON).unlink()
    refused(path, AWQ_JSON, "missing")


def test_sidecar_pickle_with_code_is_refused_and_not_executed(copy_of, tmp_path: Path) -> None:
    """Input: a sidecar whose dict holds, next to the real tensors, an object whose __reduce__
    opens (creates) a marker file. It must be refused (weights_only) and the file must not exist.
    Sanity check first: a non-weights_only torch.load of the same bytes does create the marker."""
    path = copy_of("qat8")
    side = read_sidecar(path)
    probe = tmp_path / "probe.bin"
    probe_marker = tmp_path / "probe-marker"
    torch.save({"x": _WritesMarker(str(probe_marker))}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists(), "the payload does not work; the test below would prove nothing"

    marker = tmp_path / "pwned"
    side["evil"] = _WritesMarker(str(marker))
    torch.save(side, path / SIDECAR)
    refused(path, SIDECAR, "tensor-only")
    assert not marker.exists(), "loading the sidecar executed code from the pickle"


def test_sidecar_pickle_with_function_is_refused(copy_of) -> None:
    """Input: a sidecar whose dict also holds a (module-level) function."""
    path = copy_of("qat8")
    edit_sidecar(path, lambda s: s.__setitem__("hook", _marker_function))
    refused(path, SIDECAR, "tensor-only")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [(b"definitely not a torch checkpoint", "tensor-only"), ([1, 2, 3], "dict")],
)
def test_sidecar_not_a_dict_of_tensors(payload, fragment: str, copy_of) -> None:
    """Input: a sidecar that is garbage bytes, or a torch.save of a list."""
    path = copy_of("qat8")
    if isinstance(payload, bytes):
        (path / SIDECAR).write_bytes(payload)
    else:
        torch.save(payload, path / SIDECAR)
    refused(path, SIDECAR, fragment)


def test_sidecar_log_scale_not_a_tensor(copy_of) -> None:
    """Input: W8 QAT with layers.1.mlp.gate_proj.log_scale saved as a Python list of floats."""
    path = copy_of("qat8")
    key = f"{LM}.layers.1.mlp.gate_proj.log_scale"
    edit_sidecar(path, lambda s: s.__setitem__(key, s[key].tolist()))
    refused(path, f"{LM}.layers.1.mlp.gate_proj")


# ---------------------------------------------------------------------------------------
# 4. Layouts and config spellings


def _old_name(name: str) -> str:
    if name.startswith(f"{LM}."):
        return "model." + name[len(LM) + 1 :]
    if name.startswith(f"{VIS}."):
        return name[len("model.") :]
    return name


@pytest.mark.parametrize("kind", ["qat8", "awq"])
def test_old_key_layout(kind: str, copy_of, reference) -> None:
    """Input: every key renamed model.language_model.X -> model.X and model.visual.X -> visual.X
    in model.safetensors and in the sidecar / awq module list -> identical dense_state_dict."""
    path = copy_of(kind)
    tensors = read_st(path)
    write_st(path, {_old_name(k): v for k, v in tensors.items()})
    assert not any(k.startswith((f"{LM}.", f"{VIS}.")) for k in read_st(path))
    if kind == "qat8":
        side = read_sidecar(path)
        torch.save({_old_name(k): v for k, v in side.items()}, path / SIDECAR)
    else:
        meta = json.loads((path / AWQ_JSON).read_text())
        meta["modules"] = [_old_name(m) for m in meta["modules"]]
        (path / AWQ_JSON).write_text(json.dumps(meta))
    want_lm, want = reference(kind)
    lm = load_model(path)
    assert lm.quantization == want_lm.quantization
    assert_same_weights(dense_state_dict(lm.model), want)


def _transformers5_spelling(cfg: dict) -> None:
    text = cfg["text_config"]
    rope = text.pop("rope_scaling")
    text["rope_parameters"] = {
        "rope_type": rope["rope_type"],
        "mrope_section": rope["mrope_section"],
        "mrope_interleaved": rope["mrope_interleaved"],
        "rope_theta": text.pop("rope_theta"),
    }
    for d in (cfg, text):
        d["dtype"] = d.pop("torch_dtype")


def _flat(cfg: dict) -> None:
    text = cfg.pop("text_config")
    text.pop("model_type")
    cfg.update(text)


@pytest.mark.parametrize(
    ("kind", "rewrite"), [("qat8", _transformers5_spelling), ("qat4", _flat), ("awq", _flat)]
)
def test_config_spellings(kind: str, rewrite, copy_of, reference) -> None:
    """Input: config.json rewritten in the transformers-5 spelling (rope_parameters, dtype) or
    flat (text settings at top level, no text_config) -> same ModelConfig, same weights."""
    path = copy_of(kind)
    edit_config(path, rewrite)
    want_lm, want = reference(kind)
    lm = load_model(path)
    assert lm.config == want_lm.config
    assert lm.quantization == want_lm.quantization
    assert_same_weights(dense_state_dict(lm.model), want)


def test_rope_parameters_and_dtype_are_read(demo) -> None:
    """Input: the demo config in the transformers-5 spelling with values that differ from both
    the demo's and model_config's defaults -> those values, not the defaults, are used."""
    cfg = json.loads((demo("bf16") / "config.json").read_text())
    _transformers5_spelling(cfg)
    cfg["text_config"]["rope_parameters"].update(
        rope_theta=1234.0, mrope_section=[16, 8, 8], mrope_interleaved=False
    )
    cfg["dtype"] = cfg["text_config"]["dtype"] = "float16"
    mc = ModelConfig.from_dict(cfg)
    assert mc.text.rope_theta == 1234.0
    assert mc.text.mrope_section == (16, 8, 8)
    assert mc.text.mrope_interleaved is False
    assert mc.dtype == torch.float16


def _shard(path: Path, n_shards: int, with_index: bool) -> list[str]:
    """Split model.safetensors round-robin (fused q/k/v, gate/up land in different shards)."""
    tensors = read_st(path)
    (path / "model.safetensors").unlink()
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: v for j, (k, v) in enumerate(sorted(tensors.items())) if j % n_shards == i}
        write_st(path, part, name)
        weight_map |= dict.fromkeys(part, name)
    if with_index:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


@pytest.mark.parametrize(
    ("kind", "n_shards", "with_index"), [("qat8", 3, True), ("awq", 2, True), ("qat4", 2, False)]
)
def test_sharded(kind: str, n_shards: int, with_index: bool, copy_of, reference) -> None:
    """Input: model.safetensors split into shards (with model.safetensors.index.json, or without
    one: model-0000x-of-0000y files only) -> identical dense_state_dict."""
    path = copy_of(kind)
    _shard(path, n_shards, with_index)
    want_lm, want = reference(kind)
    lm = load_model(path)
    assert lm.quantization == want_lm.quantization
    assert_same_weights(dense_state_dict(lm.model), want)


def test_sharded_missing_shard(copy_of) -> None:
    """Input: 3 shards with an index, shard 2 deleted -> refused naming the missing file."""
    path = copy_of("qat8")
    names = _shard(path, 3, with_index=True)
    (path / names[1]).unlink()
    refused(path, names[1], "missing")


# ---------------------------------------------------------------------------------------
# 5. canonical_name


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (f"{LM}.layers.0.self_attn.q_proj.weight", f"{LM}.layers.0.self_attn.q_proj.weight"),
        (f"{VIS}.blocks.3.attn.qkv.bias", f"{VIS}.blocks.3.attn.qkv.bias"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.0.mlp.down_proj.weight", f"{LM}.layers.0.mlp.down_proj.weight"),
        ("model.layers.27.self_attn.k_proj", f"{LM}.layers.27.self_attn.k_proj"),  # sidecar module
        ("model.embed_tokens.weight", f"{LM}.embed_tokens.weight"),
        ("model.norm.weight", f"{LM}.norm.weight"),
        ("visual.patch_embed.proj.weight", f"{VIS}.patch_embed.proj.weight"),
        ("visual.deepstack_merger_list.1.linear_fc2.bias", f"{VIS}.deepstack_merger_list.1.linear_fc2.bias"),
    ],
)
def test_canonical_name(name: str, want: str) -> None:
    """Input: old (model.X / visual.X) and new spellings -> the new spelling; idempotent."""
    assert canonical_name(name) == want
    assert canonical_name(want) == want


# ---------------------------------------------------------------------------------------
# 6. Locating a checkpoint


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Input: load_model("someone/does-not-exist") with HF_HUB_OFFLINE=1 and an empty HF_HOME ->
    CheckpointError mentioning HF_HUB_OFFLINE, within seconds, with no socket ever opened."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.chdir(tmp_path)  # so "someone/does-not-exist" cannot be a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    # huggingface_hub reads these at import time; it may already be imported by other tests.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    attempts: list[object] = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    start = time.monotonic()
    err = refused("someone/does-not-exist", "someone/does-not-exist", "HF_HUB_OFFLINE")
    assert time.monotonic() - start < 10
    assert attempts == []
    # huggingface_hub's own text mentions HF_HUB_OFFLINE too: the loader must say it itself.
    own = str(err).replace(str(err.__cause__), "") if err.__cause__ is not None else str(err)
    assert "HF_HUB_OFFLINE" in own, str(err)


@pytest.mark.parametrize("model", ["./nope", "/nonexistent/grace/checkpoint", "no-slash-name", "a/b/c"])
def test_nonexistent_local_path(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Input: paths that do not exist (and are not owner/name hub ids) -> clear CheckpointError
    naming the path, without touching the hub."""
    monkeypatch.chdir(tmp_path)
    refused(model, repr(model), "neither a checkpoint folder nor a hub id")


def test_folder_without_config(tmp_path: Path) -> None:
    """Input: an existing empty folder -> CheckpointError about config.json."""
    refused(tmp_path, "config.json")
