"""EngineArgs: the engine's options, in a module without torch (the CLI builds its flags from
them without loading the model code)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    """Engine options; the same names are LLM(...) keywords and server flags."""

    model: str = "demo"
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    quantize_lm_head: bool = False  # logits from a W8G128 copy of the head (server/model/lm_head.py)
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_kv_blocks: int | None = None  # explicit pool size (tests force preemption with it)
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gb: float | None = None  # CPU KV pool in GiB; None: a share of the free RAM
    enable_prefix_caching: bool = True
    encoder_cache_bytes: int = 256 << 20
    kernel_backend: str = "auto"  # asked for: "auto", "reference", "triton" (kernels/backend.py)
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (debugging, profiling)
    async_scheduling: bool | None = None  # schedule step N+1 while step N runs; None: on CUDA
