"""Engine benchmark: `python -m server.engine.bench [--model demo | --random-2b] [--json OUT]`.

Reports prefill tok/s and decode tok/s at several batch sizes in each engine mode: eager
steps run synchronously with the model forward timed (so per-step CPU overhead = wall time
minus forward time), then, on CUDA, decode from CUDA graphs synchronously and with async
scheduling (the default), and a sampled decode (temperature 0.8, top-p 0.95). On CPU it runs
the demo model; on a GPU `--random-2b` builds a random-weight W8G128 model at the real 2B
shapes in memory. `--structured` adds the same sampled decode with every row constrained by
a JSON schema (vs the unconstrained row of the same run), and the mask cost alone (fill on
the host + apply on the device) at a 152k-token synthetic vocabulary. Prints a Markdown
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import string
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from server.model.qwen3_vl import Qwen3VL

from .core import EngineArgs, EngineCore
from .kv_cache import BlockManager, BlockSpans
from .messages import EngineRequest
from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceData, Status
from .structured import GrammarCompiler, GrammarState, StructuredOutput, apply_bitmask, fill_bitmask

# A schema the random model rarely completes in 32 tokens (a free string), so the batch
# stays full: the steps measure the mask on every row.
BENCH_SCHEMA = (
    '{"type": "object", "properties": {"title": {"type": "string"}, "n": {"type": "integer"}},'
    ' "required": ["title", "n"], "additionalProperties": false}'
)


@dataclass
class Row:
    scenario: str
    mode: str  # "eager/sync" (timed per forward), "graphs/sync", "graphs/async", "eager/async"
    batch: int
    tokens: int
    seconds: float
    tok_per_s: float
    ms_per_step: float
    model_ms_per_step: float | None  # only in the timed mode: the forwards, synchronized
    overhead_ms_per_step: float | None  # ... and everything else in a step
    steps: int


@dataclass(frozen=True)
class Mode:
    name: str
    graphs: bool
    async_scheduling: bool
    timed: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _ForwardTimer:
    """While `active`, accumulates time inside the model's forward (hooks, synchronized):
    everything else in a step (scheduling, batch building, sampling, bookkeeping) is
    overhead. Only meaningful for eager sync steps (graph replays bypass the hooks, and the
    synchronization would defeat async scheduling)."""

    def __init__(self, core: EngineCore) -> None:
        self.model_s = 0.0
        self.active = False
        self._t0 = 0.0
        dev = core.model.device

        def pre(*_: object) -> None:
            if self.active:
                _sync(dev)
                self._t0 = time.perf_counter()

        def post(*_: object) -> None:
            if self.active:
                _sync(dev)
                self.model_s += time.perf_counter() - self._t0

        core.model.register_forward_pre_hook(pre)
        core.model.register_forward_hook(post)


def _drain(core: EngineCore, timer: _ForwardTimer, max_steps: int) -> tuple[int, int, float, float]:
    """Step until idle; returns (steps, generated tokens, wall s, model s)."""
    steps = gen = 0
    timer.model_s = 0.0
    t = time.perf_counter()
    while core.has_unfinished() and steps < max_steps:
        gen += sum(len(o.new_token_ids) for o in core.step())
        steps += 1
    _sync(core.model.device)
    return steps, gen, time.perf_counter() - t, timer.model_s


def modes_for(core: EngineCore) -> list[Mode]:
    """The timed eager/sync baseline, then what the device supports up to the default."""
    modes = [Mode("eager/sync", graphs=False, async_scheduling=False, timed=True)]
    if core.runner.decode_graphs is not None and core.runner.decode_graphs.capture:
        modes.append(Mode("graphs/sync", graphs=True, async_scheduling=False))
        modes.append(Mode("graphs/async", graphs=True, async_scheduling=True))
    else:
        modes.append(Mode("eager/async", graphs=False, async_scheduling=True))
    return modes


def run(
    core: EngineCore,
    batches: list[int],
    prompt_len: int,
    decode_tokens: int,
    sampled_batch: int | None = None,
    structured: bool = False,
) -> list[Row]:
    """Prefill, then decode at each batch size in every mode of `modes_for`, then (optionally)
    a sampled decode (temperature 0.8, top-p 0.95) at `sampled_batch` in the last mode."""
    timer = _ForwardTimer(core)
    graphs = core.runner.decode_graphs
    rows: list[Row] = []
    g = torch.Generator().manual_seed(0)
    rid = 0
    cfg = core.model.cfg
    text_vocab = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id)  # no special tokens
    greedy = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)

    def add(n: int, plen: int, params: SamplingParams) -> None:
        nonlocal rid
        for _ in range(n):
            ids = torch.randint(10, text_vocab, (plen,), generator=g).tolist()
            core.add_request(EngineRequest(f"b{rid}", ids, params))
            rid += 1

    def use(mode: Mode) -> None:
        core.runner.decode_graphs = graphs if mode.graphs else None
        core.async_scheduling = mode.async_scheduling
        timer.active = mode.timed

    def row(scenario: str, mode: Mode, batch: int, steps: int, tokens: int, wall: float, model: float) -> Row:
        timed = mode.timed and steps
        return Row(
            scenario,
            mode.name,
            batch,
            tokens,
            wall,
            tokens / wall,
            1e3 * wall / max(steps, 1),
            1e3 * model / steps if timed else None,
            1e3 * (wall - model) / steps if timed else None,
            steps,
        )

    modes = modes_for(core)
    base = modes[0]
    use(base)
    # warm-up (allocator, kernels' first compile)
    add(2, prompt_len, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    _drain(core, timer, 10_000)

    # prefill throughput: a batch of prompts, one output token each
    n_prefill = max(1, min(16, core.args.max_num_seqs))
    add(n_prefill, prompt_len, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    steps, _, wall, model = _drain(core, timer, 10_000)
    rows.append(row("prefill", base, n_prefill, steps, n_prefill * prompt_len, wall, model))

    def decode(scenario: str, mode: Mode, b: int, params: SamplingParams) -> None:
        use(Mode("prefill", graphs=False, async_scheduling=False))
        add(b, 16, params)
        # untimed: any grammar compile (rows join the scheduler once it is done), the batch's
        # prefill and its first token; then pure decode steps are timed
        while len(core.scheduler.running) < b or any(s.in_prefill for s in core.scheduler.running):
            core.step()
        use(mode)
        steps, gen, wall, model = _drain(core, timer, 100_000)
        rows.append(row(scenario, mode, b, steps, gen, wall, model))

    for b in batches:
        if b > core.args.max_num_seqs:
            continue
        for mode in modes:
            decode("decode", mode, b, greedy)
    if sampled_batch and sampled_batch <= core.args.max_num_seqs:
        sampled = SamplingParams(
            temperature=0.8, top_p=0.95, seed=0, max_tokens=decode_tokens, ignore_eos=True
        )
        decode("decode-sampled", modes[-1], sampled_batch, sampled)
        if structured:
            so = StructuredOutput("json_schema", BENCH_SCHEMA)
            decode("decode-json", modes[-1], sampled_batch, replace(sampled, structured=so))
    use(modes[-1])
    return rows


def _synthetic_tokenizer(vocab: int) -> Any:
    """A byte-level BPE with `vocab` - 2 random lowercase words (half with a leading space)
    and two specials: the real tokenizer's size, no download (llguidance reads only the
    tokens' bytes, so no merges are needed)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    rng = random.Random(0)
    table = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    while len(table) < vocab - 2:
        w = ("Ġ" if rng.random() < 0.5 else "") + "".join(
            rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))
        )
        table.setdefault(w, len(table))
    tok = Tokenizer(BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    return tok


def _median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 3)


def _clone_argmax(logits: torch.Tensor) -> list[int]:
    return logits.clone().argmax(-1).tolist()


def _advance_all(states: list[GrammarState], picked: list[int]) -> None:
    for s, t in zip(states, picked):
        s.advance(t)


def mask_cost(batch: int, vocab: int, device: torch.device, steps: int = 30) -> dict[str, float]:
    """Per-step medians (ms) of the grammar mask's pieces alone at a real-size vocabulary:
    `batch` matchers filling one bitmask, the bitmask applied in place to [batch, vocab]
    logits, each matcher advancing by the argmax (a greedy walk through the schema's free
    string); and the unconstrained tail (clone + argmax) for scale. The pieces alternate
    within every step, so a busy machine's drift hits them alike."""
    tok = _synthetic_tokenizer(vocab)
    eos = tok.token_to_id("<|im_end|>")
    t0 = time.perf_counter()
    compiled = GrammarCompiler(tok, vocab, [eos]).compile(StructuredOutput("json_schema", BENCH_SCHEMA))
    compile_ms = 1e3 * (time.perf_counter() - t0)
    states = [GrammarState(compiled) for _ in range(batch)]
    logits = torch.randn(batch, vocab, device=device)
    rows = list(range(batch))
    times: dict[str, list[float]] = {"fill": [], "apply": [], "advance": [], "tail": []}

    def timed(piece: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        _sync(device)
        times[piece].append(time.perf_counter() - t)
        return out

    for _ in range(steps):
        timed("tail", _clone_argmax, logits)
        mask = timed("fill", fill_bitmask, states, vocab, device)
        masked = logits.clone()
        timed("apply", apply_bitmask, masked, rows, mask)
        timed("advance", _advance_all, states, masked.argmax(-1).tolist())
    out: dict[str, float] = {
        "batch": batch,
        "vocab": vocab,
        "steps": steps,
        "compile_ms": round(compile_ms, 2),
    }
    return out | {f"{k}_ms_per_step": _median_ms(v) for k, v in times.items()}


def structured_ab(core: EngineCore, batch: int, decode_tokens: int, repeats: int = 5) -> dict[str, float]:
    """Per-step ms of the sampled decode at `batch` (in the core's current mode), every row
    unconstrained vs every row under BENCH_SCHEMA, in alternating runs (none, json, none,
    ...) so a shared machine's drift hits both alike; medians over all decode steps."""
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=decode_tokens, ignore_eos=True)
    kinds = {
        "none": sampled,
        "json": replace(sampled, structured=StructuredOutput("json_schema", BENCH_SCHEMA)),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    tokens = dict.fromkeys(kinds, 0)
    for r in range(repeats):
        for kind, params in kinds.items():
            for i in range(batch):
                core.add_request(EngineRequest(f"ab{r}-{kind}-{i}", list(range(10, 26)), params))
            # untimed: the grammar compile (rows join the scheduler once it is done) and the prefill
            while len(core.scheduler.running) < batch or any(s.in_prefill for s in core.scheduler.running):
                core.step()
            while core.has_unfinished():
                t = time.perf_counter()
                tokens[kind] += sum(len(o.new_token_ids) for o in core.step())
                _sync(core.model.device)
                times[kind].append(time.perf_counter() - t)
    none, con = statistics.median(times["none"]), statistics.median(times["json"])
    return {
        "batch": batch,
        "repeats": repeats,
        "none_ms_per_step": round(1e3 * none, 3),
        "json_ms_per_step": round(1e3 * con, 3),
        "ratio": round(con / none, 3),
        "steps": len(times["none"]),
        "tokens_none": tokens["none"],
        "tokens_json": tokens["json"],
    }


@dataclass
class OverheadRow:
    batch: int
    context: int  # tokens already in each sequence's KV cache (faked: no prefill ran)
    steps: int
    ms_per_step: float  # host work of one decode step, the model forward stubbed


def _stub_forward(model: Qwen3VL) -> None:
    """The decoder forward and the LM head return zeros at once (contiguous, as the real
    ones): what remains of a step is host work (on CPU also the sampler's small tensor ops)."""
    text = model.cfg.text
    bufs = {
        "hidden": torch.zeros(0, text.hidden_size, dtype=model.dtype),
        "logits": torch.zeros(0, text.vocab_size),
    }

    def rows(name: str, n: int) -> torch.Tensor:
        if bufs[name].shape[0] < n:
            bufs[name] = bufs[name].new_zeros(n, bufs[name].shape[1])
        return bufs[name][:n]

    model.forward = lambda ids, *_, **__: rows("hidden", ids.shape[0])  # type: ignore[method-assign]
    model.compute_logits = lambda h: rows("logits", h.shape[0])  # type: ignore[method-assign]


def _fake_running(core: EngineCore, batch: int, context: int, max_tokens: int) -> None:
    """`batch` running sequences of `context` computed tokens each: their KV blocks are
    allocated, none of their prefill runs (the next step decodes their last prompt token)."""
    bs = core.args.block_size
    need = batch * -(-(context + max_tokens + 1) // bs)
    # the stubbed model never reads the KV pool, so the block manager may hand out more
    # block ids than the runner's (small) cache tensors hold
    core.block_manager = core.scheduler.bm = BlockManager(need, bs, enable_prefix_caching=False)
    positions = torch.arange(context).expand(3, -1)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = [11] * context
    for i in range(batch):
        rid = f"o{batch}x{context}-{i}"
        data = SequenceData.from_prompt(prompt, [], positions, 0)
        seq = Sequence(rid, 0, data, params, BlockSpans(), core.max_model_len)
        got = core.block_manager.allocate_prompt(seq.data.token_ids, seq.spans, reserve=1)
        assert got is not None, "the fake pool is sized for every sequence"
        seq.block_table = got[0]
        seq.num_computed = context - 1
        seq.status = Status.RUNNING
        seq.scheduled_time = time.monotonic()
        core.scheduler.running.append(seq)
        core.requests[rid] = [seq]
        core.eos[rid] = frozenset()


def overhead(
    batches: list[int], contexts: list[int], steps: int = 20, warmup: int = 3, model: str = "demo"
) -> list[OverheadRow]:
    """Host ms per decode step at each (batch, context), model forward stubbed, sync steps."""
    from server.model.loader import load_model

    net = load_model(model, device=torch.device("cpu")).model
    _stub_forward(net)
    # The few small tensor ops left are not worth two threads; on a shared machine the
    # second thread's wake-ups would be most of what is timed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for context in contexts:
        for batch in batches:
            args = EngineArgs(
                model=model,
                device="cpu",
                max_model_len=context + steps + warmup + 16,
                max_num_seqs=batch,
                max_num_batched_tokens=max(2048, batch),
                num_kv_blocks=-(-(context + steps + warmup + 16) // 16),
                enable_prefix_caching=False,
                async_scheduling=False,
            )
            core = EngineCore(args, model=net)
            _fake_running(core, batch, context, max_tokens=steps + warmup + 8)
            for _ in range(warmup):
                core.step()
            t = time.perf_counter()
            for _ in range(steps):
                core.step()
            ms = 1e3 * (time.perf_counter() - t) / steps
            rows.append(OverheadRow(batch, context, steps, round(ms, 3)))
            del core
    torch.set_num_threads(threads)
    return rows


def _print_overhead(rows: list[OverheadRow]) -> None:
    contexts = sorted({r.context for r in rows})
    by = {(r.batch, r.context): r.ms_per_step for r in rows}
    print("\nhost ms per decode step (model stubbed)")
    print(
        "| batch | " + " | ".join(f"ctx {c}" for c in contexts) + f" | ctx {contexts[-1]} / {contexts[0]} |"
    )
    print("|---" * (len(contexts) + 2) + "|")
    for b in sorted({r.batch for r in rows}):
        cells = [by[(b, c)] for c in contexts]
        print(f"| {b} | " + " | ".join(f"{x:.3f}" for x in cells) + f" | {cells[-1] / cells[0]:.2f}x |")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _startup(core: EngineCore, seconds: float) -> dict[str, object]:
    """What the engine start cost and decided: KV pool, memory profile, decode graphs."""
    graphs = core.runner.decode_graphs
    profile = core.memory_profile
    return {
        "seconds": round(seconds, 2),
        "num_kv_blocks": core.runner.num_blocks,
        "max_model_len": core.max_model_len,
        "async_scheduling": core.async_scheduling,
        "graph_sizes": graphs.sizes if graphs is not None and graphs.capture else [],
        "graph_mib": round(graphs.memory / 2**20, 1) if graphs is not None else 0,
        "memory_profile_mib": {k: round(v / 2**20, 1) for k, v in asdict(profile).items()}
        if profile
        else None,
    }


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
    ap.add_argument("--sampled-batch", type=int, default=64, help="batch of the sampled decode row (0: none)")
    ap.add_argument(
        "--structured", action="store_true", help="also the sampled decode under a JSON schema, + mask cost"
    )
    ap.add_argument(
        "--overhead", action="store_true", help="host ms per decode step, model stubbed (CPU; --context)"
    )
    ap.add_argument("--context", default="1024,32768", help="--overhead: cached tokens per sequence")
    ap.add_argument("--json", default=None)
    ap.add_argument("--count-kernels", action="store_true", help="count one decode step's kernels (CPU)")
    ap.add_argument("--batch", type=int, default=1, help="decode batch of --count-kernels")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built for --count-kernels")
    a = ap.parse_args(argv)
    if a.count_kernels:
        from .kernel_count import main as count_kernels

        count_kernels(a.batch, a.layers)
        return
    if a.overhead:
        return _overhead_main(a)
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
    t0 = time.perf_counter()
    core = EngineCore(args, model=model)
    if a.structured and core.grammar_compiler is None:  # random weights come without a tokenizer
        vocab = core.model.cfg.text.vocab_size
        tok = _synthetic_tokenizer(vocab)
        core.grammar_compiler = GrammarCompiler(tok, vocab, [tok.token_to_id("<|im_end|>")])
    startup = _startup(core, time.perf_counter() - t0)
    print("engine start:", ", ".join(f"{k} {v}" for k, v in startup.items()))
    rows = run(core, batches, a.prompt_len, a.decode_tokens, a.sampled_batch, a.structured)
    ab = structured_ab(core, a.sampled_batch or 64, a.decode_tokens) if a.structured else None
    masks = mask_cost(a.sampled_batch or 64, 151936, device) if a.structured else None

    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nengine benchmark: {label} on {device.type} ({card}), torch {torch.__version__}")
    print("| scenario | mode | batch | tokens | tok/s | ms/step | model ms/step | overhead ms/step | steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.scenario} | {r.mode} | {r.batch} | {r.tokens} | {r.tok_per_s:.1f} | {r.ms_per_step:.2f} | "
            f"{_ms(r.model_ms_per_step)} | {_ms(r.overhead_ms_per_step)} | {r.steps} |"
        )
    by = {r.scenario: r for r in rows}
    if "decode-json" in by:
        base, con = by["decode-sampled"], by["decode-json"]
        print(
            f"\nstructured decode, batch {con.batch}, one pass each: {con.ms_per_step:.2f} ms/step constrained "
            f"vs {base.ms_per_step:.2f} unconstrained ({100 * (con.ms_per_step / base.ms_per_step - 1):+.1f} %)"
        )
    if ab and masks:
        print(
            "alternating runs, batch {batch}, medians of {repeats} runs each: {json_ms_per_step} ms/step "
            "constrained vs {none_ms_per_step} unconstrained (ratio {ratio})".format(**ab)
        )
        print(
            "grammar mask alone at vocab {vocab}, batch {batch}, medians of {steps} steps: compile {compile_ms} ms, "
            "fill {fill_ms_per_step} ms/step, apply {apply_ms_per_step}, advance {advance_ms_per_step}; "
            "unconstrained clone + argmax {tail_ms_per_step}".format(**masks)
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "model": label,
                    "device": device.type,
                    "card": card,
                    "torch": torch.__version__,
                    "startup": startup,
                    "rows": [asdict(r) for r in rows],
                    "grammar_mask": masks,
                    "structured_ab": ab,
                },
                f,
                indent=2,
            )


def _overhead_main(a: argparse.Namespace) -> None:
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.context.split(",")]
    rows = overhead(batches, contexts, steps=a.decode_tokens, model=a.model)
    _print_overhead(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "model": a.model,
                    "device": "cpu",
                    "card": platform.processor() or "cpu",
                    "torch": torch.__version__,
                    "overhead": [asdict(r) for r in rows],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
