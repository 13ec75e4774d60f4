"""How late the API process's event loop runs its callbacks: a task that asks to wake every
TICK_S and records how much later it woke. A late wake-up is a request that waited: work held
the loop (a slow callback, a crowd of small ones) or the process did not get a core at all.
The two read differently in `busy`: the loop thread's CPU time over the tick."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("grace_serve.api")

TICK_S = 0.02
WARN_LAG_S = 0.5  # one warning per stall this long: an operator should hear of it


class LoopLagMonitor:
    def __init__(self, observe: Callable[[float], None]) -> None:
        self._observe = observe  # the metrics histogram's observe
        self._task: asyncio.Task[None] | None = None
        self.max_lag_s = 0.0
        self.ticks = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            wall, cpu = time.monotonic(), time.thread_time()
            await asyncio.sleep(TICK_S)
            elapsed = time.monotonic() - wall
            lag = max(0.0, elapsed - TICK_S)
            self.ticks += 1
            self.max_lag_s = max(self.max_lag_s, lag)
            self._observe(lag)
            if lag >= WARN_LAG_S:
                busy = (time.thread_time() - cpu) / elapsed
                log.warning(
                    "event loop ran %.0f ms late (loop thread busy %.0f%% of it: %s)",
                    lag * 1000,
                    busy * 100,
                    "work on the loop"
                    if busy > 0.5
                    else "the process had no core, or another thread held the GIL",
                )
