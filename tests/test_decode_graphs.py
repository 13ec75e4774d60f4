"""Decode steps through static buffers and padded batch sizes (server/engine/cuda_graphs.py).

On CPU the graphs are not captured (capture=False): the same buffers, padding and forward run
eagerly, so CI checks everything but the capture itself. The `gpu` tests capture for real."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from server import LLM, SamplingParams
from server.engine.cuda_graphs import capture_sizes
from server.engine.sequence import ScheduledChunk, SequenceData


def _prompts(count: int) -> list[list[dict]]:
    rng = np.random.default_rng(3)
    words = "one two three red green blue cat dog bird tree house river".split()
    convs = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=4 + 7 * i))
        if i % 3 == 1:
            im = Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8))
            content = [{"type": "image", "image": im}, {"type": "text", "text": text}]
            convs.append([{"role": "user", "content": content}])
        else:
            convs.append([{"role": "user", "content": text}])
    return convs


def test_capture_sizes_cover_every_batch_with_little_padding() -> None:
    """Sizes start 1, 2, 4, 8, step by 8 to 128 and 16 beyond, and end at max_num_seqs."""
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    big = capture_sizes(256)
    assert big[:5] == [1, 2, 4, 8, 16] and big[-1] == 256 and 128 in big and 144 in big
    for top in (1, 3, 7, 64, 100, 256, 300):
        sizes = capture_sizes(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == top
        gaps = [b - a for a, b in itertools.pairwise(sizes)]
        assert max(gaps, default=0) <= 16, f"{top}: padding up to {max(gaps)} rows"


@pytest.mark.parametrize("max_num_seqs", [8, 5])
def test_padded_static_decode_equals_eager(demo_dir, max_num_seqs: int) -> None:
    """7 concurrent greedy requests (3 with images) with different output lengths: the batch
    shrinks through 7, 6, ... 1 decodes (padded to 8, 4, 2, 1, or capped at 5). Every output
    equals the plain eager engine's, and the static path served the decode steps."""
    path = str(demo_dir("w8"))
    kw = dict(device="cpu", max_model_len=512, max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    eager = LLM(path, **kw)
    padded = LLM(path, **kw)
    padded.engine.runner.enable_decode_graphs(max_num_seqs, padded.engine.max_model_len, capture=False)
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(7)]
    convs = _prompts(7)
    want = [o.outputs[0].token_ids for o in eager.chat(convs, params)]
    got = [o.outputs[0].token_ids for o in padded.chat(convs, params)]
    assert got == want
    graphs = padded.engine.runner.decode_graphs
    assert graphs is not None and graphs.replays >= 20  # the longest request decodes 22 tokens
    padded.engine.block_manager.check_invariants()
    assert padded.engine.block_manager.num_used == 0


def test_padding_rows_write_no_kv(demo_dir) -> None:
    """3 decodes padded to a batch of 4: only the 3 real slots of the KV cache change, and
    each sequence's hidden state equals its eager forward."""
    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=256, num_kv_blocks=16)
    runner = llm.engine.runner
    runner.enable_decode_graphs(4, 256, capture=False)
    torch.manual_seed(0)
    for k, v in runner.kv_caches:  # a full cache: a stray write anywhere would show
        k.normal_()
        v.normal_()
    chunks = []
    for length, blocks in [(5, [3]), (20, [7, 2]), (17, [9, 11])]:
        ids = torch.randint(0, 200, (length,)).tolist()
        data = SequenceData.from_prompt(ids[:-1], [], torch.arange(length - 1).expand(3, -1), 0)
        data.append(ids[-1])
        chunks.append(ScheduledChunk(data, length - 1, length, blocks))
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.bucket(3) == 4
    # every size stages through a contiguous view (a strided source would be copied through
    # pageable memory on a GPU, which syncs the stream)
    assert all(graphs._stage(size).is_contiguous() for size in graphs.sizes)
    logits = runner.run(chunks)
    assert graphs.replays == 1
    written = {c.block_table[(c.end - 1) // 16] * 16 + (c.end - 1) % 16 for c in chunks}
    for (k0, v0), (k1, v1) in zip(before, runner.kv_caches):
        for old, new in ((k0, k1), (v0, v1)):
            changed = (old != new).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
            assert set(changed) == written
    # the eager path on the same cache state (the KV writes are idempotent) gives the same logits
    runner.decode_graphs = None
    eager = runner.run(chunks)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_split_iters", [4, 1])
def test_padded_static_decode_with_triton_kernels(demo_dir, monkeypatch, min_split_iters: int) -> None:
    """The Triton kernels (interpreter on CPU) on the static path: the KV write skips slot -1
    and attention runs the plan made at max_model_len whatever the real context length; each
    sequence splits as far as its own context fills (these short ones: not at all), or, with
    one K/V tile enough per split, into several parts merged in the kernel; tokens equal the
    reference kernels' eager run either way."""
    from dataclasses import replace

    from kernels import attention

    plan_for_sms = attention.plan_for_sms
    monkeypatch.setattr(
        attention, "plan_for_sms", lambda *a: replace(plan_for_sms(*a), min_split_iters=min_split_iters)
    )
    path = str(demo_dir("w8"))
    kw = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4, num_kv_blocks=40)
    ref = LLM(path, kernel_backend="reference", **kw)
    tri = LLM(path, kernel_backend="triton", **kw)
    tri.engine.runner.enable_decode_graphs(4, 512, capture=False)
    t = tri.config.text
    plan = attention.plan_attention(
        3, t.num_attention_heads, t.num_key_value_heads, t.head_dim, 1, 512, tri.engine.model.device
    )
    assert plan.num_splits > 1, "the fixed plan should split the context"
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 4, 3)]
    prompts = ["the red cat sat " * 20, "two blue birds sang over the tree", "one"]  # 2+ K/V tiles of 64
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tri.generate(prompts, params)]
    assert got == want
    assert tri.engine.runner.decode_graphs.replays == 5


def test_a_failed_capture_falls_back_to_eager(demo_dir, monkeypatch, caplog) -> None:
    """If capturing the graphs fails at start, the engine logs why and serves eagerly."""
    from server.engine.cuda_graphs import DecodeGraphs

    def broken(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=256)
    monkeypatch.setattr(DecodeGraphs, "capture_all", broken)
    with caplog.at_level("WARNING", logger="server.engine.core"):
        llm.engine._enable_decode_graphs()
    assert llm.engine.runner.decode_graphs is None
    assert "CUDA graph capture failed, decode steps run eagerly" in caplog.text
    out = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_steps_the_static_path_cannot_take_run_eagerly(demo_dir) -> None:
    """More decodes than the largest size, or a prefill in the batch: the eager path runs."""
    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=256, max_num_seqs=8)
    llm.engine.runner.enable_decode_graphs(2, 256, capture=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["a b c", "d e f g", "h i"], params)  # 3 decodes > 2: eager every step
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert llm.engine.runner.decode_graphs.replays == 0
    llm.generate(["just one prompt"], params)  # 1 decode: the static path
    assert llm.engine.runner.decode_graphs.replays == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_and_async_scheduling_equal_eager_sync_on_gpu(demo_dir) -> None:
    """The CUDA defaults (captured decode graphs + async scheduling) give the eager, sync
    engine's tokens for 7 concurrent requests in fp32, greedy and seeded-sampled, and the
    graphs served the decode steps."""
    path = str(demo_dir("w8"))
    kw = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64)
    baseline = LLM(path, enforce_eager=True, async_scheduling=False, **kw)
    default = LLM(path, **kw)
    assert default.engine.async_scheduling
    graphs = default.engine.runner.decode_graphs
    assert graphs is not None and graphs.capture and len(graphs.graphs) == len(graphs.sizes)
    params = [
        SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=4 + 3 * i, ignore_eos=True)
        for i in range(7)
    ]
    convs = _prompts(7)
    want = [o.outputs[0].token_ids for o in baseline.chat(convs, params)]
    got = [o.outputs[0].token_ids for o in default.chat(convs, params)]
    assert got == want
    assert graphs.replays >= 20
    default.engine.block_manager.check_invariants()
    assert default.engine.block_manager.num_used == 0
