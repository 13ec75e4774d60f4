"""The GPU check: one command, on the GPU machine as it is, results under OUT.

    OUT=/some/dir scripts/gpu_check.sh                  # every stage, under 8 minutes
    scripts/gpu_check.sh --dry-run                      # the stages and their exact commands
    OUT=/some/dir scripts/gpu_check.sh --stages env,serve --timeout serve=200

Stages (STAGE_ORDER, built by `build_stages`): env (nvidia-smi, torch/triton, the server's
packages), weights (a random real-shape W8G128 checkpoint, written in the background while the
GPU stages run), tests (gpu-marked pytest), kernels (`python -m kernels.bench`), engine
(`python -m server.engine.bench --random-2b`: eager/sync vs graphs/sync vs graphs/async at
batch 1/64/256), serve (`python -m server` on those weights: start-up time, the memory
profile, then loadtest/bench_serving.py, text and one 448x448 image, concurrency 1 and 64).
Every stage runs under its own timeout, also when an earlier one failed; each writes a JSON
and a text file under OUT, and OUT/summary.json + summary.md list every stage's status. The
exit status is 1 if any stage failed.

Wheels: the machine has no registry. When `.whl/` (scripts/gpu_wheels.sh fills it) holds
wheels, they are installed into a temporary target first and PYTHONPATH points there, for
every stage. Only the standard library is imported here, so `--dry-run` works anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = Path("/tmp/gpu-check-site")
DEFAULT_CKPT = Path("/tmp/gpu-check-real-w8")
STAGE_ORDER = ("env", "weights", "tests", "kernels", "engine", "serve")
# Timeouts of the foreground stages add up to 470 s (weights overlaps them: 293 s on a 2-core
# CPU, BENCHMARKS.md; serve waits for it), so the whole is under 8 minutes, inside the device
# tool's 10-minute command limit.
TIMEOUTS = {"env": 30, "weights": 300, "tests": 75, "kernels": 95, "engine": 100, "serve": 170}
# serve: prompt shapes x concurrencies of bench_serving.py (name, image args, concurrency, prompts)
SERVE_RUNS: tuple[tuple[str, tuple[str, ...], int, int], ...] = (
    ("text_c1", (), 1, 4),
    ("text_c64", (), 64, 64),
    ("image_c1", ("--image-sizes", "448x448", "--images-per-request", "1"), 1, 4),
    ("image_c64", ("--image-sizes", "448x448", "--images-per-request", "1"), 64, 64),
)
SERVER_PACKAGES = ("torch", "triton", "fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn")
SERVER_PACKAGES += ("httptools", "uvloop", "llguidance", "prometheus_client", "httpx", "transformers")
SERVER_PACKAGES += ("tokenizers", "safetensors", "jinja2", "PIL", "numpy", "huggingface_hub", "tqdm")
# server log lines worth keeping in serve.json: the memory profile, the KV pool, warm-up, graphs
LOG_KEEP = re.compile(r"memory profile|KV|kv|warmed up|graph|ready|capped", re.IGNORECASE)


PYTEST = "-m pytest -m gpu -q tests/ --continue-on-collection-errors -p no:cacheprovider"
ENGINE_BENCH = "-m server.engine.bench --random-2b --batches 1,64,256 --prompt-len 512 --decode-tokens 64"


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    timeout_s: int
    log: str  # the stage's stdout+stderr, under OUT
    outputs: tuple[str, ...] = ()  # what else it writes under OUT
    background: bool = False  # started at once; the stages in waited_by wait for it
    waited_by: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def command(self, out: Path) -> str:
        """What the driver runs, as a shell line (the driver itself enforces the timeout)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = f"timeout {self.timeout_s} " + shlex.join(self.argv)
        return (prefix + " " if prefix else "") + cmd + f" > {shlex.quote(str(out / self.log))} 2>&1"


def build_stages(py: str, out: Path, ckpt: Path, full: bool, timeouts: dict[str, int]) -> list[Stage]:
    t, me = timeouts, "scripts/gpu_check.py"
    write = (py, "scripts/real_shape_checkpoint.py", str(ckpt))
    if checkpoint_ready(ckpt):  # a rerun on a warm machine: the ~7 GB are there already
        write = (py, "-c", f"print('checkpoint ready at {ckpt}')")
    bench = [py, "-m", "kernels.bench", "--json", str(out / "kernels.json")] + ([] if full else ["--quick"])
    return [
        Stage("env", (py, me, "env", "--out", str(out)), t["env"], "env.txt", ("env.json",)),
        Stage(
            "weights",
            write,
            t["weights"],
            "weights.txt",
            background=True,
            waited_by=("serve",),
            # CPU work beside the GPU stages: leave half the 16 cores to their host-side timings
            env={"OMP_NUM_THREADS": "8"},
        ),
        Stage(
            "tests",
            # --continue-on-collection-errors: a module needing a package this machine lacks
            # must not stop the GPU tests from running
            (py, *PYTEST.split(), f"--junitxml={out / 'gpu_tests.xml'}"),
            t["tests"],
            "gpu_tests.txt",
            ("gpu_tests.xml", "gpu_tests.json"),
        ),
        Stage("kernels", tuple(bench), t["kernels"], "kernels.md", ("kernels.json",)),
        Stage(
            "engine",
            (py, *ENGINE_BENCH.split(), "--json", str(out / "engine.json")),
            t["engine"],
            "engine.md",
            ("engine.json",),
        ),
        Stage(
            "serve",
            (py, me, "serve", "--model", str(ckpt), "--out", str(out), "--budget", str(t["serve"] - 10)),
            t["serve"],
            "serve.md",
            ("serve.json", "server.log", *tuple(f"serve_{r[0]}.json" for r in SERVE_RUNS)),
        ),
    ]


def checkpoint_ready(ckpt: Path) -> bool:
    """The writer adds real_shape_random to config.json last: a half-written folder lacks it."""
    try:
        return "real_shape_random" in json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return False


def parse_stages(text: str | None) -> list[str]:
    """`a,b` -> those stages in STAGE_ORDER's order; None -> all. Unknown names: ValueError."""
    if text is None:
        return list(STAGE_ORDER)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown or not names:
        raise ValueError(f"unknown stage(s) {unknown or [text]}: choose from {','.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]


def parse_timeouts(items: Sequence[str]) -> dict[str, int]:
    """`--timeout NAME=SECONDS` overrides on top of TIMEOUTS."""
    out = dict(TIMEOUTS)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGE_ORDER or not value.isdigit() or int(value) <= 0:
            raise ValueError(
                f"bad --timeout {item!r}: expected NAME=SECONDS, NAME in {','.join(STAGE_ORDER)}"
            )
        out[name] = int(value)
    return out


def junit_summary(path: Path) -> dict[str, int]:
    """pytest's JUnit XML -> counts (the JSON twin of gpu_tests.txt)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def wheel_setup(py: str) -> list[str] | None:
    """The pip command installing .whl/*.whl into SITE, or None when there are none."""
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        return None
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    return [*pip, "--upgrade", "--target", str(SITE), *wheels]


# -- the driver ----------------------------------------------------------------------------


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    """The exit status, or 124 (as timeout(1)) after ending its process group at the deadline."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        # TERM first: the serve stage's server drains and takes its engine process with it
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break
        return 124


def _start(stage: Stage, out: Path) -> subprocess.Popen:
    log = open(out / stage.log, "w")  # noqa: SIM115 (the child owns it; closed with the process)
    env = os.environ | stage.env
    # own process group: a timeout kills the stage's children too (the server, its engine)
    return subprocess.Popen(
        stage.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def run_stages(stages: list[Stage], out: Path) -> list[dict]:
    """Each stage in order under its timeout; background ones start first, and a stage they
    name in waited_by waits for them (up to their own deadline) before its clock starts."""
    results: list[dict] = []
    background: dict[str, tuple[Stage, subprocess.Popen, float]] = {}
    for st in (s for s in stages if s.background):
        background[st.name] = (st, _start(st, out), time.monotonic())
        print(f"== {st.name}: started in the background: {st.command(out)}", flush=True)

    def finish(name: str) -> None:
        st, proc, started = background.pop(name)
        rc = _wait(proc, started + st.timeout_s)
        results.append(_result(st, rc, time.monotonic() - started, out))

    for st in (s for s in stages if not s.background):
        for name in [n for n, (bg, _, _) in background.items() if st.name in bg.waited_by]:
            finish(name)
        print(f"== {st.name}: {st.command(out)}", flush=True)
        t0 = time.monotonic()
        rc = _wait(_start(st, out), t0 + st.timeout_s)
        results.append(_result(st, rc, time.monotonic() - t0, out))
        if st.name == "tests":
            try:
                counts: dict = junit_summary(out / "gpu_tests.xml")
            except (OSError, ET.ParseError) as e:  # cut off before pytest wrote it
                counts = {"error": f"{type(e).__name__}: {e}"}
            (out / "gpu_tests.json").write_text(json.dumps(counts, indent=2))
    for name in list(background):  # nobody waited for it: wait here
        finish(name)
    return results


def _result(st: Stage, rc: int, seconds: float, out: Path) -> dict:
    name = st.name
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    tail = (out / st.log).read_text(errors="replace").splitlines()[-3:] if (out / st.log).exists() else []
    print(f"== {name}: {status} (rc={rc}) in {seconds:.0f}s", flush=True)
    return {"stage": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "tail": tail}


def write_summary(out: Path, results: list[dict], setup: dict | None) -> None:
    (out / "summary.json").write_text(json.dumps({"setup": setup, "stages": results}, indent=2))
    lines = ["| stage | status | rc | seconds |", "| --- | --- | --- | --- |"]
    if setup:  # the wheels' install
        lines.append(f"| (wheels) | {'ok' if setup['rc'] == 0 else 'failed'} | {setup['rc']} | |")
    lines += [f"| {r['stage']} | {r['status']} | {r['rc']} | {r['seconds']} |" for r in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- the env and serve stages (subcommands of this script) -----------------------------------


def env_stage(out: Path) -> int:
    import importlib
    import platform

    info: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version}
    info["platform"] = platform.platform()
    info["pythonpath"] = os.environ.get("PYTHONPATH", "")
    query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
    try:
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=10
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    missing, versions = [], {}
    for name in SERVER_PACKAGES:
        try:
            mod = importlib.import_module(name)
            versions[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # any import failure is what this stage reports
            versions[name] = f"MISSING: {type(e).__name__}: {e}"
            missing.append(name)
    info["packages"], info["missing"] = versions, missing
    try:
        import torch

        info["cuda"] = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            info["cuda"]["device"] = torch.cuda.get_device_name(0)
    except Exception as e:
        info["cuda"] = f"torch failed: {e}"
    (out / "env.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    cuda_ok = isinstance(info["cuda"], dict) and info["cuda"]["available"]
    return 0 if cuda_ok and not missing else 1


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:
        return 0


def _gpu_used_mib() -> int | None:
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return int(smi.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def serve_commands(py: str, model: Path, out: Path, port: int) -> tuple[list[str], list[list[str]]]:
    """The server's argv and one bench_serving.py argv per SERVE_RUNS entry."""
    server = [py, "-m", "server", "--model", str(model), "--port", str(port), "--log-level", "info"]
    base = [py, "loadtest/bench_serving.py", "--base-url", f"http://127.0.0.1:{port}", "--ignore-eos"]
    base += ["--random-input-len", "256", "--random-output-len", "64", "--ready-check-timeout-sec", "10"]
    runs = [
        [
            *base,
            *images,
            "--max-concurrency",
            str(conc),
            "--num-prompts",
            str(n),
            "--request-timeout",
            "60",
            "--json",
            str(out / f"serve_{name}.json"),
        ]
        for name, images, conc, n in SERVE_RUNS
    ]
    return server, runs


def serve_stage(model: Path, out: Path, port: int, budget: float) -> int:
    """Start the server, time /health, keep the memory profile, run the HTTP benches, stop it."""
    deadline = time.monotonic() + budget
    py = sys.executable
    server_argv, runs = serve_commands(py, model, out, port)
    result: dict = {"model": str(model), "server": shlex.join(server_argv), "runs": {}}
    if not checkpoint_ready(model) and str(model) != "demo":  # demo: the serve stage on a CPU
        print(f"no checkpoint at {model} (the weights stage writes it)")
        result["error"] = "no checkpoint"
        (out / "serve.json").write_text(json.dumps(result, indent=2))
        return 1
    before = _gpu_used_mib()
    log = open(out / "server.log", "w")  # noqa: SIM115 (closed after the server stops)
    t0 = time.monotonic()
    # same process group as this stage: the driver's timeout ends the server (and its engine) too
    server = subprocess.Popen(server_argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    ok = False
    try:
        while time.monotonic() < deadline - 60 and server.poll() is None:  # keep 60 s for the benches
            if _get(f"http://127.0.0.1:{port}/health") == 200:
                ok = True
                break
            time.sleep(0.5)
        result["startup_s"] = round(time.monotonic() - t0, 1) if ok else None
        result["gpu_mib_before"], result["gpu_mib_serving"] = before, _gpu_used_mib()
        log.flush()
        lines = (out / "server.log").read_text(errors="replace").splitlines()
        result["log"] = [ln for ln in lines if LOG_KEEP.search(ln)][-20:]
        failed = not ok
        for i, ((name, *_), argv) in enumerate(zip(SERVE_RUNS, runs, strict=True)):
            # a fair share of what is left: one slow run must not leave the others no time
            left = (deadline - time.monotonic()) / (len(runs) - i)
            if not ok or left < 5:
                result["runs"][name] = {"status": "skipped"}
                failed = True
                continue
            print(f"-- {name}: {shlex.join(argv)}", flush=True)
            try:
                rc = subprocess.run(argv, cwd=REPO, timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            row = result["runs"][name] = _serve_row(out / f"serve_{name}.json", rc)
            failed |= rc != 0 or bool(row.get("failed")) or "error" in row
    finally:
        server.send_signal(signal.SIGTERM)  # drain, as in production
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    print(serve_table(result))
    return 1 if failed else 0


SERVE_KEYS = ("completed", "failed", "request_throughput", "output_throughput")
SERVE_KEYS += ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def _serve_row(path: Path, rc: int) -> dict:
    row: dict = {"rc": rc}
    try:
        data = json.loads(path.read_text())
        data = data[0] if isinstance(data, list) else data.get("results", [data])[0]
        row |= {k: data.get(k) for k in SERVE_KEYS}
    except (OSError, ValueError, IndexError, KeyError, AttributeError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def serve_table(result: dict) -> str:
    lines = [f"start-up (to /health 200): {result.get('startup_s')} s", *result.get("log", [])]
    lines.append(f"GPU memory used: {result.get('gpu_mib_before')} -> {result.get('gpu_mib_serving')} MiB")
    lines += ["", "| run | rc | " + " | ".join(SERVE_KEYS) + " |", "| --- " * (len(SERVE_KEYS) + 2) + "|"]
    for name, row in result["runs"].items():
        cells = [row.get(k) for k in SERVE_KEYS]
        shown = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"| {name} | {row.get('rc', row.get('status'))} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


# -- the command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["env"]:
        ap = argparse.ArgumentParser(prog="gpu_check.py env")
        ap.add_argument("--out", type=Path, required=True)
        return env_stage(ap.parse_args(argv[1:]).out)
    if argv[:1] == ["serve"]:
        ap = argparse.ArgumentParser(prog="gpu_check.py serve")
        ap.add_argument("--model", type=Path, required=True)
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--port", type=int, default=8177)
        ap.add_argument("--budget", type=float, default=140.0)
        a = ap.parse_args(argv[1:])
        return serve_stage(a.model, a.out, a.port, a.budget)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    ap.add_argument(
        "--stages", default=None, help=f"comma separated, of {','.join(STAGE_ORDER)} (default: all)"
    )
    ap.add_argument(
        "--timeout", action="append", default=[], metavar="NAME=SECONDS", help="a stage's timeout"
    )
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT, help="where the weights stage writes")
    ap.add_argument(
        "--full", action="store_true", help="the full kernel bench (not --quick): raise its timeout"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the stages and commands, run nothing")
    a = ap.parse_args(argv)
    try:
        names, timeouts = parse_stages(a.stages), parse_timeouts(a.timeout)
    except ValueError as e:
        ap.error(str(e))
    if a.out is None:
        if not a.dry_run:
            ap.error("set OUT or --out to the results folder")
        a.out = Path("$OUT")
    elif not a.dry_run:
        a.out = a.out.resolve()  # the stages run in the repository root
    py = sys.executable
    stages = [s for s in build_stages(py, a.out, a.checkpoint, a.full, timeouts) if s.name in names]
    if "serve" in names and "weights" not in names and not checkpoint_ready(a.checkpoint):
        # serve needs the checkpoint: write it first when asked for serve alone
        weights = next(
            s for s in build_stages(py, a.out, a.checkpoint, a.full, timeouts) if s.name == "weights"
        )
        stages.insert(0, weights)
    setup = wheel_setup(py)

    if a.dry_run:
        print(f"python: {py}\nout: {a.out}")
        if setup:
            print(f"setup: {shlex.join(setup)}")
        print(f"PYTHONPATH={REPO}{os.pathsep + str(SITE) if setup else ''}")
        for st in stages:
            waits = [b.name for b in stages if st.name in b.waited_by]
            note = " (background)" if st.background else (f" (after {','.join(waits)})" if waits else "")
            print(f"{st.name}{note}: {st.command(a.out)}")
            if st.name == "serve":
                server, runs = serve_commands(py, a.checkpoint, a.out, 8177)
                print(f"  server: {shlex.join(server)}")
                print("\n".join(f"  bench: {shlex.join(r)}" for r in runs))
        fg = sum(s.timeout_s for s in stages if not s.background)
        print(f"foreground timeouts: {fg} s")
        return 0

    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only
    os.environ["PYTHONUNBUFFERED"] = "1"
    setup_result = None
    paths = [str(REPO)]  # scripts/*.py import server.* without an installed package
    if setup:
        rc = subprocess.run(setup, cwd=REPO).returncode
        setup_result = {"command": shlex.join(setup), "rc": rc}
        paths.append(str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.monotonic()
    results = run_stages(stages, a.out)
    write_summary(a.out, results, setup_result)
    print(f"total {time.monotonic() - t0:.0f} s")
    failed = (setup_result or {}).get("rc", 0) != 0 or any(r["status"] != "ok" for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
