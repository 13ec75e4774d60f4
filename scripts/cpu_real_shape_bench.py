"""The real-shape CPU measurement: serve a real-shape checkpoint with default flags, send
concurrent chat requests (half with an image), and report the peak memory of all server
processes, the load time, and batch-1 decode speed against transformers' own generate.

    python scripts/real_shape_checkpoint.py /tmp/real-w8     # once (~7 GB, outside the repo)
    python scripts/cpu_real_shape_bench.py /tmp/real-w8 --json /tmp/real-w8-bench.json

Steps, one after the other (the machine may be shared: the two speeds run back to back):
1. `python -m server --model PATH` with no other flag; load time = start to /health 200.
2. batch 1: greedy chat requests of 1 and of N tokens (ignore_eos); decode tok/s =
   (N - 1) / (t_N - t_1), the prefill cancelling out.
3. `--concurrency` chat requests at once, every other one with a 256x256 PNG; all must end.
4. `--rounds` times: transformers' Qwen3VLForConditionalGeneration.from_pretrained(PATH) in
   bf16 in a child process (the checkpoint's fake-quantized weights: the values we serve),
   the same prompt, greedy generate of 1 and of N new tokens, the same formula, while our
   server idles; then ours again. Medians of each, and each pair's ratio.
Memory: VmRSS and Pss (smaps_rollup) of the server process and all its children, sampled
every 0.2 s; the peak of the sum. RSS counts shared pages (libraries, the mmap'd checkpoint)
once per process, Pss splits them: the true total lies between.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _children(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<p>/stat ppid)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak of the summed VmRSS / Pss of a process tree."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_rss = self.peak_pss = 0
        self.peak_per_process: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = pss = 0
            for p in _children(self.pid):
                r = _kb(f"/proc/{p}/status", "VmRSS")
                rss += r
                pss += _kb(f"/proc/{p}/smaps_rollup", "Pss")
                self.peak_per_process[p] = max(self.peak_per_process.get(p, 0), r)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.stop.wait(self.period)


def _post(url: str, body: dict, timeout: float = 3600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _png(seed: int, size: int = 256) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(base: str, content: object, max_tokens: int) -> tuple[float, dict]:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    out = _post(base + "/v1/chat/completions", body)
    return time.perf_counter() - t0, out


def serve_and_measure(
    path: str, port: int, tokens: int, concurrency: int, rounds: int, hf_rounds: list[dict] | None
) -> dict:
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        path,
        "--port",
        str(port),
        "--served-model-name",
        "bench",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    mem = MemorySampler(proc.pid)
    mem.start()
    result: dict = {"command": " ".join(cmd[1:])}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the server exited during start-up:\n" + "".join(log[-30:]))
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        result["load_s"] = time.perf_counter() - t0
        result["rss_after_load_gb"] = mem.peak_rss / 1e9
        _chat(base, PROMPT, 2)  # warm-up

        def decode_tok_s() -> float:
            t1, _ = _chat(base, PROMPT, 1)
            tn, out = _chat(base, PROMPT, tokens)
            assert out["usage"]["completion_tokens"] == tokens, out["usage"]
            result["prompt_tokens"] = out["usage"]["prompt_tokens"]
            return (tokens - 1) / (tn - t1)

        result["decode_tok_s_runs"] = [decode_tok_s()]

        def one(i: int) -> dict:
            content: object = PROMPT
            if i % 2 == 0:
                content = [
                    {"type": "image_url", "image_url": {"url": _png(i)}},
                    {"type": "text", "text": "What is in this image?"},
                ]
            return _chat(base, content, tokens)[1]

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outs = list(pool.map(one, range(concurrency)))
        result["concurrent_s"] = time.perf_counter() - t
        result["concurrent_ok"] = sum(o["choices"][0]["finish_reason"] == "length" for o in outs)
        result["concurrent_tokens"] = sum(o["usage"]["completion_tokens"] for o in outs)
        result["alive"] = proc.poll() is None
        # Speed, alternating with transformers while our server idles (no CPU), so that both
        # see the same machine: ours, theirs, ours, theirs, ...
        for _ in range(rounds):
            if hf_rounds is not None:
                from server.model.loader import resolve_model_path  # "demo" -> its folder

                hf_rounds.append(transformers_generate(str(resolve_model_path(path)), tokens))
            result["decode_tok_s_runs"].append(decode_tok_s())
        result["decode_tok_s"] = statistics.median(result["decode_tok_s_runs"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        mem.stop.set()
        mem.join()
    result["peak_rss_gb"] = mem.peak_rss / 1e9
    result["peak_pss_gb"] = mem.peak_pss / 1e9
    result["peak_rss_per_process_gb"] = sorted(
        (v / 1e9 for v in mem.peak_per_process.values()), reverse=True
    )[:3]
    result["kv_log"] = [line.strip() for line in log if "KV cache:" in line or "dtype " in line]
    return result


def transformers_generate(path: str, tokens: int) -> dict:
    """Runs in a child process (so its memory is its own): greedy generate of 1 and N tokens."""
    code = f"""
import json, time, torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
torch.manual_seed(0)
t0 = time.perf_counter()
model = Qwen3VLForConditionalGeneration.from_pretrained({path!r}, dtype=torch.bfloat16).eval()
load = time.perf_counter() - t0
tok = AutoTokenizer.from_pretrained({path!r})
text = tok.apply_chat_template([{{"role": "user", "content": {PROMPT!r}}}], tokenize=False, add_generation_prompt=True)
ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
def gen(n):
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert out.shape[1] - ids.shape[1] == n
    return time.perf_counter() - t
gen(2)
t1, tn = gen(1), gen({tokens})
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps(dict(load_s=load, prompt_tokens=ids.shape[1], decode_tok_s=({tokens} - 1) / (tn - t1), peak_rss_gb=rss / 1e9)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the real-shape checkpoint folder")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating ours/transformers speed runs")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    hf_rounds: list[dict] | None = None if a.skip_transformers else []
    ours = serve_and_measure(a.model, a.port, a.tokens, a.concurrency, a.rounds, hf_rounds)
    results = {
        "machine": f"{os.cpu_count()} cores, {_kb('/proc/meminfo', 'MemTotal') / 2**30:.0f} GiB",
        "ours": ours,
    }
    if hf_rounds:
        theirs = dict(hf_rounds[0], decode_tok_s_runs=[r["decode_tok_s"] for r in hf_rounds])
        theirs["decode_tok_s"] = statistics.median(theirs["decode_tok_s_runs"])
        results["transformers"] = theirs
        results["speed_ratio"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
        # each of our runs after the first against the transformers run just before it
        pairs = zip(ours["decode_tok_s_runs"][1:], theirs["decode_tok_s_runs"])
        results["speed_ratio_pairs"] = [o / t for o, t in pairs]
    print(json.dumps(results, indent=1))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
