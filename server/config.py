"""One typed server config, built from CLI flags with environment-variable fallbacks.

Every flag `--some-flag` can also be set as `GRACE_SERVE_SOME_FLAG`; the flag wins when both
are given. List flags (`--api-key`, `--allowed-media-domains`) take a comma-separated value
from the environment. `python -m server --help` prints each flag with its variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from server.engine.args import EngineArgs

ENV_PREFIX = "GRACE_SERVE_"
MiB = 1024 * 1024


@dataclass
class ServerConfig(EngineArgs):
    """The engine's options (EngineArgs, declared once there) plus the server's own."""

    served_model_name: str | None = None
    engine_in_thread: bool = False  # debug: run the engine core in a thread of this process
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    max_queued_requests: int = 256
    max_request_bytes: int = 32 * MiB
    drain_timeout: float = 30.0
    engine_stall_timeout: float | None = None  # None: 30 s on a GPU, 120 s on a CPU
    # images
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    allowed_media_domains: list[str] = field(default_factory=list)
    media_fetch_timeout: float = 10.0
    # logging
    log_format: str = "text"
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        """The name clients use in `model` (and /v1/models lists)."""
        return self.served_model_name or self.model

    def engine_args(self) -> EngineArgs:
        return EngineArgs(**{f.name: getattr(self, f.name) for f in fields(EngineArgs)})


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass(frozen=True)
class _Flag:
    dest: str
    kind: Callable[[str], Any] | None  # None: boolean switch
    help: str
    is_list: bool = False
    choices: Sequence[str] | None = None
    flag: str | None = None  # when the flag's name differs from dest

    @property
    def option(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.option[2:].replace("-", "_").upper()


FLAGS: tuple[_Flag, ...] = (
    _Flag("model", str, "'demo' (the embedded tiny model), a checkpoint folder, or a hub id"),
    _Flag("served_model_name", str, "name clients pass as `model` (default: the --model value)"),
    _Flag("host", str, "address to listen on"),
    _Flag("port", int, "port to listen on"),
    _Flag("api_keys", str, "accepted API key (repeat for several); none = no auth", True, flag="--api-key"),
    _Flag("max_model_len", int, "context length (prompt + output); default: the model's"),
    _Flag("max_num_seqs", int, "most sequences decoded together"),
    _Flag("max_num_batched_tokens", int, "token budget of one engine step"),
    _Flag("num_kv_blocks", int, "KV cache size in blocks (default: from memory)"),
    _Flag("block_size", int, "KV cache block size in tokens"),
    _Flag("max_queued_requests", int, "requests waiting for their first token before new ones get 503"),
    _Flag("gpu_memory_utilization", float, "fraction of GPU memory the engine may use"),
    _Flag("cpu_kv_cache_gb", float, "CPU KV cache size in GiB (default: a share of the RAM free after load)"),
    _Flag("quantization", str, "quantize a bf16 checkpoint at load", choices=("w8g128", "w4g128", "none")),
    _Flag(
        "quantize_lm_head",
        None,
        "compute logits with a W8G128 round-to-nearest copy of the lm_head (half its bytes per decode "
        "step; changes the logits: the checkpoint's head is bf16)",
    ),
    _Flag("dtype", str, "activation dtype", choices=("bfloat16", "float16", "float32")),
    _Flag("device", str, "cuda or cpu (default: cuda when available)"),
    _Flag("enable_prefix_caching", None, "reuse KV blocks of shared prompt prefixes"),
    _Flag("async_scheduling", None, "schedule the next step while the GPU runs this one (default: on CUDA)"),
    _Flag("enforce_eager", None, "run decode steps eagerly instead of replaying CUDA graphs"),
    _Flag(
        "kernel_backend",
        str,
        "kernels: auto (Triton on CUDA, plain torch elsewhere), reference (plain torch) or triton; "
        "a Triton kernel that fails at start switches the server to reference",
        choices=("auto", "reference", "triton"),
    ),
    _Flag("engine_in_thread", None, "debug: run the engine in a thread instead of a process"),
    _Flag("allowed_media_domains", str, "hosts that http(s) image URLs may name (default: none)", True),
    _Flag("media_fetch_timeout", float, "seconds allowed to fetch one http(s) image"),
    _Flag("max_request_bytes", int, "largest request body in bytes (413 above)"),
    _Flag("max_images_per_request", int, "most images in one request"),
    _Flag("max_image_bytes", int, "largest encoded image in bytes"),
    _Flag("max_image_pixels", int, "largest decoded image in pixels (decompression-bomb guard)"),
    _Flag("drain_timeout", float, "seconds SIGTERM waits for in-flight requests before exiting"),
    _Flag(
        "engine_stall_timeout",
        float,
        "seconds without an engine step, while the engine has requests, before /health reports 503 "
        "(default: 30 on a GPU, 120 on a CPU, where a full prefill chunk of the 2B model takes tens of seconds)",
    ),
    _Flag("log_format", str, "log line format", choices=("text", "json")),
    _Flag("log_level", str, "log level", choices=("debug", "info", "warning", "error")),
)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    defaults = ServerConfig()
    ap = argparse.ArgumentParser(
        prog="python -m server",
        description="grace-serve: OpenAI-compatible server for the GRACE Qwen3-VL-2B. "
        f"Every flag can also be set through the environment variable named in brackets ({ENV_PREFIX}*).",
    )
    for f in FLAGS:
        default = getattr(defaults, f.dest)
        raw = env.get(f.env)
        try:
            if raw is not None:
                if f.kind is None:
                    default = _bool(raw)
                elif f.is_list:
                    default = [f.kind(v) for v in _csv(raw)]
                elif raw != "":
                    default = f.kind(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            ap.error(f"{f.env}={raw!r}: {e}")
        shown = f"{len(default)} key(s) set" if f.dest == "api_keys" else repr(default)  # never print secrets
        text = f"{f.help} [env: {f.env}] (default: {shown})"
        metavar = "{" + ",".join(f.choices) + "}" if f.choices else f.option[2:].upper().replace("-", "_")
        if f.kind is None:
            ap.add_argument(
                f.option, dest=f.dest, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif f.is_list:
            # flags given on the command line replace the environment's list
            ap.add_argument(
                f.option,
                dest=f.dest,
                type=f.kind,
                nargs="+",
                action="extend",
                default=None,
                help=text,
                metavar=metavar,
            )
            ap.set_defaults(**{f"_env_{f.dest}": default})
        else:
            ap.add_argument(
                f.option,
                dest=f.dest,
                type=f.kind,
                default=default,
                choices=f.choices,
                help=text,
                metavar=metavar,
            )
    return ap


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    ap = build_parser(env)
    ns = vars(ap.parse_args(argv))
    values: dict[str, Any] = {}
    for f in FLAGS:
        value = ns[f.dest]
        if f.is_list:
            value = value if value is not None else ns[f"_env_{f.dest}"]
            value = [v for item in value for v in _csv(item)]  # "--api-key a,b" works too
        values[f.dest] = value
    config = ServerConfig(**values)
    problems = validate(config)
    if problems:
        ap.error("; ".join(problems))
    return config


def validate(c: ServerConfig) -> list[str]:
    checks = [
        (1 <= c.port <= 65535, "--port must be in 1..65535"),
        (c.max_model_len is None or c.max_model_len >= 2, "--max-model-len must be >= 2"),
        (c.max_num_seqs >= 1, "--max-num-seqs must be >= 1"),
        (c.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be >= 1"),
        (c.max_queued_requests >= 1, "--max-queued-requests must be >= 1"),
        (0.0 < c.gpu_memory_utilization <= 1.0, "--gpu-memory-utilization must be in (0, 1]"),
        (c.cpu_kv_cache_gb is None or c.cpu_kv_cache_gb > 0, "--cpu-kv-cache-gb must be > 0"),
        (c.max_request_bytes >= 1024, "--max-request-bytes must be >= 1024"),
        (c.max_images_per_request >= 0, "--max-images-per-request must be >= 0"),
        (c.max_image_bytes >= 1, "--max-image-bytes must be >= 1"),
        (c.max_image_pixels >= 1, "--max-image-pixels must be >= 1"),
        (c.drain_timeout >= 0, "--drain-timeout must be >= 0"),
        (c.engine_stall_timeout is None or c.engine_stall_timeout > 0, "--engine-stall-timeout must be > 0"),
        (c.media_fetch_timeout > 0, "--media-fetch-timeout must be > 0"),
        (all(k for k in c.api_keys), "--api-key must not be empty"),
    ]
    return [msg for ok, msg in checks if not ok]
