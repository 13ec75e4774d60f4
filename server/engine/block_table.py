"""The block tables of the sequences a step runs, kept across steps.

Rebuilding a padded [batch, blocks] table every step costs the host time in proportion to
the context (2048 block ids per 32K-token sequence). Here each sequence owns a row of a
preallocated table (pinned on the host, mirrored on the device) and only what changed is
written: the whole row when the sequence first shows up (or its block list was replaced,
as on readmission after preemption), then one id per block the KV manager appends.

A step's sequences are moved into rows 0..n-1 (in any order) so that the attention reads
`table[:n, :width]`, a view: nothing the size of the batch's context is copied. In a steady
batch nobody moves; when the batch changes, a row that has to leave the prefix trades
places with one that has to enter it (a copy of two rows).

The rows follow the block lists the scheduler hands the runner (`ScheduledChunk.block_table`),
so they need no calls from the scheduler: a list only ever grows in place, and the block
manager clears it when it frees it (finish, preemption), which gives its row back. Rows of
sequences that never show up again are taken back least recently used first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.transfer import to_device


@dataclass(eq=False)
class _Row:
    owner: object  # the sequence (its SequenceData)
    blocks: list[int]  # the block list the row mirrors (identity matters)
    row: int
    synced: int = 0  # ids of `blocks` written into the row
    last_step: int = 0


class BlockTable:
    def __init__(
        self, max_rows: int, max_blocks: int, device: torch.device, mirrored: bool | None = None
    ) -> None:
        """`mirrored`: a host table and a device copy kept by `sync` (default: on CUDA); on
        CPU one tensor serves both unless asked (the kernel counter asks, to see CUDA's work)."""
        self.device = device
        self.mirrored = device.type == "cuda" if mirrored is None else mirrored
        self._alloc(max_rows, max_blocks)
        self._by_owner: dict[object, _Row] = {}
        self._at: list[_Row | None] = [None] * max_rows
        self._dirty: list[int] = []  # flat host indices written since the last sync (mirrored)
        self.frozen = False  # set once CUDA graphs read `device_table`: it may not move
        self.step = 0
        self.writes = 0  # block ids written (a count for tests: per-step work stays flat)
        self.moves = 0  # rows moved into a step's prefix

    def _alloc(self, rows: int, cols: int) -> None:
        cuda = self.device.type == "cuda"
        host = torch.zeros((rows, cols), dtype=torch.long, pin_memory=cuda)
        old = getattr(self, "host", None)
        if old is not None:
            host[: old.shape[0], : old.shape[1]] = old
        self.host = host
        self._host_np = host.numpy()  # the same memory: element writes without tensor calls
        self.device_table = host.to(self.device, copy=True) if self.mirrored else host

    @property
    def shape(self) -> tuple[int, int]:
        return self.host.shape[0], self.host.shape[1]

    def reserve(self, rows: int, cols: int) -> None:
        """Room for `rows` sequences of `cols` blocks (grows; never once frozen)."""
        have_rows, have_cols = self.shape
        if rows <= have_rows and cols <= have_cols:
            return
        if self.frozen:
            raise RuntimeError(
                f"a step of {rows} sequences x {cols} blocks exceeds the block table "
                f"({have_rows} x {have_cols}) the decode graphs were captured with"
            )
        self._alloc(max(rows, have_rows), max(cols, have_cols))
        self._at += [None] * (self.shape[0] - len(self._at))
        self._dirty.clear()  # the new device table was copied whole

    # -- one step ----------------------------------------------------------------------

    def place(self, owners: list[object], tables: list[list[int]], widths: list[int]) -> list[int]:
        """Rows 0..n-1 for the step's sequences (owner i, block list i, needing widths[i]
        blocks), written up to date; returns each one's row."""
        n = len(owners)
        self.step += 1
        self.reserve(n, max(widths, default=0))
        step, by_owner, recs = self.step, self._by_owner, []
        for o, t in zip(owners, tables):
            rec = by_owner.get(o)
            if rec is not None and rec.blocks is t and rec.synced == len(t):  # nothing new: most rows
                rec.last_step = step
            else:
                rec = self._sync(o, t)
            recs.append(rec)
        outside = [r for r in recs if r.row >= n]
        if outside:
            taken = {r.row for r in recs}
            holes = (i for i in range(n) if i not in taken)
            for rec in outside:
                self._swap(rec, next(holes))
        return [r.row for r in recs]

    def view(self, n: int, width: int) -> torch.Tensor:
        """The device table of a placed step: [n, width] (a strided view, no copy)."""
        return self.device_table[:n, :width]

    def slots(self, rows: list[int], positions: list[int], block_size: int) -> torch.Tensor:
        """KV cache slot of each token (row, position), from the host table: long [T]."""
        pos = torch.tensor(positions, dtype=torch.long)
        blocks = self.host[torch.tensor(rows, dtype=torch.long), pos // block_size]
        return blocks * block_size + pos % block_size

    def sync(self) -> None:
        """Copy the host entries written since the last sync to the device (CUDA): one
        scatter of the new ids, queued without waiting."""
        if not self._dirty or not self.mirrored:
            self._dirty.clear()
            return
        idx = torch.tensor(self._dirty, dtype=torch.long)
        vals = self.host.view(-1)[idx]
        self.device_table.view(-1).index_copy_(0, to_device(idx, self.device), to_device(vals, self.device))
        self._dirty.clear()

    # -- rows ----------------------------------------------------------------------------

    def _sync(self, owner: object, blocks: list[int]) -> _Row:
        rec = self._by_owner.get(owner)
        if rec is None or rec.blocks is not blocks or len(blocks) < rec.synced:
            if rec is None:
                rec = _Row(owner, blocks, self._free_row())
                self._by_owner[owner] = rec
                self._at[rec.row] = rec
            rec.blocks, rec.synced = blocks, 0
        if len(blocks) > rec.synced:
            self._write(rec.row, rec.synced, blocks[rec.synced :])
            rec.synced = min(len(blocks), self.shape[1])  # the rest once the table is wider
        rec.last_step = self.step
        return rec

    def _write(self, row: int, start: int, ids: list[int] | torch.Tensor) -> None:
        cols = self.shape[1]
        end = min(start + len(ids), cols)  # ids past the table's width are never read
        if end <= start:
            return
        self._host_np[row, start:end] = ids[: end - start]
        self.writes += end - start
        if self.mirrored:
            self._dirty += range(row * cols + start, row * cols + end)

    def _free_row(self) -> int:
        for i, rec in enumerate(self._at):
            if rec is None:
                return i
        # take back a row: a freed sequence's (its list cleared) first, else the least
        # recently used one not in this step
        idle = [r for r in self._at if r is not None and r.last_step != self.step]
        if not idle:
            raise RuntimeError("more sequences in one step than the block table has rows")
        victim = min(idle, key=lambda r: (bool(r.blocks), r.last_step))
        del self._by_owner[victim.owner]
        self._at[victim.row] = None
        return victim.row

    def _swap(self, rec: _Row, hole: int) -> None:
        """Move `rec` into row `hole`; whoever held it takes `rec`'s old row."""
        old, other = rec.row, self._at[hole]
        saved = self.host[hole, : other.synced].clone() if other is not None else None
        self._at[hole], self._at[old] = rec, other
        rec.row = hole
        if rec.synced:
            self._write(hole, 0, self.host[old, : rec.synced].clone())
        if other is not None:
            other.row = old
            if saved is not None and other.synced:
                self._write(old, 0, saved)
        self.moves += 1

    def __len__(self) -> int:
        return len(self._by_owner)
