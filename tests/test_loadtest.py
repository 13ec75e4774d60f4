"""loadtest/ against the demo server on 127.0.0.1: locust headless (no failures, its request
count equals the server's counter) and bench_serving (every `vllm bench serve` field, sane
values, token counts equal to the server's usage). Plus unit checks of bench_serving's math.

Every run is bounded: locust by -t and --stop-timeout, the subprocesses by a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from api_server import ServerProcess, scrape, wait_until

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
# What `vllm bench serve` writes with --save-result (percentile keys for --metric-percentiles 50,99)
VLLM_FIELDS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "input_lens", "output_lens", "ttfts", "errors",
] + [
    f"{stat}_{metric}_ms"
    for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p50", "p99")
]  # fmt: skip


def load_bench(name: str = "bench_serving") -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "loadtest" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess(tmp_path_factory.mktemp("loadtest"))
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        srv.stop()


def chat_counts(url: str) -> dict[str, float]:
    """{status: count} of POST /v1/chat/completions on the server's HTTP counter."""
    prefix = 'grace_serve_http_requests_total{method="POST",path="' + CHAT + '",status="'
    return {k[len(prefix) : -2]: v for k, v in scrape(url).items() if k.startswith(prefix)}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# -- locust -------------------------------------------------------------------------------


def test_locust_headless_matches_server_counter(server: ServerProcess, tmp_path: Path) -> None:
    before = chat_counts(server.url)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"),
        "--headless", "-u", "8", "-r", "8", "-t", "20s",
        "--stop-timeout", "60",  # let in-flight requests finish: every sent request is counted
        "--host", server.url, "--json-file", str(tmp_path / "stats"),
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "GRACE_LOCUST_MAX_TOKENS": "12"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())

    assert sum(e["num_failures"] for e in stats) == 0, stats
    posts = [e for e in stats if e["method"] == "POST"]
    sent = sum(e["num_requests"] for e in posts)
    assert sent >= 8
    names = [e["name"] for e in posts]
    assert any("image" in n for n in names) and any("text" in n for n in names), names
    assert any(n.endswith("stream") for n in names) and any(not n.endswith("stream") for n in names), names

    # TTFT is a custom entry per streamed kind, shorter than that kind's full request
    ttft = {e["name"]: e for e in stats if e["method"] == "TTFT"}
    assert ttft, "no TTFT entries"
    full = {e["name"]: e for e in posts}
    for name, e in ttft.items():
        assert name.endswith("stream") and e["num_requests"] <= full[name]["num_requests"]
        assert e["min_response_time"] > 0 and e["max_response_time"] <= full[name]["max_response_time"]

    # the server counted exactly locust's requests, all 200 (bounded wait for the last ones)
    assert wait_until(lambda: sum(delta(chat_counts(server.url), before).values()) >= sent, timeout=10)
    assert delta(chat_counts(server.url), before) == {"200": sent}


# -- bench_serving ------------------------------------------------------------------------


def test_bench_serving_json_matches_server(server: ServerProcess, tmp_path: Path) -> None:
    before = scrape(server.url)
    out = tmp_path / "bench.json"
    n, out_len = 20, 8
    cmd = [
        sys.executable, str(REPO / "loadtest" / "bench_serving.py"), "--base-url", server.url,
        "--num-prompts", str(n), "--random-input-len", "24", "--random-output-len", str(out_len),
        "--image-sizes", "64x64,256x192", "--images-per-request", "1", "--image-fraction", "0.5",
        "--max-concurrency", "4", "--ignore-eos", "--metric-percentiles", "50,99",
        "--goodput", "ttft:600000", "tpot:600000", "e2el:600000", "--json", str(out), "--ttft-breakdown",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())

    missing = [k for k in VLLM_FIELDS if k not in r]
    assert not missing, missing
    for line in ("Successful requests:", "Failed requests:", "Request goodput (req/s):", "Mean TTFT (ms):",
                 "Median TPOT (ms):", "P99 ITL (ms):", "P99 E2EL (ms):", "Total Token throughput (tok/s):"):  # fmt: skip
        assert line in res.stdout

    assert (r["completed"], r["failed"]) == (n, 0), r["errors"]
    assert 0 < r["num_image_requests"] < n  # a mix of image and text-only requests
    assert r["output_lens"] == [out_len] * n  # --ignore-eos: exactly the requested length
    assert r["total_output_tokens"] == n * out_len
    assert all(ln > 24 for ln in r["input_lens"])  # 24 text tokens + the chat template (+ image)
    for ttft, e2el in zip(r["ttfts"], r["e2els"]):
        assert 0 < ttft <= e2el
    d = r["duration"]
    assert r["request_throughput"] == pytest.approx(n / d)
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / d)
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / d
    )
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs: all good
    assert r["max_concurrent_requests"] >= 1 and r["max_output_tokens_per_s"] > 0
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{m}_ms"] <= r[f"p99_{m}_ms"], m
        assert r[f"p50_{m}_ms"] == pytest.approx(r[f"median_{m}_ms"])
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]

    # --ttft-breakdown: the server's parts of these n requests add up to its TTFT, inside the client's
    bd = r["ttft_breakdown"]
    assert "Server TTFT breakdown" in res.stdout
    assert bd["requests"] == n
    assert bd["sum_of_parts_ms"] == pytest.approx(bd["mean_ttft_ms"], rel=0.05, abs=3)
    assert 0 < bd["mean_ttft_ms"] <= r["mean_ttft_ms"]
    assert all(v >= 0 for v in bd["mean_ms"].values()), bd
    assert 0 < bd["mean_ms"]["vision_encode"] <= bd["mean_ms"]["prefill_time"]  # half had an image

    # token counts are the server's: its counters moved by exactly the benchmark's totals
    after = scrape(server.url)

    def moved(name: str) -> float:
        key = f"grace_serve_{name}_total"
        return after[key] - before.get(key, 0)

    assert moved("prompt_tokens") == r["total_input_tokens"]
    assert moved("generation_tokens") == r["total_output_tokens"]
    assert delta(chat_counts(server.url), chat_counts_of(before)) == {"200": n}


def chat_counts_of(metrics: dict[str, float]) -> dict[str, float]:
    prefix = 'grace_serve_http_requests_total{method="POST",path="' + CHAT + '",status="'
    return {k[len(prefix) : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_bench_serving_sweep_plot(server: ServerProcess, tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(REPO / "loadtest" / "bench_serving.py"), "--base-url", server.url,
        "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4", "--ignore-eos",
        "--sweep-concurrency", "1,4", "--json", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 4]
    assert all(r["completed"] == 4 for r in runs)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bench_serving math, no server ----------------------------------------------------------


def test_bench_metrics_math() -> None:
    b = load_bench()
    ok = b.RequestOutput(success=True, prompt_len=10, output_tokens=5, ttft=0.1, itl=[0.1] * 4,
                         latency=0.5, start_time=100.0)  # fmt: skip
    slow = b.RequestOutput(success=True, prompt_len=20, output_tokens=3, ttft=1.0, itl=[0.5, 0.5],
                           latency=2.0, start_time=100.5)  # fmt: skip
    failed = b.RequestOutput(success=False, error="HTTP 503")
    r = b.calculate_metrics([ok, slow, failed], 4.0, [50.0, 99.0], {"ttft": 500.0})
    assert (r["completed"], r["failed"]) == (2, 1)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 8)
    assert r["request_throughput"] == 0.5 and r["output_throughput"] == 2.0
    assert r["total_token_throughput"] == 38 / 4
    assert r["request_goodput"] == 0.25  # only `ok` meets TTFT <= 500 ms
    assert r["mean_tpot_ms"] == pytest.approx((100 + 500) / 2)  # (0.5-0.1)/4, (2.0-1.0)/2
    assert r["median_ttft_ms"] == pytest.approx(550)
    assert r["mean_itl_ms"] == pytest.approx((0.4 + 1.0) / 6 * 1000)
    assert r["max_concurrent_requests"] == 2
    assert r["max_output_tokens_per_s"] == 5  # `ok`'s 5 tokens all fall in the first second
    assert r["errors"] == ["", "", "HTTP 503"]
    assert b.calculate_metrics([ok], 1.0, [99.0], {})["request_goodput"] is None


def test_bench_ttft_breakdown_math() -> None:
    b = load_bench()
    before = {k: (1.0, 0.5) for k in b.BREAKDOWN_HISTOGRAMS}
    after = {k: (3.0, 0.5 + 0.01 * (i + 1)) for i, k in enumerate(b.BREAKDOWN_HISTOGRAMS)}
    bd = b.ttft_breakdown(before, after)
    assert bd["requests"] == 2
    assert bd["mean_ttft_ms"] == pytest.approx(5.0)  # ttft is the first entry: 0.01 s over 2
    assert bd["mean_ms"]["detokenize"] == pytest.approx(
        0.01 * (list(b.BREAKDOWN_HISTOGRAMS).index("detokenize") + 1) / 2 * 1000
    )
    assert bd["share"]["queue_time"] == pytest.approx(bd["mean_ms"]["queue_time"] / 5.0)
    assert bd["sum_of_parts_ms"] == pytest.approx(sum(bd["mean_ms"][p] for p in b.TTFT_PARTS))
    assert b.ttft_breakdown(before, before) is None  # no request in between
    assert b.parse_args(["--ttft-breakdown"]).ttft_breakdown


def test_bench_arrivals_and_args() -> None:
    import numpy as np

    b = load_bench()
    times = b.arrival_delays(50, 10.0, 1.0, np.random.default_rng(0))
    assert times == sorted(times) and times[-1] == pytest.approx(5.0)  # n / rate
    assert b.arrival_delays(3, float("inf"), 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    lens = b.sample_lens(100, 100, 0.5, np.random.default_rng(0))
    assert min(lens) >= 50 and max(lens) <= 150
    assert b.parse_sizes("64x48, 448x448") == [(64, 48), (448, 448)]
    with pytest.raises(SystemExit):
        b.parse_args(["--image-sizes", "64by48"])
    with pytest.raises(SystemExit):
        b.parse_args(["--goodput", "latency:10"])
    with pytest.raises(SystemExit):
        b.parse_args(["--plot", "x.png"])  # a plot needs a sweep


def test_compare_transformers_serve_args_and_table() -> None:
    """The manual comparison's arguments and report (it starts servers, so it is not run here)."""
    c = load_bench("compare_transformers_serve")
    args = c.parse_args(["--concurrency", "1,8", "--servers", "grace-serve"])
    assert args.concurrencies == [1, 8] and args.server_list == ["grace-serve"]
    for bad in (["--servers", "vllm"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            c.parse_args(bad)
    assert c.torchvision_version("2.13.0+cpu") == "0.28"
    cmd = c.server_command("transformers", 9000, Path("/m"), args)
    assert cmd[1:3] == ["serve", "--continuous-batching"] and "127.0.0.1" in cmd and cmd[-1] == "/m"
    run = {"max_concurrency": 8, "completed": 4, "failed": 0, "p50_ttft_ms": 20.0, "mean_ttft_ms": 21.0,
           "output_throughput": 300.0, "mean_tpot_ms": 3.0}  # fmt: skip
    rows = c.summary(
        {"grace-serve": [run], "transformers": [run | {"p50_ttft_ms": 10.0, "output_throughput": 100.0}]}
    )
    assert "c=8: TTFT p50 ratio (ours/theirs) 2.00, output throughput ratio 3.00" in c.table(rows)
