"""Schema-driven fuzzing of the HTTP API: schemathesis against the server's own /openapi.json,
bounded in time, traffic to 127.0.0.1 only.

    python loadtest/fuzz_api.py                        # starts a demo server itself; 180 s
    python loadtest/fuzz_api.py --max-time 600 --seed 7
    python loadtest/fuzz_api.py --base-url http://127.0.0.1:8000   # a server already running

It passes (exit 0) when schemathesis finds no failure and no error, and the server (when this
script started it) logged no traceback and answered no request with a 5xx. The checks are
all of schemathesis' but one:

- not_a_server_error: no 5xx, ever;
- status_code_conformance, content_type_conformance, response_headers_conformance,
  response_schema_conformance: each answer's status, media type, headers and body are the
  documented ones (the OpenAI ErrorResponse for every error);
- negative_data_rejection: schema-invalid requests are refused (400, never a 200);
- unsupported_method, allow_header_conformance (405 with Allow), missing_required_header,
  use_after_free, ensure_resource_availability, ignored_auth, object_level_authorization.

Left out: positive_data_acceptance ("a schema-valid request must not get a 4xx"). Some rules
are semantic and not in the schema, and refusing those with a 400 is right: token ids within
the model's vocabulary, a non-empty `prompt` / `messages`, exactly one of `prompt` and
`messages` for /tokenize, a prompt that fits the context, `model` naming the served model.

The demo server runs with a short context (--max-model-len 96) so that a generated request
without max_tokens stays a few seconds of CPU decoding; per-request timeout and response-time
limit 60 s (schemathesis' default limit, 10 s, is one such request on a busy 2-core box). The
summary at the end counts the server's answers by route and status (its access log).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CHECKS_EXCLUDED = "positive_data_acceptance"
SERVER_FLAGS = ["--max-model-len", "96", "--max-num-seqs", "8"]
_ACCESS = re.compile(r"grace_serve\.access: \S+ (\S+) (\S+) (\d{3}) ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--model", "demo", "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([*cmd, *SERVER_FLAGS], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def summarize(log_text: str) -> tuple[collections.Counter[tuple[str, str, int]], list[str]]:
    """(route, status) counts from the access log, and the problems: 5xx, tracebacks."""
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    problems = []
    for line in log_text.splitlines():
        m = _ACCESS.search(line)
        if m:
            method, path, status = m.group(1), m.group(2), int(m.group(3))
            path = "/v1/models/{id}" if path.startswith("/v1/models/") else path
            counts[(method, path, status)] += 1
            if status >= 500:
                problems.append(line)
        elif "Traceback" in line or " ERROR " in line:
            problems.append(line)
    return counts, problems


def classify_report(report_dir: Path) -> tuple[list[str], list[str]]:
    """(findings, fuzzer-internal errors) from schemathesis' JUnit report. A finding is a
    failed check or a network error (refused, reset, timed out: the server's fault). Internal:
    hypothesis' "Inconsistent results" raised while schemathesis generates data (seen with
    some seeds in its coverage phase), which says nothing about the server."""
    import xml.etree.ElementTree as ET

    findings, internal = [], []
    for path in sorted(report_dir.glob("junit*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            name = case.get("name", "?")
            for failure in case.iter("failure"):
                findings.append(f"{name}: {(failure.get('message') or failure.text or '').strip()[:2000]}")
            for error in case.iter("error"):
                text = (error.get("message") or "") + "\n" + (error.text or "")
                flaky = "Runtime Error" in text and ("Inconsistent results" in text or "Flaky" in text)
                (internal if flaky else findings).append(f"{name}: {text.strip()[:2000]}")
    return findings, internal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="fuzz this server instead of starting a demo one (127.0.0.1 only)")
    ap.add_argument("--max-time", type=int, default=180, help="schemathesis' time budget, seconds")
    ap.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--phases", default="examples,coverage,fuzzing")
    ap.add_argument("--keep", type=Path, help="write the schemathesis report and server log here")
    args = ap.parse_args(argv)
    if args.base_url and not re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/?$", args.base_url):
        ap.error("--base-url must be a local server (http://127.0.0.1:PORT)")

    work = Path(args.keep or tempfile.mkdtemp(prefix="grace-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "server.log"
    proc = None
    if args.base_url:
        url = args.base_url.rstrip("/")
    else:
        proc, url = start_server(log_path)
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", CHECKS_EXCLUDED,
        "--phases", args.phases, "--max-time", str(args.max_time), "--max-examples", str(args.max_examples),
        "--seed", str(args.seed), "--workers", str(args.workers), "--request-timeout", "60",
        "--max-response-time", "60",  # CPU decoding of a whole short context on a busy machine
        "--continue-on-failure", "--report", "junit", "--report-dir", str(work / "report"),
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        # cwd: schemathesis and hypothesis write their caches there
        fuzz = subprocess.run(cmd, cwd=work, timeout=args.max_time + 300, check=False)
        rc = fuzz.returncode
    except subprocess.TimeoutExpired:
        print("schemathesis overran its time budget by more than 5 minutes", file=sys.stderr)
        rc = 124
    finally:
        exit_code = stop_server(proc) if proc is not None else None
    print(f"\nfuzzed for {time.monotonic() - t0:.0f} s; schemathesis exit status {rc}")
    problems: list[str] = []
    if rc == 1:  # failures or errors: which ones?
        findings, internal = classify_report(work / "report")
        for line in internal:
            print("fuzzer-internal error (not a server finding):", line.splitlines()[0])
        if findings or not internal:
            problems.append(f"schemathesis found {len(findings)} problem(s); see its output above")
    elif rc != 0:
        problems.append(f"schemathesis exited with {rc}")
    if proc is not None:
        counts, log_problems = summarize(log_path.read_text(errors="replace"))
        problems += log_problems
        print("server answers (method, route, status: count):")
        for (method, path, status), n in sorted(counts.items()):
            print(f"  {method:7} {path:22} {status}: {n}")
        if exit_code != 0:
            problems.append(f"the server exited with {exit_code} (after SIGTERM, 0 expected)")
        print(f"server log: {log_path}")
    for line in problems[:20]:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
