"""Where a request's CPU-heavy work runs: tokenizing long text and decoding images, in worker
threads, never on the event loop.

Both hold the GIL in stretches (building a 300k-id list, allocating a 36-Mpx frame): those
threads keep the loop's CPU priority, since a lowered thread that holds the GIL while the
scheduler runs others made the loop wait for it (measured on 2 cores: the loop asleep on the
GIL for 100-375 ms). The tokenizer's own parallel threads never touch the GIL: they run at a
lower priority (on a machine with few cores the loop gets the core first), by starting them
from a lowered thread, whose priority they inherit (Linux keeps a nice value per thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import io
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # this module stays light: the JSON worker process imports it
    from server.model.processor import Processor

T = TypeVar("T")

BACKGROUND_NICENESS = 10  # added to the process's own value


def lower_this_thread_priority(delta: int = BACKGROUND_NICENESS) -> None:
    if not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + delta))
    except OSError:
        pass


# Two image threads keep the cores busy without a crowd of GIL holders in front of the loop;
# on two cores one: a 36-Mpx image is 0.3 s of solid CPU, and two of them left the loop (and
# the engine) no core (/health p99 30-65 ms with two under the mixed-abuse test, 24-39 with one).
IMAGE_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) - 1)) if hasattr(os, "sched_getaffinity") else 2
TEXT_THREADS = 4
_IMAGE_WORKERS = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="image-decode")
_TEXT_WORKERS = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="text-work")


MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with fresh pages from the kernel, as glibc does
    until its threshold drifts up (it raises it to the size of each large block freed): then a
    36-Mpx frame (144 MB, which PIL allocates zeroed while holding the GIL) came from reused
    heap and had to be cleared, holding the loop for up to 100 ms; fresh pages are already
    zero (0.1 ms). Setting the threshold once stops the drift; freed frames go straight back to
    the system. glibc only; elsewhere nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _start_every_thread(pool: ThreadPoolExecutor, workers: int) -> None:
    """A pool starts its threads one per submit, as work arrives; started under load, each
    start waited on a busy machine for its thread to run (the loop with it)."""
    gate = threading.Barrier(workers, timeout=60)
    for future in [pool.submit(gate.wait) for _ in range(workers)]:
        future.result()


def warm_up(processor: Processor) -> None:
    """Before traffic, what the first requests would otherwise pay on the loop: every worker
    thread started, the image plugins imported, and the tokenizer's parallel threads started
    from a lowered thread, whose priority they keep for the life of the process."""
    from PIL import Image

    from server.model.processor import LONG_TEXT_CHARS

    map_large_allocations()
    _start_every_thread(_IMAGE_WORKERS, IMAGE_THREADS)
    _start_every_thread(_TEXT_WORKERS, TEXT_THREADS)
    Image.init()
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    _IMAGE_WORKERS.submit(processor.load, png.getvalue()).result()

    def first_parallel_encode() -> None:
        lower_this_thread_priority()
        processor.encode("warm " * LONG_TEXT_CHARS)

    thread = threading.Thread(target=first_parallel_encode, name="tokenizer-start")
    thread.start()
    thread.join()


async def run_image_work(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_IMAGE_WORKERS, functools.partial(fn, *args))


async def run_text_work(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_TEXT_WORKERS, functools.partial(fn, *args))
