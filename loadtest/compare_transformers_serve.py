"""TTFT and output throughput of `python -m server` vs `transformers serve --continuous-batching`
on the demo checkpoint, with the same client (bench_serving.py), prompts and max_tokens: one
server at a time on 127.0.0.1, concurrency 1 and 8, one 96x128 image per request.

    python loadtest/compare_transformers_serve.py --json compare.json

transformers' Qwen3-VL processor needs torchvision, which a CPU-only torch lacks a wheel of
(PyPI's torchvision is built against CUDA torch). `--extras DIR` (default: a cache folder)
then gets the matching torchvision wheel, without dependencies, installed into DIR with two
patches that keep it to pure Python: its C operators are not registered (nothing the
processor calls uses them) and torchvision.io.decode_image decodes with Pillow; accelerate is
added there if missing. DIR goes on transformers serve's PYTHONPATH only: the venv is left as
it is.

transformers 5 serves a vision-language model sequentially even with --continuous-batching
(its continuous batching is for text-only models): the comparison is what a user gets.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "loadtest" / "bench_serving.py"
DEFAULT_EXTRAS = (
    Path(os.environ.get("GRACE_SERVE_CACHE", Path.home() / ".cache" / "grace-serve")) / "tf-extras"
)
SERVERS = ("grace-serve", "transformers")

# Two patches to torchvision's Python, applied to the copy in --extras: (file, old, new).
_NO_C_OPS = ("__init__.py", "    _autograd_registrations,\n    _meta_registrations,\n", "")
_PIL_DECODE = '''

def _pil_decode_image(input, mode=None, apply_exif_orientation=False):
    """decode_image without torchvision's C image extension: Pillow, RGB, [C, H, W] uint8."""
    import io as _io

    import numpy as _np
    import torch as _torch
    from PIL import Image as _Image, ImageOps as _ImageOps

    data = open(input, "rb").read() if isinstance(input, str) else input.numpy().tobytes()
    img = _Image.open(_io.BytesIO(data))
    if apply_exif_orientation:
        img = _ImageOps.exif_transpose(img)
    return _torch.from_numpy(_np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


decode_image = _pil_decode_image
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8", help="comma-separated max concurrencies")
    ap.add_argument("--num-prompts", type=int, default=16, help="measured requests per concurrency")
    ap.add_argument("--num-warmups", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=64, help="words of text per prompt")
    ap.add_argument("--output-len", type=int, default=32, help="max_tokens")
    ap.add_argument("--image-size", default="96x128", help="WxH of the one image per request ('' for none)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="which to run, in order")
    ap.add_argument("--extras", type=Path, default=DEFAULT_EXTRAS, help="folder for torchvision/accelerate")
    ap.add_argument("--server-args", default="", help="extra flags for python -m server (one string)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to come up")
    ap.add_argument("--bench-timeout", type=float, default=900.0, help="seconds per bench_serving run")
    ap.add_argument("--json", dest="json_out", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_list) - set(SERVERS)
    if unknown or not args.server_list:
        ap.error(f"--servers: choose from {', '.join(SERVERS)}")
    if not args.concurrencies or min(args.concurrencies) < 1:
        ap.error("--concurrency: positive integers")
    return args


# -- the extras transformers needs ------------------------------------------------------------


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, timeout=600
    )


def torchvision_version(torch_version: str) -> str:
    """The torchvision release made with a torch release: 2.N <-> 0.(N+15)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise SystemExit(f"no known torchvision for torch {torch_version}")
    return f"0.{minor + 15}"


def prepare_extras(folder: Path) -> Path | None:
    """Where transformers serve finds torchvision (and accelerate); None: the venv has them."""
    have_tv = importlib.util.find_spec("torchvision") is not None
    have_acc = importlib.util.find_spec("accelerate") is not None
    if have_tv and have_acc:
        return None
    done = folder / ".ready"
    if done.exists():
        return folder
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    wants = [] if have_acc else ["accelerate"]
    if not have_tv:
        with tempfile.TemporaryDirectory() as tmp:
            tv = f"torchvision=={torchvision_version(torch.__version__)}.*"
            _pip("download", tv, "--no-deps", "-d", tmp)
            wants += [str(p) for p in Path(tmp).glob("torchvision-*.whl")]
            _pip("install", "--no-deps", "--target", str(folder), *wants)
        _patch(folder / "torchvision" / _NO_C_OPS[0], _NO_C_OPS[1], _NO_C_OPS[2])
        with open(folder / "torchvision" / "io" / "__init__.py", "a") as f:
            f.write(_PIL_DECODE)
    elif wants:
        _pip("install", "--no-deps", "--target", str(folder), *wants)
    done.touch()
    return folder


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: the torchvision patch no longer applies (another torchvision layout)")
    path.write_text(text.replace(old, new, 1))


# -- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_checkpoint() -> Path:
    sys.path.insert(0, str(REPO))
    from server.model.loader import resolve_model_path

    return resolve_model_path("demo")


def server_command(name: str, port: int, model: Path, args: argparse.Namespace) -> list[str]:
    if name == "grace-serve":
        extra = args.server_args.split()
        return [sys.executable, "-m", "server", "--model", "demo", "--host", "127.0.0.1", "--port", str(port),
                *extra]  # fmt: skip
    cli = str(Path(sys.executable).with_name("transformers"))
    return [cli, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            str(model)]  # fmt: skip


@contextlib.contextmanager
def running(cmd: list[str], port: int, env: dict[str, str], log: Path, timeout: float) -> Iterator[str]:
    """The server of `cmd` on 127.0.0.1:port until the block ends (bounded start-up wait)."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{cmd[0]} exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} not up after {timeout:.0f} s; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def bench(url: str, args: argparse.Namespace, out: Path, breakdown: bool) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, str(BENCH), "--base-url", url, "--word-prompts",
        "--num-prompts", str(args.num_prompts), "--num-warmups", str(args.num_warmups),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--sweep-concurrency", ",".join(map(str, args.concurrencies)), "--metric-percentiles", "50,99",
        "--json", str(out),
    ]  # fmt: skip
    if args.image_size:
        cmd += ["--image-sizes", args.image_size, "--images-per-request", "1"]
    if breakdown:
        cmd.append("--ttft-breakdown")
    subprocess.run(cmd, check=True, timeout=args.bench_timeout)
    return json.loads(out.read_text())["runs"]


# -- report --------------------------------------------------------------------------------


def summary(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, runs in results.items():
        for r in runs:
            rows.append({
                "server": name, "concurrency": r["max_concurrency"], "completed": r["completed"],
                "failed": r["failed"], "p50_ttft_ms": r["p50_ttft_ms"], "mean_ttft_ms": r["mean_ttft_ms"],
                "output_throughput": r["output_throughput"], "mean_tpot_ms": r["mean_tpot_ms"],
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'server':<14} {'conc':>4} {'ok':>4} {'TTFT p50 ms':>12} {'TTFT mean ms':>13} "
             f"{'out tok/s':>10} {'TPOT ms':>9}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['server']:<14} {r['concurrency']:>4} {r['completed']:>4} {r['p50_ttft_ms']:>12.1f} "
            f"{r['mean_ttft_ms']:>13.1f} {r['output_throughput']:>10.1f} {r['mean_tpot_ms']:>9.1f}"
        )
    by = {(r["server"], r["concurrency"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        ours, theirs = by.get(("grace-serve", c)), by.get(("transformers", c))
        if ours and theirs and theirs["output_throughput"] > 0 and theirs["p50_ttft_ms"] > 0:
            lines.append(
                f"c={c}: TTFT p50 ratio (ours/theirs) {ours['p50_ttft_ms'] / theirs['p50_ttft_ms']:.2f}, "
                f"output throughput ratio {ours['output_throughput'] / theirs['output_throughput']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = demo_checkpoint()
    extras = prepare_extras(args.extras) if "transformers" in args.server_list else None
    results: dict[str, list[dict[str, Any]]] = {}
    logs = Path(tempfile.mkdtemp(prefix="compare-serve-"))  # kept: the servers' logs, the bench JSON
    print(f"logs in {logs}", flush=True)
    for name in args.server_list:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        if name == "transformers" and extras is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extras), env.get("PYTHONPATH", "")) if p)
        port = free_port()
        log = logs / f"{name}.log"
        print(f"== {name} on 127.0.0.1:{port}", flush=True)
        with running(server_command(name, port, model, args), port, env, log, args.start_timeout) as url:
            results[name] = bench(url, args, logs / f"{name}.json", breakdown=name == "grace-serve")
    rows = summary(results)
    print(table(rows))
    if args.json_out:
        payload = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "load": os.getloadavg()},
            "settings": {k: v for k, v in vars(args).items() if k not in ("extras",)} | {"model": str(model)},
            "summary": rows,
            "runs": results,
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=2, default=str))
    return 0 if all(r["completed"] > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
