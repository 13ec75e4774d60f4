"""Kernel benchmarks on the real Qwen3-VL-2B shapes: ``python -m kernels.bench [--json OUT] [--quick]``.

Prints Markdown tables (stdout) and writes JSON (``--json``, rewritten after every section so a
run cut short still leaves results):

- the card's measured copy bandwidth (the roofline for everything below);
- quantized matmul, W8 and W4 (group 128), per shape and M: time, achieved GB/s (weights +
  scales + activations read, output written), TFLOP/s, and speedup over torch bf16 matmul
  (F.linear on a bf16 weight) measured in the same run, plus the plan the tuner picked and its
  kernel count;
- paged attention decode and prefill (16 q / 8 kv heads, head_dim 128, block 16, bf16) against
  torch SDPA on dense, contiguous K/V; vision attention (Triton varlen vs SDPA per image);
- the fused norm kernels against their unfused torch twins.

Timing: triton.testing.do_bench_cudagraph (median; calls replayed from a CUDA graph, as decode
runs in the server), after a warm-up call that also runs the plan tuner. Weight buffers are
rotated (several copies, >= 4x the 50 MB L2 in total) so no call finds its weight in L2.
GPU only; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES

# Real model: (name, N, K). lm_head (151936 x 2048) only with --lm-head: it is tied bf16 in the 2B
# model and quantizing it is a separate, measured choice.
SHAPES = [("qkv", 4096, 2048), ("o", 2048, 2048), ("gate_up", 12288, 2048), ("down", 2048, 6144)]
LM_HEAD = ("lm_head", 151936, 2048)
M_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
M_QUICK = [1, 4, 16, 128, 2048]
H_Q, H_KV, HEAD_DIM, BLOCK = 16, 8, 128, 16
ATT_BATCH_FULL, ATT_BATCH_QUICK, ATT_CTX = [1, 16, 64, 256], [1, 64], [512, 4096]
PREFILL_CAP_FULL, PREFILL_CAP_QUICK = 65536, 16384  # prefill cases above this many tokens are skipped
VISION_CASES = ([1024] * 4, [4096], [256] * 16)  # tokens per image
VISION_HEADS, VISION_DIM = 16, 64
HIDDEN, INTERMEDIATE = 2048, 6144
NORM_TOKENS = [1, 64, 4096]
COPY_BYTES = 2**30
DEVICE = "cuda"  # tests dry-run the bench on CPU under the interpreter by patching this


def _time(fn: Callable[[], object], rep_ms: int) -> float:
    from kernels.triton_utils import bench_ms

    fn()  # warm-up: compiles, tunes, allocates outside the captured graph
    torch.cuda.synchronize()
    return bench_ms(fn, rep_ms=rep_ms)


def _rotating(make: Callable[[], Any], nbytes: int) -> Callable[[], Any]:
    """A function returning the next of ceil(ROTATE_BYTES / nbytes) copies made by ``make``."""
    copies = [make() for _ in range(max(2, min(64, math.ceil(ROTATE_BYTES / max(nbytes, 1)))))]
    it = itertools.cycle(copies)
    return lambda: next(it)


def copy_bandwidth(rep_ms: int) -> float:
    """GB/s of a COPY_BYTES (1 GiB) device-to-device copy (bytes read + written)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), rep_ms)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def bench_qmatmul(bits_list: list[int], shapes, ms_list: list[int], rep_ms: int, emit) -> list[dict]:
    from kernels.qmatmul_triton import candidates, m_bucket, tuner
    from kernels.qmatmul_triton import qmatmul as triton_qmatmul
    from kernels.quant import QuantizedWeight

    rows: list[dict] = []
    torch_ms: dict[tuple[str, int], float] = {}
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, n, k in shapes:
        w_bf16_bytes = n * k * 2
        next_w = _rotating(
            lambda n=n, k=k: torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02, w_bf16_bytes
        )
        for bits in bits_list:
            lo, hi = (-128, 127) if bits == 8 else (-8, 7)

            def make_qw(n=n, k=k, lo=lo, hi=hi, bits=bits) -> QuantizedWeight:
                codes = torch.randint(lo, hi + 1, (n, k), device=DEVICE, dtype=torch.int8, generator=gen)
                scales = torch.rand(n, k // 128, device=DEVICE, generator=gen) * 1e-3 + 1e-4
                return QuantizedWeight.from_codes(codes, scales, bits, 128)

            probe = make_qw()
            next_qw = _rotating(make_qw, probe.nbytes)
            for m in ms_list:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=gen)
                if (name, m) not in torch_ms:
                    torch_ms[(name, m)] = _time(lambda x=x, nw=next_w: F.linear(x, nw()), rep_ms)
                ms = _time(lambda x=x, nq=next_qw: triton_qmatmul(x, nq()), rep_ms)
                key = next((kk for kk in tuner.best if kk[:5] == (bits, n, k, 128, m_bucket(m))), None)
                plan = tuner.best[key] if key is not None else candidates(m, n, k, 128, bits)[0]
                moved = probe.nbytes + m * k * 2 + m * n * 2
                t_ms = torch_ms[(name, m)]
                row = dict(
                    shape=name,
                    N=n,
                    K=k,
                    bits=bits,
                    M=m,
                    ms=ms,
                    gbps=moved / (ms * 1e-3) / 1e9,
                    tflops=2 * m * n * k / (ms * 1e-3) / 1e12,
                    torch_ms=t_ms,
                    torch_gbps=(w_bf16_bytes + m * k * 2 + m * n * 2) / (t_ms * 1e-3) / 1e9,
                    speedup=t_ms / ms,
                    plan=_plan_str(plan),
                    kernels=plan.launches if plan is not None else None,
                )
                rows.append(row)
                emit(row)
            del probe
            torch.cuda.empty_cache()
    return rows


def _plan_str(plan) -> str:
    if plan is None:
        return "-"
    if plan.kind == "dequant":
        return "dequant+cuBLAS"
    s = f"{plan.kind} {plan.block_m}x{plan.block_n}x{plan.block_k} w{plan.num_warps} s{plan.num_stages}"
    return s + (f" splitK{plan.split_k}" if plan.split_k > 1 else "")


def _paged_setup(batch: int, ctx: int, q_len: int, gen: torch.Generator):
    blocks_per_seq = math.ceil(ctx / BLOCK)
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(
        num_blocks, BLOCK, H_KV, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen
    )
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks - 1, device=DEVICE, generator=gen)[: batch * blocks_per_seq]
    tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * q_len
    query = torch.randn(batch * q_len, H_Q, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    return query, k_cache, v_cache, tables, seq_lens, qsl


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):  # older torch / backend without GQA: expand the heads
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal
        )


def bench_attention(batches, ctxs, prefill_token_cap: int, rep_ms: int, emit) -> list[dict]:
    from kernels import attention

    rows: list[dict] = []
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    scale = HEAD_DIM**-0.5
    for mode in ("decode", "prefill"):
        for batch, ctx in itertools.product(batches, ctxs):
            q_len = 1 if mode == "decode" else ctx
            if mode == "prefill" and batch * ctx > prefill_token_cap:
                print(f"| prefill | {batch} | {ctx} | skipped: over {prefill_token_cap} tokens |", flush=True)
                continue
            query, kc, vc, tables, seq_lens, qsl = _paged_setup(batch, ctx, q_len, gen)
            plan = attention.plan_attention(batch, H_Q, H_KV, HEAD_DIM, q_len, ctx, query.device)
            fn = functools.partial(
                attention.paged_attention,
                *(query, kc, vc, tables, seq_lens, qsl, scale, True),
                max_query_len=q_len,
                max_seq_len=ctx,
                plan=plan,
            )
            ms = _time(fn, rep_ms)
            # baseline: SDPA over dense contiguous K/V of the same contexts
            qd = query.view(batch, q_len, H_Q, HEAD_DIM).transpose(1, 2)
            kd = torch.randn(batch, H_KV, ctx, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            vd = torch.randn_like(kd)
            sdpa_ms = _time(functools.partial(_sdpa, qd, kd, vd, mode == "prefill"), rep_ms)
            kv_bytes = 2 * batch * ctx * H_KV * HEAD_DIM * 2
            q_bytes = 2 * query.numel() * 2  # read q, write out
            flops = 4 * batch * H_Q * HEAD_DIM * (q_len * ctx if mode == "decode" else ctx * (ctx + 1) / 2)
            row = dict(
                mode=mode,
                batch=batch,
                ctx=ctx,
                ms=ms,
                kv_gbps=kv_bytes / (ms * 1e-3) / 1e9,
                gbps=(kv_bytes + q_bytes) / (ms * 1e-3) / 1e9,
                tflops=flops / (ms * 1e-3) / 1e12,
                sdpa_ms=sdpa_ms,
                speedup_vs_sdpa=sdpa_ms / ms,
                plan=f"q{plan.block_q}xn{plan.block_n} splits{plan.num_splits}",
                kernels=1 + (plan.num_splits > 1),
            )
            rows.append(row)
            emit(row)
            del query, kc, vc, tables, kd, vd
            torch.cuda.empty_cache()
    return rows


def _sdpa_per_image(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> list[torch.Tensor]:
    outs, s = [], 0
    for n in lens:
        sl = slice(s, s + n)
        outs.append(
            F.scaled_dot_product_attention(
                q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
            )
        )
        s += n
    return outs


def _silu_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    i = gu.shape[-1] // 2
    return F.silu(gu[:, :i]) * gu[:, i:]


def bench_vision(rep_ms: int, emit) -> list[dict]:
    """Vision tower attention: 16 heads, head_dim 64, full attention within each image."""
    from kernels import attention

    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    for lens in VISION_CASES:
        t = sum(lens)
        q, k, v = (
            torch.randn(t, VISION_HEADS, VISION_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            for _ in range(3)
        )
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
        ms = _time(functools.partial(attention.varlen_attention, q, k, v, cu, max_seqlen=max(lens)), rep_ms)
        sdpa_ms = _time(functools.partial(_sdpa_per_image, q, k, v, lens), rep_ms)
        flops = sum(4 * VISION_HEADS * VISION_DIM * n * n for n in lens)
        row = dict(
            images=len(lens),
            tokens_per_image=lens[0],
            ms=ms,
            tflops=flops / (ms * 1e-3) / 1e12,
            sdpa_ms=sdpa_ms,
            speedup_vs_sdpa=sdpa_ms / ms,
        )
        rows.append(row)
        emit(row)
    return rows


def bench_norms(tokens: list[int], rep_ms: int, emit) -> list[dict]:
    from kernels import norms, reference

    rows = []
    hidden = HIDDEN
    w = torch.ones(hidden, device=DEVICE, dtype=torch.bfloat16)
    for t in tokens:
        x = torch.randn(t, hidden, device=DEVICE, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        gu = torch.randn(t, 2 * INTERMEDIATE, device=DEVICE, dtype=torch.bfloat16)
        p = functools.partial
        cases = [
            ("rms_norm", p(norms.rms_norm, x, w, 1e-6), p(reference.rms_norm, x, w, 1e-6)),
            ("add_rms_norm", p(norms.add_rms_norm, x, r, w, 1e-6), p(reference.add_rms_norm, x, r, w, 1e-6)),
            ("silu_and_mul", p(norms.silu_and_mul, gu), p(_silu_mul_torch, gu)),
        ]
        for name, ours, theirs in cases:
            ms, t_ms = _time(ours, rep_ms), _time(theirs, rep_ms)
            row = dict(kernel=name, tokens=t, ms=ms, torch_ms=t_ms, speedup=t_ms / ms)
            rows.append(row)
            emit(row)
    return rows


def _have_gpu() -> bool:
    return torch.cuda.is_available()


def _interpreted() -> bool:
    from kernels.triton_utils import INTERPRET

    return INTERPRET


def _device_properties():
    return torch.cuda.get_device_properties(0)


class Report:
    """Markdown to stdout as rows arrive; JSON rewritten after each section."""

    def __init__(self, json_path: Path | None, meta: dict) -> None:
        self.json_path = json_path
        self.data: dict[str, Any] = {"meta": meta}
        self._cols: list[str] = []

    def section(self, title: str, cols: list[str]) -> Callable[[dict], None]:
        self._cols = cols
        print(f"\n## {title}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols), flush=True)
        return self.row

    def row(self, r: dict) -> None:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
            return str(v)

        print("| " + " | ".join(fmt(r.get(c, "")) for c in self._cols) + " |", flush=True)

    def save(self, key: str, rows: Any) -> None:
        self.data[key] = rows
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.data, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer M values and configs (about a minute)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    ap.add_argument("--lm-head", action="store_true", help="also the 151936 x 2048 lm_head shape")
    ap.add_argument("--skip", nargs="*", default=[], choices=["qmatmul", "attention", "vision", "norms"])
    args = ap.parse_args(argv)
    if not _have_gpu():
        print(
            "kernels.bench needs a CUDA GPU (the Triton kernels are timed on the device); none found.",
            file=sys.stderr,
        )
        return 2
    import os

    import triton

    if args.quick:
        os.environ.setdefault("GRACE_KERNELS_TUNE_TOP", "3")  # tune over the 3 best guesses only
    if _interpreted():
        print("kernels.bench: TRITON_INTERPRET=1 is set; unset it to time compiled kernels.", file=sys.stderr)
        return 2
    props = _device_properties()
    rep = 10 if args.quick else 20
    meta = dict(
        device=props.name,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        quick=args.quick,
        timing="median of do_bench_cudagraph; weights rotated over >= 200 MB",
    )
    report = Report(args.json, meta)
    print(
        f"# kernels.bench on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}"
    )
    bw = copy_bandwidth(rep)
    meta["copy_gbps"] = bw
    print(f"\nmeasured copy bandwidth: {bw:.0f} GB/s ({COPY_BYTES / 2**30:g} GiB device copy, read + write)")
    report.save("meta", meta)

    if "qmatmul" not in args.skip:
        shapes = SHAPES + ([LM_HEAD] if args.lm_head else [])
        emit = report.section(
            "Quantized matmul (bf16 activations, group 128) vs torch bf16 F.linear",
            [
                "shape",
                "bits",
                "M",
                "ms",
                "gbps",
                "tflops",
                "torch_ms",
                "torch_gbps",
                "speedup",
                "plan",
                "kernels",
            ],
        )
        rows = bench_qmatmul(args.bits, shapes, M_QUICK if args.quick else M_FULL, rep, emit)
        report.save("qmatmul", rows)
        from kernels.qmatmul_triton import tuner

        report.save(
            "qmatmul_tuning",
            [
                {"key": str(k), "timings": [[_plan_str(p), t] for p, t in v]}  # type: ignore[arg-type]
                for k, v in tuner.timings.items()
            ],
        )
        print(f"\n(copy bandwidth {bw:.0f} GB/s; gbps counts weights + scales + x read and y written)")
    if "attention" not in args.skip:
        emit = report.section(
            f"Paged attention ({H_Q} q / {H_KV} kv heads, d {HEAD_DIM}, block {BLOCK}, bf16) vs SDPA on dense K/V",
            [
                "mode",
                "batch",
                "ctx",
                "ms",
                "kv_gbps",
                "tflops",
                "sdpa_ms",
                "speedup_vs_sdpa",
                "plan",
                "kernels",
            ],
        )
        batches = ATT_BATCH_QUICK if args.quick else ATT_BATCH_FULL
        cap = PREFILL_CAP_QUICK if args.quick else PREFILL_CAP_FULL
        report.save("attention", bench_attention(batches, ATT_CTX, cap, rep, emit))
    if "vision" not in args.skip:
        emit = report.section(
            f"Vision attention ({VISION_HEADS} heads, d {VISION_DIM}, per image): Triton varlen vs SDPA loop",
            ["images", "tokens_per_image", "ms", "tflops", "sdpa_ms", "speedup_vs_sdpa"],
        )
        report.save("vision", bench_vision(rep, emit))
    if "norms" not in args.skip:
        emit = report.section(
            f"Fused elementwise kernels vs torch (bf16, hidden {HIDDEN})",
            ["kernel", "tokens", "ms", "torch_ms", "speedup"],
        )
        report.save("norms", bench_norms(NORM_TOKENS, rep, emit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
