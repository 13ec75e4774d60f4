"""Tuned launch plans kept on disk, so a restart does not time every plan again.

One JSON file per (tuner, card, compute capability, Triton, torch, kernel source): any change
to what a plan's speed or validity depends on starts a new file instead of reusing a stale
choice. Files live in ``$GRACE_SERVE_CACHE/kernels`` (default
``${XDG_CACHE_HOME:-~/.cache}/grace-serve/kernels``, inside the Docker image's cache volume;
``GRACE_KERNELS_CACHE=0`` turns the cache off). A file that cannot be read is ignored, and
writes go through a temporary file and a rename, so concurrent servers never see half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def cache_dir() -> Path | None:
    if os.environ.get("GRACE_KERNELS_CACHE", "1") == "0":
        return None
    root = os.environ.get("GRACE_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grace-serve"
    )  # the same folder as server/model/demo.py's cache
    return Path(root) / "kernels"


def cache_path(name: str, device: torch.device, sources: Iterable[Path]) -> Path | None:
    """Where tuner `name`'s plans for this card and these kernel sources are kept."""
    root = cache_dir()
    if root is None:
        return None
    import triton

    props = torch.cuda.get_device_properties(device)
    digest = hashlib.sha256()
    for src in sources:
        digest.update(Path(src).read_bytes())
    parts = [name, props.name, f"sm{props.major}{props.minor}", f"triton{triton.__version__}",
             f"torch{torch.__version__}", digest.hexdigest()[:12]]  # fmt: skip
    return root / (re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)) + ".json")


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}  # the file is per card: the index does not matter
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a key part of type {type(value).__name__}")


def _decode(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        if "dtype" in value:
            dtype = getattr(torch, value["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a dtype: {value['dtype']}")
            return dtype
        if "device" in value:
            return device
        return tuple(_decode(v, device) for v in value["tuple"])
    return value


def load(path: Path, plan_type: type, device: torch.device) -> dict[Hashable, Any]:
    """The stored plans, keyed as the tuner keys them (on `device`); {} if none or unreadable."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            return {}
        return {_decode(e["key"], device): plan_type(**e["plan"]) for e in data["entries"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save(path: Path, best: dict[Hashable, Any]) -> None:
    """Write all plans (atomically); silently skipped if the folder is not writable."""
    entries = [{"key": _encode(k), "plan": dataclasses.asdict(p)} for k, p in best.items()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "entries": entries}, f)
        os.replace(tmp, path)
    except OSError:
        return
