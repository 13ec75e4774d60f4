"""`python -m server.engine.bench` on CPU with tiny settings: every scenario and mode runs and
the JSON counts what was generated (catches bench bugs before they cost GPU time)."""

from __future__ import annotations

import json

from server.engine import bench


def test_engine_bench_writes_every_row(tmp_path, capsys) -> None:
    out = tmp_path / "engine.json"
    args = "--batches 1,3 --prompt-len 24 --decode-tokens 5 --max-num-seqs 4 --sampled-batch 2"
    bench.main([*args.split(), "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["model"] == "demo"
    start = data["startup"]
    assert start["num_kv_blocks"] > 0 and start["async_scheduling"] is False and start["graph_sizes"] == []
    assert start["memory_profile_mib"] is None  # sized from memory only on CUDA
    rows = [(r["scenario"], r["mode"], r["batch"], r["tokens"]) for r in data["rows"]]
    # decode rows generate max_tokens - 1 tokens each (the first comes with the prefill)
    assert rows == [
        ("prefill", "eager/sync", 4, 4 * 24),
        ("decode", "eager/sync", 1, 4),
        ("decode", "eager/async", 1, 4),
        ("decode", "eager/sync", 3, 12),
        ("decode", "eager/async", 3, 12),
        ("decode-sampled", "eager/async", 2, 8),
    ]
    timed = [r for r in data["rows"] if r["mode"] == "eager/sync"]
    assert all(r["model_ms_per_step"] > 0 and r["overhead_ms_per_step"] is not None for r in timed)
    assert all(r["model_ms_per_step"] is None for r in data["rows"] if r["mode"] != "eager/sync")
    assert "| decode-sampled | eager/async | 2 |" in capsys.readouterr().out
