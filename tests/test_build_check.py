"""kernels.build_check: ahead-of-time sm_90 compiles of what the dispatchers can launch.

The whole check runs here (every variant the dispatchers can launch, bf16 and fp16: about a
minute on 2 cores from a cold Triton cache), plus closer looks at the decode GEMV plans (their
128-bit loads) and the specialization counts. Compiling needs real JITFunctions, so the checks
run in a subprocess with TRITON_INTERPRET=0. The interpreter tests cannot replace it: the
interpreter never type-checks a branch it does not take (a bf16 pointer given to an atomic in
an untaken branch compiled nowhere, and only this check said so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TRITON_INTERPRET="0")


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_dims_are_the_real_model_config() -> None:
    from kernels.build_check import ModelDims
    from server.engine.args import EngineArgs
    from server.model.synthetic import REAL_2B_CONFIG

    text = REAL_2B_CONFIG["text_config"]
    dims = ModelDims()
    assert (dims.hidden, dims.intermediate, dims.vocab) == (
        text["hidden_size"],
        text["intermediate_size"],
        text["vocab_size"],
    )
    assert (dims.heads, dims.kv_heads, dims.head_dim) == (
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["head_dim"],
    )
    vision = REAL_2B_CONFIG["vision_config"]
    assert (dims.vision_hidden, dims.vision_heads) == (vision["hidden_size"], vision["num_heads"])
    assert dims.block_size == EngineArgs().block_size
    shapes = {name: (n, k) for name, n, k in dims.decoder_linears()}
    assert shapes == {"qkv": (4096, 2048), "o": (2048, 2048), "gate_up": (12288, 2048), "down": (2048, 6144)}


def test_decode_gemv_plans_compile_for_sm90_with_128bit_loads(tmp_path: Path) -> None:
    # The untuned (#0) decode plans at M = 1 and 8, W8 and W4, K = 2048 and 6144, bf16.
    report = tmp_path / "gemv.json"
    only = r"^_gemv_kernel bfloat16 (qkv|down) \S+ W[48] M[18] #0 "
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.build_check",
            "--dtypes",
            "bf16",
            "--only",
            only,
            "--json",
            str(report),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(report.read_text())
    # 2 shapes x 2 bit widths x 2 M buckets, less W8 K=6144 = W8 K=2048 (same tile; K is only
    # specialized by divisibility, so both layers run one binary)
    assert len(results) == 6
    assert out.stdout.strip().splitlines()[-1] == "6 variants compiled for sm_90: 0 failed, 0 spill"
    for r in results:
        assert r["error"] is None and r["spill_bytes"] == 0, r
        assert r["constexprs"]["BLOCK_K"] > r["constexprs"]["GROUP_K"] == 128, r  # steps span groups
        assert r["wide_loads"] > 0, f"no 128-bit global loads in {r['label']}"


def test_every_variant_compiles_for_sm90_without_spills() -> None:
    # python -m kernels.build_check as a landing gate: every launch of every kernel module at
    # the real 2B shapes (qmatmul buckets, attention plans over batch/query/context, norms,
    # rope), bf16 and fp16; exit 1 on a compile error, a spill, shared memory over the limit,
    # or a kernel no module lists.
    out = subprocess.run(
        [sys.executable, "-m", "kernels.build_check"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    n = int(last.split()[0])
    assert n >= 150 and last == f"{n} variants compiled for sm_90: 0 failed, 0 spill", last


def test_per_request_m_compiles_no_new_variant() -> None:
    # Every M from 1 to 64 through one gemv and one gemm plan: one binary each (M, n_iters and
    # per_split are not specialized). Without do_not_specialize, M = 1 and M % 16 == 0 would
    # each be a separate key, as the dequant kernel's N shows.
    code = """
import torch
from kernels.build_check import Launch, specialization_key
from kernels.qmatmul_triton import Plan, launch_spec, dequant_spec
from kernels.quant import QuantizedWeight
meta = torch.device("meta")
qw = QuantizedWeight(8, 128, 2048, 2048, torch.empty((2048, 2048), dtype=torch.int8, device=meta),
                     torch.empty((2048, 16), dtype=torch.float32, device=meta))
for plan, ms in ((Plan("gemv", 8, 4, 2048, 1, 8, 2), range(1, 9)), (Plan("gemm", 16, 32, 128), range(1, 65))):
    keys = set()
    for m in ms:
        x = torch.empty((m, 2048), dtype=torch.bfloat16, device=meta)
        y = torch.empty((m, 2048), dtype=torch.bfloat16, device=meta)
        keys.add(specialization_key(Launch("", *[launch_spec(plan, x, qw, None, y)[i] for i in (0, 2, 3)])))
    print(plan.kind, len(keys))
keys = set()
for n in (2047, 2048, 1):  # an int that is specialized: three keys
    w = QuantizedWeight(8, 128, n, 2048, torch.empty((n, 2048), dtype=torch.int8, device=meta),
                        torch.empty((n, 16), dtype=torch.float32, device=meta))
    kernel, _, args, kwargs = dequant_spec(w, torch.empty((n, 2048), dtype=torch.bfloat16, device=meta))
    keys.add(specialization_key(Launch("", kernel, args, kwargs)))
print("dequant", len(keys))
"""
    assert _python(code).split() == ["gemv", "1", "gemm", "1", "dequant", "3"]


def test_every_kernel_is_listed_by_aot_launches() -> None:
    # Enumerates the launches only (no compile): every *_kernel of kernels/ is in some
    # module's aot_launches, for both dtypes; and the attention split counts the heuristic
    # folds into one launch (num_splits is do_not_specialize) do share one binary.
    code = """
import dataclasses, torch
from kernels import attention
from kernels.build_check import DTYPES, Launch, ModelDims, kernel_modules, launchable_kernels, specialization_key
found, covered = set(), {d: set() for d in DTYPES}
for mod in kernel_modules():
    found |= {f"{mod.__name__}.{n}" for n in launchable_kernels(mod)}
    for d, dtype in DTYPES.items():
        for launch in getattr(mod, "aot_launches", lambda *_: ())(ModelDims(), dtype):
            covered[d].add(f"{launch.kernel.fn.__module__}.{launch.kernel.fn.__name__}")
print("kernels", len(found))
for d in DTYPES:
    print(d, "uncovered", sorted(found - covered[d]) or "none")
decode = [l for l in attention.aot_launches(ModelDims(), torch.bfloat16) if l.label.startswith("decode")]
print("decode launches", len(decode))
split = next(l for l in decode if "SPLIT=True" in l.label)
assert split.kwargs["SPLIT"] is True
keys = set()
for s in (2, 16):
    args = list(split.args)
    args[attention._attn_kernel.arg_names.index("num_splits")] = s
    keys.add(specialization_key(Launch("", split.kernel, tuple(args), split.kwargs)))
print("split keys", len(keys))
"""
    out = _python(code).splitlines()
    assert int(out[0].split()[1]) >= 8, out  # the discovery itself still finds the kernels
    assert out[1:] == ["bf16 uncovered none", "fp16 uncovered none", "decode launches 2", "split keys 1"], out
