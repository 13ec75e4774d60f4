"""The real checkpoint fits a CPU machine: the KV pool sized from free RAM (arithmetic with
made-up machines, then on the demo), the flag reaching the engine, the start-up line, the
dtype rule, and one resident copy of the quantized weights after a forward."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from server import LLM, SamplingParams
from server.config import parse_config
from server.engine import core as engine_core
from server.engine import memory
from server.engine.core import EngineArgs, EngineCore
from server.engine.memory import (
    CPU_KV_DEFAULT_MAX,
    CPU_KV_FRACTION,
    CPU_RESERVED_BYTES,
    GiB,
    available_memory,
    blocks_needed,
    cpu_kv_budget,
    cpu_num_blocks,
    kv_bytes_per_block,
    kv_pool_summary,
    max_concurrency,
    parse_meminfo,
    read_cgroup_memory,
)
from server.model.loader import CPU_BF16_MIN_PARAMS, default_dtype, num_parameters

MEMINFO = """MemTotal:       24576000 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
Cached:          3000000 kB
HugePages_Total:       0
"""


def test_meminfo_is_parsed_in_bytes() -> None:
    info = parse_meminfo(MEMINFO)
    assert info["MemAvailable"] == 20_000_000 * 1024
    assert info["HugePages_Total"] == 0  # no unit: taken as is
    assert available_memory(info) == 20_000_000 * 1024
    old_kernel = {"MemFree": 5, "Cached": 7}
    assert available_memory(old_kernel) == 12


def test_cgroup_limit_bounds_what_is_available() -> None:
    info = parse_meminfo(MEMINFO)  # the host has ~19 GiB free, the container much less
    limit, usage = 8 * GiB, 6 * GiB
    assert available_memory(info, limit, usage) == 2 * GiB
    # page cache of a just-read checkpoint is reclaimable: not part of the working set
    assert available_memory(info, limit, usage, cgroup_inactive_file=3 * GiB) == 5 * GiB
    assert available_memory(info, limit, 9 * GiB) == 0  # over the limit: nothing, not negative
    assert available_memory(info, 64 * GiB, GiB) == 20_000_000 * 1024  # a loose limit changes nothing


def test_cgroup_files_v2_v1_and_unlimited(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 * GiB}\n")
    (v2 / "memory.current").write_text(f"{3 * GiB}\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {GiB}\n")
    assert read_cgroup_memory(v2) == (8 * GiB, 3 * GiB, GiB)
    (v2 / "memory.max").write_text("max\n")
    assert read_cgroup_memory(v2) == (None, None, 0)
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    (v1 / "memory.stat").write_text("total_inactive_file 4096\n")
    assert read_cgroup_memory(tmp_path / "v1") == (4 * GiB, GiB, 4096)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert read_cgroup_memory(tmp_path / "v1") == (None, None, 0)
    assert read_cgroup_memory(tmp_path / "none") == (None, None, 0)


def test_kv_budget_default_share_cap_and_explicit() -> None:
    assert cpu_kv_budget(10 * GiB, 1.5) == int(1.5 * GiB)  # explicit wins, even above the default
    assert cpu_kv_budget(10 * GiB) == int(CPU_KV_FRACTION * (10 * GiB - CPU_RESERVED_BYTES))
    assert cpu_kv_budget(1000 * GiB) == CPU_KV_DEFAULT_MAX
    assert cpu_kv_budget(CPU_RESERVED_BYTES // 2) == 0
    # the 24 GB, 2-core machine of docs/BENCHMARKS.md with the real model loaded (~19 GB free):
    # the default pool keeps the whole server under the 8 GB goal (docs/BENCHMARKS.md)
    assert cpu_kv_budget(19 * 10**9) < 3 * GiB


def test_blocks_capped_at_need_and_refused_at_zero() -> None:
    assert blocks_needed(max_num_seqs=4, max_model_len=100, block_size=16) == 4 * 7
    assert (
        cpu_num_blocks(budget=10**9, per_block=1000, max_num_seqs=4, max_model_len=100, block_size=16) == 28
    )
    assert (
        cpu_num_blocks(budget=10_500, per_block=1000, max_num_seqs=4, max_model_len=100, block_size=16) == 10
    )
    with pytest.raises(RuntimeError, match="cpu-kv-cache-gb"):
        cpu_num_blocks(budget=999, per_block=1000, max_num_seqs=4, max_model_len=100, block_size=16)


def test_summary_line_names_the_pool() -> None:
    assert max_concurrency(num_blocks=100, block_size=16, max_model_len=400) == 4.0
    line = kv_pool_summary(2048, 16, 16 * 57344, torch.bfloat16, 4096)
    assert line == (
        "KV cache: 2048 blocks x 16 = 32768 tokens, 1.75 GiB (bfloat16); "
        "maximum concurrency for 4096 tokens per request: 8.00x"
    )


def test_flag_reaches_engine_args() -> None:
    assert parse_config([]).engine_args().cpu_kv_cache_gb is None
    assert parse_config(["--cpu-kv-cache-gb", "1.5"]).engine_args().cpu_kv_cache_gb == 1.5
    assert parse_config([], env={"GRACE_SERVE_CPU_KV_CACHE_GB": "0.25"}).engine_args().cpu_kv_cache_gb == 0.25
    with pytest.raises(SystemExit):
        parse_config(["--cpu-kv-cache-gb", "0"])


def test_dtype_rule() -> None:
    cpu = torch.device("cpu")
    assert default_dtype(cpu, 5_000_000)[0] == torch.float32
    big, why = default_dtype(cpu, 2_127_532_032)
    assert big == torch.bfloat16 and "2.13 B" in why and "--dtype float32" in why
    assert default_dtype(cpu, CPU_BF16_MIN_PARAMS)[0] == torch.bfloat16
    assert default_dtype(torch.device("cuda"), 1000)[0] == torch.bfloat16


def test_kv_pool_sized_from_memory_on_the_demo(demo_dir, monkeypatch, caplog) -> None:
    path = str(demo_dir("w8"))
    caplog.set_level(logging.INFO, logger="server")
    # plenty of RAM: the pool is what 2 sequences of 256 tokens need, no more
    monkeypatch.setattr(engine_core, "host_available_memory", lambda: 64 * GiB)
    core = EngineCore(EngineArgs(model=path, device="cpu", max_model_len=256, max_num_seqs=2))
    assert core.model.dtype == torch.float32  # the demo stays fp32 (exact against transformers)
    assert core.stats().num_kv_blocks == 2 * 256 // 16
    assert "KV cache: 32 blocks x 16 = 512 tokens" in caplog.text
    assert "(float32); maximum concurrency for 256 tokens per request: 2.00x" in caplog.text
    per_block = kv_bytes_per_block(core.model, 16)
    # little RAM: the default share of it, and max_model_len capped to what the pool holds
    avail = CPU_RESERVED_BYTES + int(20.5 * per_block / CPU_KV_FRACTION)
    monkeypatch.setattr(engine_core, "host_available_memory", lambda: avail)
    core = EngineCore(EngineArgs(model=path, device="cpu", max_num_seqs=2))
    assert core.stats().num_kv_blocks == 20 and core.max_model_len == 20 * 16
    # the flag wins over the share, --num-kv-blocks over both
    core = EngineCore(
        EngineArgs(model=path, device="cpu", max_num_seqs=2, cpu_kv_cache_gb=12 * per_block / GiB)
    )
    assert core.stats().num_kv_blocks == 12
    core = EngineCore(
        EngineArgs(model=path, device="cpu", max_num_seqs=2, cpu_kv_cache_gb=0.001, num_kv_blocks=7)
    )
    assert core.stats().num_kv_blocks == 7


def test_host_memory_reads_this_machine() -> None:
    avail = memory.host_available_memory()
    assert 0 < avail <= parse_meminfo(Path("/proc/meminfo").read_text())["MemTotal"]


def test_one_resident_copy_of_the_quantized_weights(demo_dir) -> None:
    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=256)
    llm.generate(["the cat sat"], SamplingParams(temperature=0, max_tokens=4))
    model = llm.engine.model
    assert all(lin.qweight is None for lin in model.linears())  # codes freed: one dense copy
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == num_parameters(model) * model.dtype.itemsize  # nothing beside the dense weights
    assert all(p.dtype == model.dtype for p in model.parameters())
