"""Shared fixtures: demo checkpoints written once per test session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model.demo import write_demo_checkpoint

DEMO_FORMATS = {"w8": ("qat", 8), "w4": ("qat", 4), "awq": ("awq", 4), "bf16": ("bf16", 8)}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    """demo_dir(kind) -> path of the demo checkpoint of that kind (w8, w4, awq, bf16)."""
    made: dict[str, Path] = {}

    def get(kind: str = "w8") -> Path:
        if kind not in made:
            fmt, bits = DEMO_FORMATS[kind]
            made[kind] = write_demo_checkpoint(
                tmp_path_factory.mktemp(f"demo-{kind}"), bits=bits, fmt=fmt, seed=0
            )
        return made[kind]

    return get


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory):
    """No test writes into the user's caches or touches the network."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("GRACE_SERVE_CACHE", str(root / "grace-serve"))
    mp.setenv("HF_HOME", str(root / "hf"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()
