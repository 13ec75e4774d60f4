"""Engine benchmark: `python -m server.engine.bench [--model demo | --random-2b] [--json OUT]`.

Reports decode tok/s at several batch sizes, prefill tok/s, and per-step CPU overhead
(wall time of a step minus the time inside the model forward). On CPU it runs the demo
model; on a GPU `--random-2b` builds a random-weight W8G128 model at the real 2B shapes in
memory. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from .core import EngineArgs, EngineCore, EngineRequest
from .sampling_params import SamplingParams


@dataclass
class Row:
    scenario: str
    batch: int
    tokens: int
    seconds: float
    tok_per_s: float
    model_ms_per_step: float
    overhead_ms_per_step: float
    steps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _TimedRunner:
    """Accumulates time inside the model's forward (hooks, synchronized): everything else
    in a step (scheduling, batch building, sampling, bookkeeping) is overhead."""

    def __init__(self, core: EngineCore) -> None:
        self.model_s = 0.0
        self._t0 = 0.0
        dev = core.model.device

        def pre(*_: object) -> None:
            _sync(dev)
            self._t0 = time.perf_counter()

        def post(*_: object) -> None:
            _sync(dev)
            self.model_s += time.perf_counter() - self._t0

        core.model.register_forward_pre_hook(pre)
        core.model.register_forward_hook(post)


def _drain(core: EngineCore, timer: _TimedRunner, max_steps: int) -> tuple[int, int, float, float]:
    """Step until idle; returns (steps, generated tokens, wall s, model s)."""
    steps = gen = 0
    timer.model_s = 0.0
    t = time.perf_counter()
    while core.has_unfinished() and steps < max_steps:
        gen += sum(len(o.new_token_ids) for o in core.step())
        steps += 1
    _sync(core.model.device)
    return steps, gen, time.perf_counter() - t, timer.model_s


def run(core: EngineCore, batches: list[int], prompt_len: int, decode_tokens: int) -> list[Row]:
    timer = _TimedRunner(core)
    rows: list[Row] = []
    g = torch.Generator().manual_seed(0)
    rid = 0
    cfg = core.model.cfg
    text_vocab = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id)  # no special tokens

    def add(n: int, plen: int, max_tokens: int) -> None:
        nonlocal rid
        for _ in range(n):
            ids = torch.randint(10, text_vocab, (plen,), generator=g).tolist()
            core.add_request(
                EngineRequest(
                    f"b{rid}", ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                )
            )
            rid += 1

    # warm-up (allocator, kernels' first compile)
    add(2, prompt_len, 4)
    _drain(core, timer, 10_000)

    # prefill throughput: a batch of prompts, one output token each
    n_prefill = max(1, min(16, core.args.max_num_seqs))
    add(n_prefill, prompt_len, 1)
    steps, _, wall, model = _drain(core, timer, 10_000)
    toks = n_prefill * prompt_len
    rows.append(
        Row(
            "prefill",
            n_prefill,
            toks,
            wall,
            toks / wall,
            1e3 * model / steps,
            1e3 * (wall - model) / steps,
            steps,
        )
    )

    for b in batches:
        if b > core.args.max_num_seqs:
            continue
        add(b, 16, decode_tokens)
        # run the prefill of the batch first, then time pure decode steps
        while any(s.in_prefill for s in core.scheduler.running) or core.scheduler.waiting:
            core.step()
        steps, gen, wall, model = _drain(core, timer, 100_000)
        rows.append(
            Row("decode", b, gen, wall, gen / wall, 1e3 * model / steps, 1e3 * (wall - model) / steps, steps)
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo name or checkpoint path (ignored with --random-2b)")
    ap.add_argument(
        "--random-2b", action="store_true", help="random W8G128 weights at the real 2B shapes (GPU)"
    )
    ap.add_argument("--bits", type=int, default=8, choices=(8, 4))
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma separated")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = [int(x) for x in a.batches.split(",")]
    args = EngineArgs(
        model=a.model,
        device=str(device),
        max_model_len=4096,
        max_num_seqs=max(a.max_num_seqs, *batches),
        max_num_batched_tokens=max(2048, a.prompt_len * 16),
        num_kv_blocks=None if device.type == "cuda" else 4096,
    )
    model = None
    label = a.model
    if a.random_2b:
        from server.model.synthetic import REAL_2B_CONFIG, random_model

        model = random_model(REAL_2B_CONFIG, bits=a.bits, device=device)
        label = f"random-2b-w{a.bits}g128"
    core = EngineCore(args, model=model)
    rows = run(core, batches, a.prompt_len, a.decode_tokens)

    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nengine benchmark: {label} on {device.type} ({card}), torch {torch.__version__}")
    print("| scenario | batch | tokens | tok/s | model ms/step | overhead ms/step | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.scenario} | {r.batch} | {r.tokens} | {r.tok_per_s:.1f} | {r.model_ms_per_step:.2f} | "
            f"{r.overhead_ms_per_step:.2f} | {r.steps} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "model": label,
                    "device": device.type,
                    "card": card,
                    "torch": torch.__version__,
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
