"""One request must never end the engine. Each test first reproduces a fault that used to
take the whole engine down (top_k = 2**63 overflowed a tensor constructor in the sampler and
engine_main treated every exception in step() as fatal), then checks that only the faulty
request fails, its blocks are freed, and every other request gets exactly the tokens it
gets when it runs alone."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from PIL import Image

import server.engine.core as core_module
from server import SamplingParams
from server.engine.client import AsyncEngine, EngineRequestError, EngineRequestFailed
from server.engine.core import EngineArgs, EngineCore, EngineOutput, EngineRequest, RequestRejected
from server.engine.sampling_params import MAX_TOP_K

MAX_LEN = 256


def _engine(demo_dir, async_scheduling: bool = False) -> EngineCore:
    args = EngineArgs(
        model=str(demo_dir("w8")), device="cpu", max_model_len=MAX_LEN, async_scheduling=async_scheduling
    )
    return EngineCore(args)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))


def _requests(engine: EngineCore) -> list[EngineRequest]:
    """Two good requests (one with an image, one sampled with a seed) to run beside a fault."""
    from server.model.processor import Processor

    proc = Processor(engine.args.model, engine.model.cfg)
    chat = proc.process_chat(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": _image(1)}, {"type": "text", "text": "what?"}],
            }
        ]
    )
    text = proc.process_chat([{"role": "user", "content": "tell me about the red cat"}])
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=10, ignore_eos=True, n=2)
    return [
        EngineRequest("good-image", chat.prompt_token_ids, greedy, chat.images),
        EngineRequest("good-seeded", text.prompt_token_ids, seeded),
    ]


def _run(engine: EngineCore, max_steps: int = 500) -> dict[tuple[str, int], list[EngineOutput]]:
    outs: dict[tuple[str, int], list[EngineOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
    assert not engine.has_unfinished(), "the engine did not finish within the step bound"
    return outs


def _tokens(outs: dict[tuple[str, int], list[EngineOutput]]) -> dict[tuple[str, int], list[int]]:
    return {k: [t for o in v for t in o.new_token_ids] for k, v in outs.items()}


def _assert_released(engine: EngineCore) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_used == 0, f"{bm.num_used} KV blocks still referenced"
    assert not engine.requests and not engine.scheduler.has_work()


@pytest.fixture(scope="module")
def alone(demo_dir):
    """What the good requests produce with no fault beside them."""
    engine = _engine(demo_dir)
    for req in _requests(engine):
        engine.add_request(req)
    return _tokens(_run(engine))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_top_k_2_pow_63_fails_only_its_request(demo_dir, alone, monkeypatch, async_scheduling):
    """The request from the report, with validation switched off so it reaches the sampler as
    it did then: "Overflow when unpacking long long" building the top_k tensor. Only that request ends (error), the
    others run on unchanged, every block is freed, the engine steps on."""
    engine = _engine(demo_dir, async_scheduling)
    for req in _requests(engine):
        engine.add_request(req)
    hostile = SamplingParams(temperature=1.0, top_k=5, max_tokens=2)
    hostile.top_k = 2**63
    monkeypatch.setattr(SamplingParams, "validate", lambda self: None)
    ids = engine.model.cfg.text.vocab_size
    engine.add_request(EngineRequest("hostile", [1, 2, 3, min(4, ids - 1)], hostile))
    outs = _run(engine)
    assert [o.finish_reason for o in outs[("hostile", 0)]] == ["error"]
    assert "Overflow" in (outs[("hostile", 0)][-1].error or "")
    got = _tokens(outs)
    for key, tokens in alone.items():
        assert got[key] == tokens, key
    _assert_released(engine)


def test_the_engine_validates_what_reaches_it(demo_dir):
    """The same top_k with validation on: refused at add_request, before any tensor exists."""
    engine = _engine(demo_dir)
    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=2)
    params.top_k = 2**63
    with pytest.raises(RequestRejected, match="top_k"):
        engine.add_request(EngineRequest("hostile", [1, 2, 3], params))
    params.top_k, params.seed = MAX_TOP_K, 2**64
    with pytest.raises(RequestRejected, match="seed"):
        engine.add_request(EngineRequest("hostile-seed", [1, 2, 3], params))
    vocab = engine.model.cfg.text.vocab_size  # an embedding lookup out of range ended the engine
    for ids in ([1, vocab], [-1, 2]):
        with pytest.raises(RequestRejected, match="out of range"):
            engine.add_request(EngineRequest("hostile-ids", ids, SamplingParams(max_tokens=2)))
    _assert_released(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_broken_image_fails_only_its_request(demo_dir, alone, async_scheduling):
    """An image whose pixel rows do not match its grid (a preprocessing bug, forced here) makes
    the vision tower raise inside the step. Before: the step's exception ended the engine.
    Now: that request fails before the model runs, and the step is run again without it."""
    engine = _engine(demo_dir, async_scheduling)
    good = _requests(engine)
    image_req = good[0]
    broken = dataclasses.replace(image_req.images[0], pixel_values=image_req.images[0].pixel_values[:, :-3])
    engine.add_request(EngineRequest("broken-image", image_req.prompt_token_ids, image_req.params, [broken]))
    for req in good:
        engine.add_request(req)
    outs = _run(engine)
    assert [o.finish_reason for o in outs[("broken-image", 0)]] == ["error"]
    got = _tokens(outs)
    for key, tokens in alone.items():
        assert got[key] == tokens, key
    _assert_released(engine)


def test_a_sampler_fault_in_every_row_still_ends_the_engine(demo_dir, monkeypatch):
    """A fault no single row causes is the step's, not a request's: it is raised (and
    engine_main ends the engine, logging the step's requests)."""
    engine = _engine(demo_dir)
    for req in _requests(engine):
        engine.add_request(req)

    def broken(*args, **kwargs):
        raise RuntimeError("sampler is broken for everyone")

    monkeypatch.setattr(core_module, "sample_async", broken)
    with pytest.raises(RuntimeError, match="broken for everyone"):
        _run(engine)
    context = engine.describe_step()
    assert "good-image#0" in context and "good-seeded#0" in context and "temperature=0.8" in context


def test_async_engine_isolates_faulty_requests(demo_dir, monkeypatch):
    """Through engine_main (inline engine): concurrent streams run while a request whose
    add_request raises (forced), a top_k = 2**63 request and a broken-image request come and
    fail. The good streams complete, the faulty ones raise, and the engine stays healthy and
    serves a request afterwards."""
    real_add = EngineCore.add_request

    def add_request(self, req):
        if req.request_id.startswith("boom"):
            raise KeyError("forced fault while adding")
        return real_add(self, req)

    monkeypatch.setattr(EngineCore, "add_request", add_request)

    async def scenario() -> None:
        args = EngineArgs(model=str(demo_dir("w8")), device="cpu", max_model_len=MAX_LEN)
        engine = AsyncEngine(args, inline=True)
        await engine.start(timeout=120)
        try:
            proc = engine.processor
            inputs = proc.process_chat([{"role": "user", "content": "tell me about the red cat"}])
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

            async def text(rid: str, p: SamplingParams = params, inp=inputs) -> str:
                out = ""
                async for d in engine.generate(inp, p, rid):
                    out += "".join(s.text for s in d.deltas)
                return out

            solo = await asyncio.wait_for(text("solo"), 60)
            hostile = SamplingParams(temperature=1.0, top_k=5, max_tokens=4)
            hostile.top_k = 2**63
            image = proc.process_chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": _image(2)}, {"type": "text", "text": "hi"}],
                    }
                ]
            )
            broken = dataclasses.replace(image, images=[
                dataclasses.replace(image.images[0], pixel_values=image.images[0].pixel_values[:, :-3])
            ])  # fmt: skip
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(text(f"good-{i}") for i in range(3)),
                    text("boom-1"),
                    text("hostile", hostile),
                    text("broken", params, broken),
                    return_exceptions=True,
                ),
                120,
            )
            assert results[:3] == [solo] * 3
            assert isinstance(results[3], EngineRequestFailed) and "forced fault" in str(results[3])
            assert isinstance(results[4], EngineRequestError) and "top_k" in str(results[4])
            assert isinstance(results[5], EngineRequestFailed)
            assert engine.healthy
            assert await asyncio.wait_for(text("after"), 60) == solo
        finally:
            await engine.shutdown(timeout=10)

    asyncio.run(scenario())
