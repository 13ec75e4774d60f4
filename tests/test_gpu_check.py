"""scripts/gpu_check.py (the GPU check) without a GPU: the dry run, the stage selector, the
timeouts, and the driver on stand-in stages, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
assert spec and spec.loader
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
spec.loader.exec_module(gc)


def dry_run(*args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    argv = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", *args]
    if out is not None:
        argv += ["--out", str(out)]
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def stage_lines(stdout: str) -> list[str]:
    return [ln.split(":")[0].split(" ")[0] for ln in stdout.splitlines() if " timeout " in ln]


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = dry_run(out=out)
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stdout) == list(gc.STAGE_ORDER)
    assert not out.exists()  # nothing ran, nothing was written
    text = r.stdout
    assert "-m pytest -m gpu" in text and f"--junitxml={out}/gpu_tests.xml" in text
    assert f"-m kernels.bench --json {out}/kernels.json --quick" in text
    assert "-m server.engine.bench --random-2b --batches 1,64,256" in text
    assert "scripts/real_shape_checkpoint.py" in text and "-m server --model" in text
    benches = [ln for ln in text.splitlines() if "loadtest/bench_serving.py" in ln]
    assert len(benches) == 4
    assert sum("--image-sizes 448x448" in b for b in benches) == 2
    assert sorted(re.search(r"--max-concurrency (\d+)", b)[1] for b in benches) == ["1", "1", "64", "64"]
    fg = int(re.search(r"foreground timeouts: (\d+) s", text)[1])
    assert fg == sum(t for n, t in gc.TIMEOUTS.items() if n != "weights") and fg < 8 * 60


def test_stage_order_is_the_built_list() -> None:
    stages = gc.build_stages("py", Path("/o"), Path("/nonexistent"), False, gc.TIMEOUTS)
    assert tuple(s.name for s in stages) == gc.STAGE_ORDER
    assert all(s.timeout_s == gc.TIMEOUTS[s.name] for s in stages)


def test_stage_selector_keeps_the_stage_order(tmp_path: Path) -> None:
    r = dry_run("--stages", "kernels,env", out=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stdout) == ["env", "kernels"]


def test_serve_alone_brings_the_weights_it_needs(tmp_path: Path) -> None:
    r = dry_run("--stages", "serve", "--checkpoint", str(tmp_path / "none"), out=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stdout) == ["weights", "serve"]
    assert "serve (after weights)" in r.stdout


@pytest.mark.parametrize("stages", ["bogus", "env,bogus", ","])
def test_unknown_stage_is_an_error(stages: str, tmp_path: Path) -> None:
    r = dry_run("--stages", stages, out=tmp_path)
    assert r.returncode == 2
    assert "unknown stage" in r.stderr and "env,weights,tests" in r.stderr


def test_timeouts_override_and_reject_bad_values() -> None:
    assert gc.parse_timeouts(["serve=200"])["serve"] == 200
    assert gc.parse_timeouts([])["tests"] == gc.TIMEOUTS["tests"]
    for bad in ("serve", "serve=0", "serve=1.5", "nope=10"):
        with pytest.raises(ValueError, match="bad --timeout"):
            gc.parse_timeouts([bad])


def test_a_real_run_needs_out() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--stages", "env"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and "set OUT" in r.stderr


def test_wheels_are_installed_first_when_there_are_some(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gc, "WHEELS", tmp_path)
    assert gc.wheel_setup("py") is None
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
    cmd = gc.wheel_setup("py")
    assert cmd[:3] == ["py", "-m", "pip"] and "--no-index" in cmd and "--no-deps" in cmd
    assert cmd[cmd.index("--target") + 1] == str(gc.SITE) and cmd[-1].endswith("x-1.0-py3-none-any.whl")


def test_junit_summary_counts(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
        '<testsuite tests="1" failures="0" errors="1" skipped="0"/></testsuites>'
    )
    assert gc.junit_summary(xml) == {"tests": 6, "failures": 1, "errors": 1, "skipped": 2}


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_every_stage_runs_and_a_failure_fails_the_run(tmp_path: Path, monkeypatch) -> None:
    flag = tmp_path / "bg-done"
    touch = _py(f"import time, pathlib; time.sleep(1); pathlib.Path({str(flag)!r}).touch()")
    stages = [
        gc.Stage("bg", touch, 20, "bg.txt", background=True, waited_by=("waiter",)),
        gc.Stage("fails", _py("raise SystemExit(3)"), 20, "fails.txt"),
        gc.Stage("hangs", _py("import time; time.sleep(60)"), 1, "hangs.txt"),
        gc.Stage("waiter", _py(f"import pathlib; assert pathlib.Path({str(flag)!r}).exists()"), 20, "w.txt"),
        gc.Stage("ok", _py("print('fine')"), 20, "ok.txt"),
    ]
    monkeypatch.setattr(gc, "build_stages", lambda *a: stages)
    monkeypatch.setattr(gc, "STAGE_ORDER", tuple(s.name for s in stages))
    monkeypatch.setattr(gc, "WHEELS", tmp_path / "no-wheels")
    t0 = time.monotonic()
    assert gc.main(["--out", str(tmp_path / "out")]) == 1
    assert time.monotonic() - t0 < 30  # the hanging stage was cut at its 1 s
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert status == {"fails": "failed", "hangs": "timeout", "bg": "ok", "waiter": "ok", "ok": "ok"}
    assert (tmp_path / "out" / "ok.txt").read_text().strip() == "fine"
    assert "| hangs | timeout |" in (tmp_path / "out" / "summary.md").read_text()


def test_tests_stage_cut_off_still_writes_its_json(tmp_path: Path) -> None:
    stage = gc.Stage("tests", _py("pass"), 20, "gpu_tests.txt")  # writes no JUnit XML
    (result,) = gc.run_stages([stage], tmp_path)
    assert result["status"] == "ok"
    assert "error" in json.loads((tmp_path / "gpu_tests.json").read_text())


def test_wheel_pins_match_the_tested_versions() -> None:
    """The GPU machine should serve with the versions CI tests; one version of each."""
    text = (REPO / "scripts" / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s)]*)", text.split("WHEELS=(")[1].split(")")[0]))
    for needed in ("fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "httptools", "llguidance"):
        assert needed in pins
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed == version, f"{name}: CI has {installed}, scripts/gpu_wheels.sh pins {version}"
