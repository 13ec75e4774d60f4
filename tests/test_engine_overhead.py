"""Host work per decode step does not grow with context (issue 12): the persistent block
table writes only what changed, and the bench's --overhead scenario runs. Counts, not times."""

from __future__ import annotations

import json
import random

import torch

from server.engine import bench
from server.engine.block_table import BlockTable
from server.engine.core import EngineArgs, EngineCore
from server.model.loader import load_model


def _writes_per_steps(net, batch: int, context: int, steps: int) -> tuple[int, int]:
    args = EngineArgs(
        model="demo",
        device="cpu",
        max_model_len=context + 64,
        max_num_seqs=batch,
        num_kv_blocks=-(-(context + 64) // 16),
        enable_prefix_caching=False,
        async_scheduling=False,
    )
    core = EngineCore(args, model=net)
    bench._fake_running(core, batch, context, max_tokens=steps + 8)
    table = core.runner.block_table
    core.step()  # the first step writes every sequence's whole row, once
    assert table.writes == batch * -(-(context + 1) // 16)
    before, moves = table.writes, table.moves
    for _ in range(steps):
        core.step()
    return table.writes - before, table.moves - moves


def test_block_table_writes_per_decode_step_do_not_depend_on_context(demo_dir) -> None:
    net = load_model(demo_dir("w8"), device=torch.device("cpu")).model
    bench._stub_forward(net)
    short = _writes_per_steps(net, batch=4, context=64, steps=20)
    long = _writes_per_steps(net, batch=4, context=2048, steps=20)
    # 20 decode steps from position 64 (or 2048) cross one block boundary: 4 new ids, no moves
    assert short == long == (4, 0)


def _check(table: BlockTable, owners: list[object], lists: list[list[int]]) -> None:
    widths = [len(t) for t in lists]
    rows = table.place(owners, lists, widths)
    assert sorted(rows) == list(range(len(owners)))
    view = table.view(len(owners), max(widths))
    for r, t in zip(rows, lists):
        assert view[r, : len(t)].tolist() == t


def test_block_table_rows_follow_lists_through_growth_moves_and_reuse() -> None:
    rng = random.Random(0)
    table = BlockTable(8, 40, torch.device("cpu"))
    owners = [object() for _ in range(12)]
    lists = {o: [rng.randrange(1000) for _ in range(rng.randint(1, 5))] for o in owners}
    for _ in range(200):
        batch = rng.sample(owners, rng.randint(1, 8))
        for o in batch:
            op = rng.random()
            if op < 0.3:
                lists[o].append(rng.randrange(1000))  # the KV manager gave it a block
            elif op < 0.35:
                lists[o].clear()  # freed (finish / preemption) ...
                lists[o] = [rng.randrange(1000) for _ in range(rng.randint(1, 5))]  # ... readmitted
        _check(table, batch, [lists[o] for o in batch])
    assert len(table) <= 8 and table.moves > 0


def test_block_table_grows_wider_under_a_list_longer_than_it() -> None:
    """A sequence's whole block list arrives before the table is that wide (a prefill in
    chunks on a table not reserved up front): the ids past the width are written once the
    table grows, for plain and mirrored (CUDA-layout) tables."""
    for mirrored in (False, True):
        table = BlockTable(1, 1, torch.device("cpu"), mirrored=mirrored)
        owner, blocks = object(), [7, 3, 9, 4, 8]
        for width in (2, 4, 5):  # three chunks, each reading the blocks up to its end
            rows = table.place([owner], [blocks], [width])
            table.sync()
            assert table.view(1, width)[rows[0]].tolist() == blocks[:width], (mirrored, width)


def test_overhead_bench_runs_at_a_tiny_size(tmp_path, capsys) -> None:
    out = tmp_path / "overhead.json"
    bench.main([*"--overhead --batches 1,3 --context 32,80 --decode-tokens 4 --json".split(), str(out)])
    rows = json.loads(out.read_text())["overhead"]
    assert [(r["batch"], r["context"], r["steps"]) for r in rows] == [
        (1, 32, 4),
        (3, 32, 4),
        (1, 80, 4),
        (3, 80, 4),
    ]
    assert all(r["ms_per_step"] > 0 for r in rows)
    assert "| 3 |" in capsys.readouterr().out
