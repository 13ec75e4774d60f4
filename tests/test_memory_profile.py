"""KV pool sizing after a profiling step (server/engine/memory.py) and the vision-tower grouping
that keeps real steps under the profiled peak. The arithmetic and the profiling run itself are
checked on CPU; the measured numbers only exist on CUDA (`gpu` tests)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from server.engine.core import EngineArgs, EngineCore, _largest_image_grid
from server.engine.memory import MemoryProfile, kv_bytes_per_block, largest_image_grid, profile_step
from server.engine.runner import ModelRunner
from server.model.images import ImageSettings, preprocess_image, smart_resize
from server.model.loader import load_model

GiB = 2**30
MiB = 2**20


def test_kv_budget_takes_everything_measured_from_the_utilization_share() -> None:
    p = MemoryProfile(
        total=80 * GiB, weights=3 * GiB, peak=7 * GiB, decode_activations=GiB // 2, non_torch=GiB
    )
    # 72 GiB allowed - 7 peak - 1 outside torch - 0.5 decode graphs - 0.25 encoder cache
    assert p.kv_budget(0.9, 256 * MiB) == int(80 * GiB * 0.9) - 7 * GiB - GiB - GiB // 2 - 256 * MiB
    per_block = 28 * 2 * 16 * 8 * 128 * 2  # the real 2B model, bf16, block size 16
    assert p.num_blocks(0.9, 256 * MiB, per_block) == p.kv_budget(0.9, 256 * MiB) // per_block
    assert p.num_blocks(0.5, 0, per_block) < p.num_blocks(0.9, 0, per_block)


def test_no_room_for_kv_is_a_clear_error() -> None:
    p = MemoryProfile(total=16 * GiB, weights=3 * GiB, peak=9 * GiB, decode_activations=GiB, non_torch=GiB)
    with pytest.raises(RuntimeError, match=r"raise gpu_memory_utilization \(needs > 0\.69\)"):
        p.num_blocks(0.6, 0, 2 * MiB)


def test_kv_bytes_per_block_matches_the_runner_pool() -> None:
    model = load_model("demo", device="cpu").model
    runner = ModelRunner(model, num_blocks=5, block_size=16)
    pool = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in runner.kv_caches)
    assert kv_bytes_per_block(model, 16) * 5 == pool


def test_largest_image_grid_bounds_every_processed_image() -> None:
    """No image the processor can make has more patches than the profiled grid."""
    s = ImageSettings()
    t, h, w = largest_image_grid(s)
    assert (t, h, w) == (1, 256, 256) and h % s.merge_size == 0
    unit = s.patch_size * s.merge_size
    for height, width in [(8000, 8000), (4096, 4097), (30000, 150), (150, 30000), (640, 480), (5000, 3000)]:
        rh, rw = smart_resize(height, width, unit, s.min_pixels, s.max_pixels)
        assert (rh // s.patch_size) * (rw // s.patch_size) <= h * w, (height, width)
    # a max_pixels that is no square of the 32-pixel unit: 1e6 // 1024 = 976 tokens at most
    # (e.g. 16 x 61 units); a square grid of side isqrt would hold only 31 x 31 = 961
    odd = ImageSettings(max_pixels=1_000_000)
    t, h, w = largest_image_grid(odd)
    assert h * w // 4 >= 976 and h % 2 == 0 and w % 2 == 0
    for height, width in [(1000, 1000), (512, 1953), (1953, 512), (16 * 32, 61 * 32), (3000, 300)]:
        rh, rw = smart_resize(height, width, unit, odd.min_pixels, odd.max_pixels)
        assert (rh // odd.patch_size) * (rw // odd.patch_size) <= h * w, (height, width)
    # an explicit context length smaller than the largest image's tokens bounds the grid:
    # at least max_model_len - 1 tokens (an image that still leaves one text token)
    t, h, w = _largest_image_grid(s, 2, max_model_len=1000)
    assert 999 <= h * w // 4 < 1000 + 32
    assert _largest_image_grid(s, 2, max_model_len=100_000) == (1, 256, 256)


def test_profile_step_runs_the_largest_step(demo_dir) -> None:
    """The profiling step runs the vision tower on the given grid, one prefill of
    max_num_batched_tokens tokens over max_num_seqs sequences with sampling, then one decode of
    max_num_seqs tokens; on CPU it measures nothing and returns zeros."""
    model = load_model(demo_dir("w8"), device="cpu").model
    calls: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    vision: list[int] = []
    model.visual.register_forward_hook(lambda _m, args, _out: vision.append(args[0].shape[0]))
    assert profile_step(model, 100, 8, 16, (1, 8, 12)) == (0, 0)
    assert vision == [96]
    assert calls == [100, 8]
    calls.clear()
    profile_step(model, 4, 8, 16, None)  # budget below max_num_seqs: every sequence gets a token
    assert calls == [8, 8]


class _FakeAllocator:
    """torch.cuda's allocator statistics, driven by the fakes below (MiB)."""

    def __init__(self, start: int) -> None:
        self.current = self.peak = start

    def add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def reset_peak(self, *_: object) -> None:
        self.peak = self.current


@pytest.mark.parametrize(
    ("vision", "prefill", "sampling"),
    [(2000, 150, 400), (100, 900, 50), (100, 150, 1200)],  # each phase the largest once
)
def test_profile_step_peak_excludes_only_the_temporary_kv(monkeypatch, vision, prefill, sampling) -> None:
    """Whichever phase peaks (vision tower before the temporary KV cache exists, prefill or
    sampling after), the step peak is the true peak of the step without that KV cache, and
    the decode figure is the decode forward's own activations. Fake CUDA allocator."""
    import types

    from server.engine import memory

    weights, feats, kv_per_block, decode = 4000, 256, 2, 60
    alloc = _FakeAllocator(weights)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", alloc.reset_peak)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *_: alloc.peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *_: alloc.current)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)

    class Model:
        device = types.SimpleNamespace(type="cuda")
        cfg = types.SimpleNamespace(
            vision=types.SimpleNamespace(in_channels=3, temporal_patch_size=2, patch_size=2),
            image_token_id=10**6,
            vision_start_token_id=10**6,
        )

        def encode_images(self, pixels, grids):
            alloc.add(vision + feats)
            alloc.add(-vision)
            return ["features"]

    kv = {}

    class Runner:
        def __init__(self, model, num_blocks, block_size, encoder_cache_bytes=0):
            kv["bytes"] = num_blocks * kv_per_block
            alloc.add(kv["bytes"])

        def run(self, chunks):
            alloc.add(prefill)
            alloc.add(-prefill)
            return torch.zeros(len(chunks), 8)

        def forward(self, chunks):
            alloc.add(decode)
            alloc.add(-decode)

    def fake_sample(logits, rows):
        alloc.add(sampling)
        alloc.add(-sampling)

    monkeypatch.setattr(memory, "ModelRunner", Runner)
    monkeypatch.setattr(memory, "sample", fake_sample)
    monkeypatch.setattr(memory, "kv_bytes_per_block", lambda model, bs: kv_per_block)
    step_peak, decode_peak = memory.profile_step(Model(), 2048, 64, 16, (1, 4, 4))
    want = weights + max(vision + feats, feats + prefill, feats + sampling)
    assert step_peak == want
    assert decode_peak == decode
    assert kv["bytes"] > 0


def test_vision_tower_runs_in_groups_under_the_patch_limit(demo_dir) -> None:
    """With a per-call patch limit the images are encoded in several calls, and the features
    equal one call over all of them."""
    model = load_model(demo_dir("w8"), device="cpu").model
    rng = np.random.default_rng(1)
    s = ImageSettings(min_pixels=32 * 32, max_pixels=64 * 64 * 4)
    images = [
        preprocess_image(Image.fromarray(rng.integers(0, 255, (hw, hw + 16, 3), dtype=np.uint8)), s)
        for hw in (64, 96, 48)
    ]
    patches = [im.pixel_values.shape[0] for im in images]
    whole = ModelRunner(model, 4).image_features(images)
    grouped = ModelRunner(model, 4)
    grouped.max_encode_patches = max(patches)
    calls: list[int] = []
    model.visual.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    feats = grouped.image_features(images)
    assert len(calls) >= 2 and max(calls) <= max(patches) and sum(calls) == sum(patches)
    for a, b in zip(whole, feats):
        torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.deepstack, b.deepstack, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kv_pool_is_sized_from_the_profile_on_gpu(demo_dir) -> None:
    """On CUDA the pool fills gpu_memory_utilization after the profile: a lower utilization
    gives fewer blocks, and one below the measured need is refused with the reason."""
    args = dict(model=str(demo_dir("w8")), max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024)
    big = EngineCore(EngineArgs(gpu_memory_utilization=0.5, **args))
    total = torch.cuda.mem_get_info()[1]
    pool = big.runner.num_blocks * kv_bytes_per_block(big.model, 16)
    assert pool > 0.2 * total  # the demo's weights and activations are tiny next to the card
    del big
    gc.collect()
    torch.cuda.empty_cache()
    small = EngineCore(EngineArgs(gpu_memory_utilization=0.3, **args))
    assert 0 < small.runner.num_blocks * kv_bytes_per_block(small.model, 16) < pool
    with pytest.raises(RuntimeError, match="raise gpu_memory_utilization"):
        EngineCore(EngineArgs(gpu_memory_utilization=1e-4, **args))  # ~14 MiB: not even the CUDA context
