"""One HTTP request served by several engine requests (/v1/completions with a list of prompts).

Prompt i's choices become choices i*n .. i*n+n-1 of the response, as in OpenAI's API; the
streams run concurrently and their deltas are forwarded as they come. Closing the merged
stream (a disconnect, an error in one of them) cancels every other, which aborts each in
the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from server.engine.client import RequestDelta
from server.engine.messages import FinishReason
from server.metrics import RequestMetrics

_DONE = object()


async def merge_streams(streams: list[AsyncIterator[RequestDelta]], n: int) -> AsyncIterator[RequestDelta]:
    """The deltas of all streams, choice indices offset by stream (index i*n + j)."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
            await queue.put((i, _DONE))
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    finished: set[int] = set()
    try:
        while open_streams:
            i, item = await queue.get()
            if item is _DONE:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, RequestDelta)
            if item.finished:
                finished.add(i)
            yield replace(
                item,
                deltas=[replace(d, index=i * n + d.index) for d in item.deltas],
                finished=len(finished) == len(streams),
            )
    finally:
        for t in tasks:  # cancelling a pump closes its stream (the engine request is aborted)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CombinedMetrics:
    """Usage and access-log numbers of several engine requests, summed (same attribute names
    as RequestMetrics, which each engine request keeps for the Prometheus metrics)."""

    def __init__(self, parts: list[RequestMetrics], n: int) -> None:
        self.parts, self.n = parts, n

    @property
    def num_prompt_tokens(self) -> int:
        return sum(p.num_prompt_tokens for p in self.parts)

    @property
    def num_cached_tokens(self) -> int:
        return sum(p.num_cached_tokens for p in self.parts)

    @property
    def total_completion_tokens(self) -> int:
        return sum(p.total_completion_tokens for p in self.parts)

    @property
    def ttft(self) -> float | None:
        return min((p.ttft for p in self.parts if p.ttft is not None), default=None)

    @property
    def finish_reasons(self) -> dict[int, FinishReason]:
        return {i * self.n + j: r for i, p in enumerate(self.parts) for j, r in p.finish_reasons.items()}
