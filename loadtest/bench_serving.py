"""Serving benchmark for grace-serve (or any OpenAI-compatible server), reporting what
`vllm bench serve` reports, under the same names, so numbers compare side by side.

    # 200 requests, 256 text tokens in / 64 out, one 448x448 image each, 16 at a time
    python loadtest/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 \
        --random-input-len 256 --random-output-len 64 --image-sizes 448x448 --images-per-request 1 \
        --max-concurrency 16 --ignore-eos --json result.json

    # latency percentiles vs throughput over a sweep of concurrencies
    python loadtest/bench_serving.py --num-prompts 64 --sweep-concurrency 1,2,4,8,16 \
        --json sweep.json --plot sweep.png

Workload: random text of a set token length (disjoint windows of a tokenized random word
stream, turned back into text by the server's /detokenize: exact lengths in the server's
tokenizer, and no shared prefixes for the prefix cache to reuse), random noise images of set
sizes (a new image per request), and a fixed output length (`--ignore-eos`). `--word-prompts`
makes the texts words of the same seeded stream whatever the server (comparisons).
Requests go out at `--request-rate` (Poisson, or gamma with `--burstiness`) and/or under
`--max-concurrency`, all streamed.

Definitions (as vLLM's): TTFT = request sent -> first chunk that carries text; ITL = gaps
between successive text chunks; TPOT = (E2EL - TTFT) / (output tokens - 1); E2EL = request
sent -> end of the stream. Token counts are the server's own (`usage` of the last chunk):
input tokens include the chat template and the image tokens. Goodput counts requests that
meet every SLO given with `--goodput ttft:MS tpot:MS e2el:MS`.

`--ttft-breakdown` (grace-serve only): reads the server's /metrics before and after the
measured requests and prints where its mean TTFT went, part by part (docs/METRICS.md, "Where
the time to first token goes"): the parts add up to the server's TTFT, which starts when the
request reaches the API (the client's also holds the connection and the HTTP parsing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
# The server's TTFT parts, in order (they add up to its TTFT), and the vision time inside prefill.
SERVER_PREFIX = "grace_serve_"
TTFT_PARTS = ("api_preprocess", "engine_transit_in", "queue_time", "prefill_time", "engine_transit_out",
              "detokenize")  # fmt: skip
BREAKDOWN_HISTOGRAMS = {"ttft": "time_to_first_token_seconds", "vision_encode": "request_vision_encode_seconds",
                        **{p: f"request_{p}_seconds" for p in TTFT_PARTS}}  # fmt: skip
# Plain words: the server's tokenizer splits them as it would real text.
WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "image picture color light shape model token server request answer question describe window river"
).split()


# -- workload -----------------------------------------------------------------------------


@dataclass
class RequestInput:
    text: str
    output_len: int
    images: list[str] = field(default_factory=list)  # data URLs


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    prompt_len: int = 0  # usage.prompt_tokens
    output_tokens: int = 0  # usage.completion_tokens
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""


def parse_sizes(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    sizes = []
    for item in text.split(","):
        w, sep, h = item.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
            raise argparse.ArgumentTypeError(f"bad image size {item!r}: expected WxH, e.g. 448x448")
        sizes.append((int(w), int(h)))
    return sizes


def random_image(width: int, height: int, rng: np.random.Generator) -> str:
    """A JPEG of uniform noise as a data URL: every request's image is different (no cache hits)."""
    from PIL import Image

    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_lens(n: int, mean: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """vLLM's random dataset: uniform in [mean*(1-ratio), mean*(1+ratio)], at least 1."""
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


async def token_pool(client: httpx.AsyncClient, need: int, rng: np.random.Generator) -> list[int] | None:
    """`need` token ids of a random word stream, in the server's tokenizer (None: no /tokenize)."""
    ids: list[int] = []
    words = 4096  # each word is at least one token: every call adds >= 4096 ids
    for _ in range(need // words + 2):  # bounded
        if len(ids) >= need:
            break
        resp = await client.post("/tokenize", json={"prompt": " ".join(rng.choice(WORDS, size=words))})
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        ids += resp.json()["tokens"]
    if len(ids) < need:
        raise RuntimeError(f"could not build a token pool of {need} tokens")
    return ids


async def build_workload(
    client: httpx.AsyncClient, args: argparse.Namespace, seed: int
) -> list[RequestInput]:
    """num_warmups + num_prompts requests (warmups first), no two sharing a text prefix."""
    rng = np.random.default_rng(seed)
    n = args.num_warmups + args.num_prompts
    in_lens = sample_lens(n, args.random_input_len, args.random_range_ratio, rng)
    out_lens = sample_lens(n, args.random_output_len, args.random_range_ratio, rng)
    # disjoint windows of one random stream: the prefix cache finds nothing to share but the
    # chat template, as with vLLM's random token ids
    pool = None if args.word_prompts else await token_pool(client, sum(in_lens), rng)
    if pool is None and not args.word_prompts:
        print("warning: the server has no /tokenize; input lengths are in words, not tokens", file=sys.stderr)
    sizes = parse_sizes(args.image_sizes)
    requests = []
    offset = 0
    for i in range(n):
        if pool is not None:
            window, offset = pool[offset : offset + in_lens[i]], offset + in_lens[i]
            resp = await client.post("/detokenize", json={"tokens": window})
            resp.raise_for_status()
            text = resp.json()["prompt"]
        else:
            text = " ".join(rng.choice(WORDS, size=in_lens[i]))
        images = []
        if sizes and args.images_per_request > 0 and rng.random() < args.image_fraction:
            for _ in range(args.images_per_request):
                w, h = sizes[int(rng.integers(0, len(sizes)))]
                images.append(random_image(w, h, rng))
        requests.append(RequestInput(text=text, output_len=out_lens[i], images=images))
    return requests


# -- one request --------------------------------------------------------------------------


def request_body(req: RequestInput, args: argparse.Namespace, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": args.temperature,
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    for name in ("top_p", "top_k", "min_p"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.backend == "openai":
        body["prompt"] = req.text
    elif req.images:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in req.images]
        body["messages"] = [{"role": "user", "content": [*parts, {"type": "text", "text": req.text}]}]
    else:
        body["messages"] = [{"role": "user", "content": req.text}]
    if args.extra_body:
        body.update(args.extra_body)
    return body


async def send_request(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], chat: bool
) -> RequestOutput:
    out = RequestOutput(start_time=time.time())
    st = last = time.perf_counter()
    text: list[str] = []
    done = finished = False
    try:
        async with client.stream("POST", endpoint, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return out
            async for line in resp.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data: "):
                    raise ValueError(f"not an SSE data line: {line[:80]!r}")
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise ValueError(f"error event: {json.dumps(chunk['error'])[:300]}")
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                    piece = choice["delta"].get("content") if chat else choice.get("text")
                    if piece:
                        if not text:
                            out.ttft = now - st
                        else:
                            out.itl.append(now - last)
                        last = now
                        text.append(piece)
                if chunk.get("usage"):
                    out.prompt_len = chunk["usage"]["prompt_tokens"]
                    out.output_tokens = chunk["usage"]["completion_tokens"]
        out.latency = time.perf_counter() - st
        if (
            not done and not finished
        ):  # a finish_reason alone ends it too (transformers serve sends no [DONE])
            raise ValueError("stream ended without data: [DONE]")
        if out.output_tokens == 0 and out.prompt_len == 0:
            raise ValueError("no usage in the stream (the server must honor stream_options.include_usage)")
        if not text:
            out.ttft = out.latency  # nothing printable came: the first output was the end
        out.generated_text = "".join(text)
        out.success = True
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


# -- the server's TTFT breakdown ------------------------------------------------------------


async def histogram_totals(client: httpx.AsyncClient) -> dict[str, tuple[float, float]] | None:
    """(count, sum) of each BREAKDOWN_HISTOGRAMS entry from /metrics (None: not a grace-serve)."""
    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    samples: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line.startswith(SERVER_PREFIX):
            name, _, value = line.rpartition(" ")
            key = name.split("{", 1)[0]
            samples[key] = samples.get(key, 0.0) + float(value)
    totals = {}
    for part, hist in BREAKDOWN_HISTOGRAMS.items():
        count, total = (
            samples.get(SERVER_PREFIX + hist + "_count"),
            samples.get(SERVER_PREFIX + hist + "_sum"),
        )
        if count is None or total is None:
            return None
        totals[part] = (count, total)
    return totals


def ttft_breakdown(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, Any] | None:
    """Mean ms of each part over the requests between two scrapes, and its share of the TTFT."""
    moved = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    n, ttft = moved["ttft"]
    if n <= 0:
        return None
    parts = {p: moved[p][1] / n * 1000 for p in (*TTFT_PARTS, "vision_encode")}
    mean_ttft = ttft / n * 1000
    return {
        "requests": int(n),
        "mean_ttft_ms": mean_ttft,
        "mean_ms": parts,
        "share": {p: v / mean_ttft if mean_ttft > 0 else 0.0 for p, v in parts.items()},
        "sum_of_parts_ms": sum(parts[p] for p in TTFT_PARTS),
    }


def breakdown_report(bd: dict[str, Any]) -> str:
    lines = ["{s:{c}^{n}}".format(s=f" Server TTFT breakdown ({bd['requests']} requests) ", n=50, c="-")]
    lines.append(f"{'Part':<28} {'Mean (ms)':>10} {'Share':>9}")
    for p in (*TTFT_PARTS, "vision_encode"):
        label = "  (vision_encode, in prefill)" if p == "vision_encode" else p
        lines.append(f"{label:<28} {bd['mean_ms'][p]:>10.2f} {bd['share'][p] * 100:>8.1f}%")
    lines.append(f"{'sum of parts':<28} {bd['sum_of_parts_ms']:>10.2f}")
    lines.append(f"{'server TTFT':<28} {bd['mean_ttft_ms']:>10.2f}")
    return "\n".join(lines)


# -- scheduling ---------------------------------------------------------------------------


def arrival_delays(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times (s from start): all at 0 for rate=inf, else Poisson/gamma arrivals at `rate`."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    times *= (n / rate) / times[-1]  # as vLLM: the run lasts n/rate, whatever the draw
    return [float(t) for t in times]


async def run_once(
    args: argparse.Namespace, max_concurrency: int | None, seed: int, client: httpx.AsyncClient, model: str
) -> dict[str, Any]:
    workload = await build_workload(client, args, seed)
    chat = args.backend == "openai-chat"
    bodies = [request_body(r, args, model) for r in workload]
    warmups, bodies = bodies[: args.num_warmups], bodies[args.num_warmups :]
    for body in warmups:  # their own prompts: nothing the measured requests could reuse
        await send_request(client, args.endpoint, body, chat)

    delays = arrival_delays(len(bodies), args.request_rate, args.burstiness, np.random.default_rng(seed))
    gate: Any = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    scraped = await histogram_totals(client) if args.ttft_breakdown else None
    if args.ttft_breakdown and scraped is None:
        print("warning: no grace-serve TTFT histograms at /metrics: no breakdown", file=sys.stderr)
    start = time.perf_counter()

    async def one(body: dict[str, Any], delay: float) -> RequestOutput:
        await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
        async with gate:
            return await send_request(client, args.endpoint, body, chat)

    outputs = await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays)))
    duration = time.perf_counter() - start
    result = calculate_metrics(outputs, duration, args.percentiles, args.goodput_slos)
    if scraped is not None:
        after = await histogram_totals(client)
        result["ttft_breakdown"] = ttft_breakdown(scraped, after) if after is not None else None
    result.update(
        date=datetime.now().strftime("%Y%m%d-%H%M%S"),
        backend=args.backend,
        base_url=args.base_url,
        endpoint=args.endpoint,
        model_id=model,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate if not math.isinf(args.request_rate) else "inf",
        burstiness=args.burstiness,
        max_concurrency=max_concurrency,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        image_sizes=args.image_sizes or "",
        images_per_request=args.images_per_request,
        image_fraction=args.image_fraction,
        num_image_requests=sum(1 for r in workload[args.num_warmups :] if r.images),
        ignore_eos=args.ignore_eos,
        seed=seed,
    )
    if args.save_detailed:
        result["itls"] = [o.itl for o in outputs]
        result["generated_texts"] = [o.generated_text for o in outputs]
    return result


# -- metrics ------------------------------------------------------------------------------


def _stats(name: str, values: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std/pXX of seconds, in ms (0 for no values, as vLLM)."""
    v = np.asarray(values or [0.0]) * 1000
    out = {
        f"mean_{name}_ms": float(v.mean()),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(v.std()),
    }
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(v, p))
    return out


def calculate_metrics(
    outputs: list[RequestOutput], duration: float, percentiles: list[float], slos: dict[str, float]
) -> dict[str, Any]:
    ok = [o for o in outputs if o.success]
    ttfts = [o.ttft for o in ok]
    e2els = [o.latency for o in ok]
    itls = [x for o in ok for x in o.itl]
    # TPOT only where there is a second token; goodput counts a 1-token request's TPOT as 0
    tpot_of = [(o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0 for o in ok]
    tpots = [t for o, t in zip(ok, tpot_of) if o.output_tokens > 1]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)

    good = 0
    if slos:
        per_req = {"ttft": ttfts, "tpot": tpot_of, "e2el": e2els}
        for i in range(len(ok)):
            good += all(per_req[k][i] * 1000 <= slo for k, slo in slos.items())

    # peak output tokens/s over 1-second buckets, and the most requests active in one (vLLM's).
    # A chunk may carry several tokens (text held back until it is whole): spread the request's
    # token count over its chunks, so the buckets add up to the tokens generated.
    peak_tps, peak_conc = 0.0, 0
    if ok:
        t0 = min(o.start_time for o in ok)
        seconds = math.ceil(max(o.start_time + o.latency for o in ok) - t0) + 1
        tokens, conc = np.zeros(seconds), np.zeros(seconds)
        for o in ok:
            t, per_chunk = o.start_time + o.ttft, o.output_tokens / (1 + len(o.itl))
            for gap in [0.0, *o.itl]:
                t += gap
                tokens[min(seconds - 1, int(t - t0))] += per_chunk
            conc[int(o.start_time - t0) : int(o.start_time + o.latency - t0) + 1] += 1
        peak_tps, peak_conc = float(tokens.max()), int(conc.max())

    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_tps,
        "max_concurrent_requests": peak_conc,
        "goodput_slos_ms": slos or None,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "e2els": [o.latency for o in outputs],
        "errors": [o.error for o in outputs],
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        result.update(_stats(name, values, percentiles))
    return result


def report(result: dict[str, Any], percentiles: list[float]) -> str:
    """The result block as `vllm bench serve` prints it."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40} {value:<10{fmt}}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    if result.get("request_rate") not in (None, "inf"):
        row("Request rate configured (RPS):", result["request_rate"], ".2f")
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f")
    row("Peak concurrent requests:", result["max_concurrent_requests"], ".2f")
    row("Total Token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for name in METRICS:
        short, header = METRIC_HEADERS[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", result[f"mean_{name}_ms"], ".2f")
        row(f"Median {short} (ms):", result[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            row(f"P{word} {short} (ms):", result[f"p{word}_{name}_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


def plot_sweep(results: list[dict[str, Any]], percentiles: list[float], path: str) -> None:
    """Latency percentiles (median + each --metric-percentiles) vs output token throughput."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    x = [r["output_throughput"] for r in results]
    for ax, name in zip(axes.flat, METRICS):
        short, header = METRIC_HEADERS[name]
        keys = [("median", f"median_{name}_ms")] + [
            (f"p{p:g}", f"p{int(p) if int(p) == p else p}_{name}_ms") for p in percentiles if p != 50
        ]
        for label, key in keys:
            ax.plot(x, [r[key] for r in results], marker="o", label=label)
        for r, xv in zip(results, x):
            ax.annotate(f"c={r['max_concurrency']}", (xv, r[f"median_{name}_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
        ax.set_title(f"{short}: {header}", fontsize=10)
        ax.set_xlabel("output token throughput (tok/s)")
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")  # latencies span orders of magnitude across a sweep
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    model = results[0].get("model_id", "")
    fig.suptitle(f"bench_serving: {model}, concurrency sweep {[r['max_concurrency'] for r in results]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (no /v1)")
    ap.add_argument("--backend", choices=("openai-chat", "openai"), default="openai-chat",
                    help="openai-chat: /v1/chat/completions (images allowed); openai: /v1/completions")  # fmt: skip
    ap.add_argument("--endpoint", default=None, help="API path (default: from --backend)")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("GRACE_SERVE_API_KEY")
    )
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--random-input-len", type=int, default=256, help="text tokens per prompt")
    ap.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths vary by +-this fraction")
    ap.add_argument("--word-prompts", action="store_true",
                    help="input lengths in words, not the server's tokens: the same texts for any server")  # fmt: skip
    ap.add_argument("--image-sizes", default=None, help="WxH[,WxH...]: each image picks one at random")
    ap.add_argument("--images-per-request", type=int, default=0)
    ap.add_argument("--image-fraction", type=float, default=1.0, help="share of requests that carry images")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1 burstier; >1 more uniform")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--sweep-concurrency", default=None, help="run once per max concurrency, e.g. 1,2,4,8")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--min-p", type=float, default=None)
    ap.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request")
    ap.add_argument("--num-warmups", type=int, default=0)
    ap.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    ap.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument(
        "--ready-check-timeout-sec", type=float, default=600.0, help="wait this long for /v1/models"
    )
    ap.add_argument(
        "--json", dest="json_out", default=None, metavar="OUT", help="write the result(s) as JSON"
    )
    ap.add_argument("--save-detailed", action="store_true", help="add per-request ITLs and texts to the JSON")
    ap.add_argument("--ttft-breakdown", action="store_true",
                    help="print (and write to the JSON) where the server's mean TTFT went, from its /metrics")  # fmt: skip
    ap.add_argument("--plot", default=None, metavar="OUT.png", help="latency vs throughput plot of a sweep")
    args = ap.parse_args(argv)

    args.endpoint = args.endpoint or (
        "/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions"
    )
    args.percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    args.goodput_slos = {}
    for pair in args.goodput or []:
        key, _, value = pair.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            ap.error(f"--goodput {pair!r}: expected ttft:MS, tpot:MS or e2el:MS")
        args.goodput_slos[key] = float(value)
    args.sweep = [int(c) for c in args.sweep_concurrency.split(",")] if args.sweep_concurrency else None
    try:
        parse_sizes(args.image_sizes)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.backend == "openai" and args.images_per_request:
        ap.error("images need --backend openai-chat")
    if args.num_prompts < 1:
        ap.error("--num-prompts must be >= 1")
    if args.plot and not args.sweep:
        ap.error("--plot needs --sweep-concurrency")
    return args


async def wait_ready(client: httpx.AsyncClient, timeout: float) -> str:
    """The served model name, once /v1/models answers (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = await client.get("/v1/models")
            if resp.status_code == 200:
                return resp.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{client.base_url} did not answer /v1/models within {timeout:.0f} s")
        await asyncio.sleep(1.0)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    widest = max(args.sweep or [args.max_concurrency or args.num_prompts])
    limits = httpx.Limits(max_connections=widest, max_keepalive_connections=widest)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        model = await wait_ready(client, args.ready_check_timeout_sec)
        model = args.model or model
        results = []
        for i, concurrency in enumerate(args.sweep or [args.max_concurrency]):
            rate = "inf" if math.isinf(args.request_rate) else args.request_rate
            print(f"Traffic request rate: {rate}\nBurstiness factor: {args.burstiness}\n"
                  f"Maximum request concurrency: {concurrency}", flush=True)  # fmt: skip
            result = await run_once(args, concurrency, args.seed + i, client, model)
            print(report(result, args.percentiles), flush=True)
            if result.get("ttft_breakdown"):
                print(breakdown_report(result["ttft_breakdown"]), flush=True)
            errors = [e for e in result["errors"] if e]
            if errors:
                print(f"first error ({len(errors)} failed): {errors[0]}", file=sys.stderr)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    if args.json_out:
        payload: Any = results[0] if not args.sweep else {"sweep": "max_concurrency", "runs": results}
        with open(args.json_out, "w") as f:
            json.dump(payload, f, indent=2)
    if args.plot:
        plot_sweep(results, args.percentiles, args.plot)
    return 0 if all(r["completed"] > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
