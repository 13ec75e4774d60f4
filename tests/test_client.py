"""AsyncEngine across the real process boundary: streaming, cancellation, and engine death."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from server import SamplingParams
from server.engine.client import AsyncEngine, EngineDeadError, EngineRequestError
from server.engine.core import EngineArgs


async def _collect(engine: AsyncEngine, inputs, params) -> list:
    return [d async for d in engine.generate(inputs, params)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stream_cancel_and_engine_death(demo_dir, async_scheduling: bool):
    """One engine process (sync, or async scheduling as on CUDA): a streamed request matches
    the offline LLM; cancelling a stream frees its KV at once; a too-long request is refused;
    killing the engine makes a pending generate() raise within 5 s and the engine report
    unhealthy."""

    async def scenario() -> None:
        args = EngineArgs(
            model=str(demo_dir("w8")), device="cpu", max_model_len=256, async_scheduling=async_scheduling
        )
        engine = AsyncEngine(args)
        await engine.start(timeout=120)
        try:
            assert engine.healthy
            inputs = engine.processor.process_chat([{"role": "user", "content": "name a color"}])
            deltas = await asyncio.wait_for(
                _collect(engine, inputs, SamplingParams(temperature=0, max_tokens=12, n=2)), 60
            )
            assert deltas[-1].finished
            text = {0: "", 1: ""}
            for d in deltas:
                for s in d.deltas:
                    text[s.index] += s.text
            from server import LLM

            offline = LLM(str(demo_dir("w8")), device="cpu", max_model_len=256)
            expected = offline.chat(
                [{"role": "user", "content": "name a color"}], SamplingParams(temperature=0, max_tokens=12)
            )
            assert text[0] == text[1] == expected[0].outputs[0].text

            # cancel mid-stream: the engine must free the request's blocks
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            gen = engine.generate(inputs, params)
            await asyncio.wait_for(gen.__anext__(), 60)
            await gen.aclose()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (
                engine.stats().kv_cache_usage > 0 or engine.stats().num_running
            ):
                await asyncio.sleep(0.05)
            assert engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0

            too_long = engine.processor.process_prompt(list(range(5, 300)))
            with pytest.raises(EngineRequestError, match="maximum context length"):
                await asyncio.wait_for(_collect(engine, too_long, SamplingParams(max_tokens=4)), 30)

            # kill the engine process while a request is pending
            task = asyncio.create_task(_collect(engine, inputs, params))
            await asyncio.sleep(0.3)
            os.kill(engine.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(task, 5)
            assert time.monotonic() - t0 < 5
            assert not engine.healthy
            with pytest.raises(EngineDeadError):
                await _collect(engine, inputs, params)
        finally:
            await engine.shutdown(timeout=5)

    asyncio.run(scenario())
