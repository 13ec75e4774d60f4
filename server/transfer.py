"""Host-to-device copies that do not wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronizes the
stream: the host would wait for every kernel already queued, and async scheduling (the host
preparing step N+1 while the device runs step N) would silently stop overlapping. Small step
inputs therefore go through pinned memory with a non-blocking copy; the caching host
allocator keeps each pinned block alive until its copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a tensor on `device`, queued without a sync."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)
