"""Tuned qmatmul plans kept on disk (kernels/tuning_cache.py): round trip with the real key
shape, a tuner that saves what it times and a new process that reuses it, file names that
change with the card and the kernel source, and unreadable or unwritable files ignored.
Timing needs a GPU, so the tuner's timer is replaced by a fake here."""

from __future__ import annotations

import json
import types

import pytest
import torch

from kernels import triton_utils, tuning_cache
from kernels.qmatmul_triton import Plan
from kernels.triton_utils import PlanTuner

CUDA0 = torch.device("cuda", 0)
KEY = (8, 4096, 2048, 128, 16, torch.bfloat16, False, CUDA0)  # what qmatmul keys a plan by


def test_round_trip_keeps_keys_and_plans(tmp_path) -> None:
    best = {
        KEY: Plan("gemv", 1, 64, 256, 4, 4, 3),
        (*KEY[:4], 512, torch.float16, True, CUDA0): Plan("gemm", 64),
    }
    path = tmp_path / "q.json"
    tuning_cache.save(path, best)
    assert tuning_cache.load(path, Plan, CUDA0) == best
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was renamed into place"


def test_unreadable_files_are_ignored(tmp_path) -> None:
    path = tmp_path / "q.json"
    for text in ("not json", json.dumps({"format": 99, "entries": []}), json.dumps({"format": 1})):
        path.write_text(text)
        assert tuning_cache.load(path, Plan, CUDA0) == {}
    path.write_text(json.dumps({"format": 1, "entries": [{"key": {"dtype": "nonsense"}, "plan": {}}]}))
    assert tuning_cache.load(path, Plan, CUDA0) == {}
    assert tuning_cache.load(tmp_path / "missing.json", Plan, CUDA0) == {}
    tuning_cache.save(
        tmp_path / "q.json" / "below-a-file.json", {KEY: Plan("gemv")}
    )  # not writable: no error


def test_a_tuner_saves_its_choices_and_the_next_process_reuses_them(tmp_path, monkeypatch) -> None:
    timed: list[Plan] = []
    speeds = {"gemv": 3.0, "gemm": 1.0, "dequant": 2.0}

    def fake_time(fn) -> float:
        plan = fn()
        timed.append(plan)
        return speeds[plan.kind]

    monkeypatch.setattr(triton_utils, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(triton_utils, "_time_ms", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    path = tmp_path / "q.json"
    cands = [Plan("gemv"), Plan("gemm"), Plan("dequant")]
    first = PlanTuner("qmatmul")
    first.persist(path, Plan, CUDA0)
    assert first.choose(KEY, cands, lambda p: p, CUDA0) == Plan("gemm") and len(timed) == 3
    second = PlanTuner("qmatmul")  # a restart
    second.persist(path, Plan, CUDA0)
    assert second.choose(KEY, cands, lambda p: p, CUDA0) == Plan("gemm") and len(timed) == 3  # nothing timed
    # in-memory choices win over the file; no path keeps everything in memory
    third = PlanTuner("qmatmul")
    third.best[KEY] = Plan("dequant")
    third.persist(path, Plan, CUDA0)
    assert third.best[KEY] == Plan("dequant")
    memory_only = PlanTuner("qmatmul")
    memory_only.persist(None, Plan, CUDA0)
    assert memory_only.persisted and memory_only.choose(KEY, cands, lambda p: p, CUDA0) == Plan("gemm")


def test_file_name_follows_card_versions_and_kernel_source(tmp_path, monkeypatch) -> None:
    cards = {0: ("NVIDIA H100 80GB HBM3", 9, 0), 1: ("NVIDIA H200", 9, 0)}

    def props(device):
        name, major, minor = cards[torch.device(device).index or 0]
        return types.SimpleNamespace(name=name, major=major, minor=minor)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    src = tmp_path / "kernel.py"
    src.write_text("v1")
    a = tuning_cache.cache_path("qmatmul", CUDA0, [src])
    assert a is not None and a.parent.name == "kernels" and " " not in a.name and "sm90" in a.name
    assert tuning_cache.cache_path("qmatmul", torch.device("cuda", 1), [src]) != a
    src.write_text("v2")
    assert tuning_cache.cache_path("qmatmul", CUDA0, [src]) != a
    monkeypatch.setenv("GRACE_KERNELS_CACHE", "0")
    assert tuning_cache.cache_path("qmatmul", CUDA0, [src]) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qmatmul_reuses_plans_across_tuner_instances_on_gpu() -> None:
    """On a GPU: qmatmul's first tuning loads the cache; a cleared tuner that persists again
    gets the same plan for the same shape without timing anything."""
    from kernels import quantize
    from kernels.qmatmul_triton import qmatmul, tuner

    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    qw = quantize(w, bits=8, group_size=128)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    qmatmul(x, qw)
    chosen = dict(tuner.best)
    assert tuner.persisted and chosen
    tuner.clear()
    tuner.persisted = False
    qmatmul(x, qw)
    assert tuner.best == chosen and not tuner.timings
