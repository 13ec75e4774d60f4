"""How many KV blocks fit: on the GPU from a profiling step, on the CPU from free RAM.

CPU: the pool is a share of the memory still available once the weights are loaded
(MemAvailable, bounded by the cgroup limit of a container), or an explicit size, and never
more than max_num_seqs sequences of max_model_len tokens need. The pure functions below take
the numbers as arguments so CI checks the arithmetic with made-up machines.

CUDA:
With the weights loaded, one profiling run does the largest work a step can: the vision
tower on the largest image the processor can produce, a prefill of max_num_batched_tokens
tokens spread over max_num_seqs sequences, logits and sampling (top-k, top-p, penalties,
logprobs) for every one of them, and a decode forward of max_num_seqs tokens (what the CUDA
graphs will hold). The allocator's peak during that run, plus what lives outside torch (CUDA
context, library workspaces, other processes), plus the encoder cache and the decode graphs'
memory, is taken from gpu_memory_utilization x total; the rest becomes KV blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.images import ImageSettings
from server.model.qwen3_vl import Qwen3VL

from .runner import ModelRunner
from .sampler import SamplingInput, sample
from .sampling_params import SamplingParams
from .sequence import ScheduledChunk, SequenceData

log = logging.getLogger(__name__)
MiB = 2**20
GiB = 2**30

# CPU defaults (the pool is allocated up front and zeroed, so it is resident from the start):
CPU_KV_FRACTION = 0.125  # share of what is left after the weights and the reserve
CPU_RESERVED_BYTES = 2 * GiB  # step activations, encoder cache, the API process, the OS
CPU_KV_DEFAULT_MAX = 4 * GiB  # like vLLM's historical VLLM_CPU_KVCACHE_SPACE default


def kv_bytes_per_block(model: Qwen3VL, block_size: int) -> int:
    """K and V of `block_size` tokens in every decoder layer."""
    t = model.cfg.text
    return 2 * t.num_hidden_layers * block_size * t.num_key_value_heads * t.head_dim * model.dtype.itemsize


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes measured by `profile_memory` (all of the device, not only this process)."""

    total: int
    weights: int  # torch allocations before the profiling run: weights and buffers
    peak: int  # torch allocator peak during the run (weights included)
    decode_activations: int  # peak above the weights during the max_num_seqs decode forward
    non_torch: int  # used on the device outside this process's torch allocator

    def kv_budget(self, utilization: float, reserved: int) -> int:
        """Bytes left for KV blocks; `reserved`: the encoder cache and anything else kept."""
        graphs = self.decode_activations  # the decode graphs' private pool holds about this much
        return int(self.total * utilization) - self.peak - self.non_torch - graphs - reserved

    def num_blocks(self, utilization: float, reserved: int, per_block: int) -> int:
        budget = self.kv_budget(utilization, reserved)
        blocks = budget // per_block
        if blocks < 1:
            need = (self.peak + self.non_torch + self.decode_activations + reserved + per_block) / self.total
            raise RuntimeError(
                f"no GPU memory left for the KV cache: weights {self.weights / MiB:.0f} MiB, step peak "
                f"{self.peak / MiB:.0f} MiB, outside torch {self.non_torch / MiB:.0f} MiB of "
                f"{self.total / MiB:.0f} MiB; raise gpu_memory_utilization (needs > {need:.2f}) or "
                "lower max_num_batched_tokens / max_num_seqs"
            )
        return blocks


# ---------------------------------------------------------------------------------------
# CPU: the pool from free RAM


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo (or a cgroup memory.stat) -> {field: bytes}; "kB" values are scaled."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def available_memory(
    meminfo: Mapping[str, int],
    cgroup_limit: int | None = None,
    cgroup_usage: int | None = None,
    cgroup_inactive_file: int = 0,
) -> int:
    """Bytes this process may still take: the kernel's MemAvailable estimate, bounded in a
    container by its cgroup limit minus its working set (usage less reclaimable page cache,
    the file pages of a just-read checkpoint, as Kubernetes counts it)."""
    avail = meminfo.get("MemAvailable")
    if avail is None:  # kernels before 3.14
        avail = meminfo.get("MemFree", 0) + meminfo.get("Cached", 0)
    if cgroup_limit is not None and cgroup_usage is not None:
        working_set = max(0, cgroup_usage - cgroup_inactive_file)
        avail = min(avail, max(0, cgroup_limit - working_set))
    return avail


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    # v2 "max" and v1's near-2^63 "unlimited" both mean no limit
    return int(text) if text.isdigit() and int(text) < 2**60 else None


def read_cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None, int]:
    """(limit, usage, inactive file bytes) of this process's memory cgroup (v2, else v1);
    (None, None, 0) without a limit."""
    for limit_f, usage_f, stat_f, inactive_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        limit = _read_int(root / limit_f)
        if limit is None:
            continue
        try:
            stat = parse_meminfo((root / stat_f).read_text())
        except OSError:
            stat = {}
        return limit, _read_int(root / usage_f), stat.get(inactive_key, 0)
    return None, None, 0


def host_available_memory() -> int:
    """available_memory() of this machine or container, read now."""
    meminfo = parse_meminfo(Path("/proc/meminfo").read_text())
    return available_memory(meminfo, *read_cgroup_memory())


def cpu_kv_budget(available: int, cpu_kv_cache_gb: float | None = None) -> int:
    """Bytes for the CPU KV pool: `cpu_kv_cache_gb` GiB when given, else CPU_KV_FRACTION of
    what is available past CPU_RESERVED_BYTES, at most CPU_KV_DEFAULT_MAX."""
    if cpu_kv_cache_gb is not None:
        return int(cpu_kv_cache_gb * GiB)
    return min(CPU_KV_DEFAULT_MAX, int(CPU_KV_FRACTION * max(0, available - CPU_RESERVED_BYTES)))


def blocks_needed(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for max_num_seqs sequences of max_model_len tokens: more is never used."""
    return max_num_seqs * -(-max_model_len // block_size)


def cpu_num_blocks(
    budget: int, per_block: int, max_num_seqs: int, max_model_len: int, block_size: int
) -> int:
    """KV blocks of `per_block` bytes in `budget`, capped at what the sequences can use."""
    blocks = min(budget // per_block, blocks_needed(max_num_seqs, max_model_len, block_size))
    if blocks < 1:
        raise RuntimeError(
            f"no memory for the KV cache: {budget / MiB:.0f} MiB for blocks of {per_block / MiB:.1f} MiB; "
            "free some RAM or set --cpu-kv-cache-gb (GiB) or --num-kv-blocks"
        )
    return blocks


def max_concurrency(num_blocks: int, block_size: int, max_model_len: int) -> float:
    """How many requests of max_model_len tokens the pool holds at once (vLLM's figure)."""
    return num_blocks / -(-max_model_len // block_size)


def kv_pool_summary(
    num_blocks: int, block_size: int, per_block: int, dtype: torch.dtype, max_model_len: int
) -> str:
    """The start-up line naming the pool, as vLLM prints it."""
    name = str(dtype).replace("torch.", "")
    return (
        f"KV cache: {num_blocks} blocks x {block_size} = {num_blocks * block_size} tokens, "
        f"{num_blocks * per_block / GiB:.2f} GiB ({name}); maximum concurrency for {max_model_len} "
        f"tokens per request: {max_concurrency(num_blocks, block_size, max_model_len):.2f}x"
    )


# ---------------------------------------------------------------------------------------
# CUDA: the pool from a profiling step


def grid_for_tokens(tokens: int, merge_size: int) -> tuple[int, int, int]:
    """(t, h, w) in patches of an about-square image with at least `tokens` merged tokens
    (a x b >= tokens, a = isqrt(tokens)): any image with that many tokens costs no more."""
    a = max(1, math.isqrt(tokens))
    b = -(-tokens // a)
    return (1, a * merge_size, b * merge_size)


def largest_image_grid(settings: ImageSettings) -> tuple[int, int, int]:
    """(t, h, w) in patches bounding the largest image the processor can produce: its area is
    at most max_pixels, its sides multiples of patch_size x merge_size."""
    unit = settings.patch_size * settings.merge_size
    return grid_for_tokens(settings.max_pixels // unit**2, settings.merge_size)


@torch.inference_mode()
def profile_step(
    model: Qwen3VL,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    image_grid: tuple[int, int, int] | None,
) -> tuple[int, int]:
    """Run the largest step the engine can schedule on dummy inputs, in a temporary KV cache.

    Returns (allocator peak of the prefill step without the temporary KV cache, peak above the
    starting point of a max_num_seqs decode forward); (0, 0) off CUDA."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    feats = None
    vision_peak = 0
    if image_grid is not None:  # kept alive through the text step, as a cached image would be
        v = model.cfg.vision
        rows = image_grid[0] * image_grid[1] * image_grid[2]
        pixels = torch.randn(rows, v.in_channels * v.temporal_patch_size * v.patch_size**2)
        feats = model.encode_images(pixels, [image_grid])
        if cuda:  # measured before the temporary KV cache exists
            torch.cuda.synchronize()
            vision_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    tokens = max(max_num_batched_tokens, max_num_seqs)
    n_seqs = min(max_num_seqs, tokens)
    lengths = [tokens // n_seqs + (i < tokens % n_seqs) for i in range(n_seqs)]
    tables, next_block = [], 0
    for n in lengths:  # room for the decode token too
        tables.append(list(range(next_block, next_block + n // block_size + 1)))
        next_block += len(tables[-1])
    runner = ModelRunner(model, next_block, block_size, encoder_cache_bytes=0)
    kv_bytes = next_block * kv_bytes_per_block(model, block_size)
    text_vocab = min(model.cfg.image_token_id, model.cfg.vision_start_token_id)
    seqs = []
    for i, n in enumerate(lengths):
        ids = [(7 * i + j) % text_vocab for j in range(n)]
        seqs.append(SequenceData.from_prompt(ids, [], torch.arange(n).expand(3, -1), 0))
    logits = runner.run([ScheduledChunk(s, 0, len(s), t) for s, t in zip(seqs, tables)])
    params = SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        min_p=0.01,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        logprobs=20,
    )
    sample(logits, [SamplingInput(params, s) for s in seqs])
    del logits, feats
    step_peak = decode_peak = 0
    if cuda:
        torch.cuda.synchronize()
        step_peak = max(vision_peak, torch.cuda.max_memory_allocated() - kv_bytes)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for s in seqs:  # decode: one new token per sequence over its whole context
        s.append(1)
    runner.forward([ScheduledChunk(s, len(s) - 1, len(s), t) for s, t in zip(seqs, tables)])
    if cuda:
        torch.cuda.synchronize()
        decode_peak = torch.cuda.max_memory_allocated() - base
    return step_peak, decode_peak


def profile_memory(
    model: Qwen3VL,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    image_grid: tuple[int, int, int] | None,
) -> MemoryProfile:
    """Measure a profiling step on the model's CUDA device (see the module docstring)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    peak, decode = profile_step(model, max_num_batched_tokens, max_num_seqs, block_size, image_grid)
    free, total = torch.cuda.mem_get_info()
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved())
    torch.cuda.empty_cache()  # the profile's cached blocks go back before the KV pool is made
    profile = MemoryProfile(total, weights, max(peak, weights), decode, non_torch)
    log.info(
        "memory profile: weights %.0f MiB, step peak %.0f MiB, decode activations %.0f MiB, "
        "outside torch %.0f MiB, total %.0f MiB",
        weights / MiB,
        profile.peak / MiB,
        decode / MiB,
        non_torch / MiB,
        total / MiB,
    )
    return profile
