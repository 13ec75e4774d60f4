"""Decode steps replayed from CUDA graphs.

At 2B a decode step is a few hundred small kernels; launching them one by one from Python
costs more than running them. So for each padded batch size (1, 2, 4, 8, then steps of 8 up
to 128 and of 16 beyond, up to max_num_seqs) the decoder forward is captured once into a CUDA
graph that reads static input buffers, and a step of n decodes copies its inputs into those
buffers and replays the smallest graph with room for n.

The block tables are the runner's persistent table, read in place (block_table.py): a step's
sequences sit in its rows 0..n-1. Padding rows run a 1-token context with slot -1: the KV
write skips them, attention reads one cached slot (any finite value) and their hidden states
are dropped. The attention launch plan is made per batch size at max_model_len, so one
graph serves every context length: it bounds the context splits, and each sequence splits
only as far as its own context (read from seq_lens on the device) fills, so a short one runs
unsplit with no merge and a long one spreads over the SMs. The qmatmul tuner has timed each
batch size in the warm-up run before capture.

`capture=False` keeps everything but the capture: the same buffers, padding and forward,
run eagerly. That is the CPU twin the tests run in CI.
"""

from __future__ import annotations

import logging
import time

import torch

from server.model.layers import AttentionMetadata
from server.model.qwen3_vl import Qwen3VL

from .block_table import BlockTable

log = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes: 1, 2, 4, 8, then steps of 8 to 128 and 16 beyond."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, min(max_num_seqs, 128) + 1, 8))
    sizes += list(range(144, max_num_seqs + 1, 16))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Static-buffer decode forward for batch sizes up to max_num_seqs, one graph per size."""

    # rows of the packed per-token inputs, copied to the device in one transfer per step
    IDS, POS, SLOT, SEQ_LEN = range(4)

    def __init__(
        self,
        model: Qwen3VL,
        kv_caches: KVCaches,
        block_table: BlockTable,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.capture = capture
        dev = model.device
        n = self.max_batch
        self.inputs = torch.zeros((4, n), dtype=torch.long, device=dev)
        # The runner's persistent block table, read in place: a step's sequences sit in its
        # rows 0..n-1, so nothing is copied per step (it was sized and frozen for this).
        rows, cols = block_table.shape
        assert rows >= n and cols >= self.max_blocks, "the runner reserves the table first"
        self.block_tables = block_table.device_table[:, : self.max_blocks]
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=dev)  # 1 token each
        # Two pinned staging buffers, used in turn: the copy out of one may still be queued
        # while the next step (async scheduling) fills the other.
        pin = dev.type == "cuda"
        self._staging = [torch.zeros(4 * n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._staged_events: list[torch.cuda.Event | None] = [None, None]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0  # steps served (tests and stats)
        self.memory = 0  # bytes the captured graphs took (CUDA)

    def bucket(self, n: int) -> int | None:
        """The smallest batch size with room for n decodes (None: run eagerly)."""
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def can_run(self, n: int, max_blocks: int) -> bool:
        return 0 < n <= self.max_batch and max_blocks <= self.max_blocks

    def _forward(self, size: int) -> torch.Tensor:
        """The decoder forward over the first `size` rows of the static buffers."""
        meta = AttentionMetadata(
            slot_mapping=self.inputs[self.SLOT, :size],
            block_tables=self.block_tables[:size],
            seq_lens=self.inputs[self.SEQ_LEN, :size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixes the attention plan for any context
        )
        positions = self.inputs[self.POS, :size].expand(3, -1)  # decode: t = h = w
        return self.model(self.inputs[self.IDS, :size], positions, self.kv_caches, meta)

    def _stage(self, size: int) -> torch.Tensor:
        """The staging buffer for this step as a contiguous pinned [4, size] view (a strided
        slice would be copied through pageable memory, which syncs the stream). The two
        buffers alternate; before reuse the host waits for the copy that last read this one,
        which has almost always long run."""
        slot = self.replays % 2
        event = self._staged_events[slot]
        if event is not None:
            event.synchronize()
        return self._staging[slot][: 4 * size].view(4, size)

    @classmethod
    def _pad(cls, packed: torch.Tensor, start: int) -> None:
        """Rows from `start` on become padding: token 0 at position 0, no KV write (slot -1),
        a 1-token context (its block-table row always holds valid block ids)."""
        packed[:, start:] = 0
        packed[cls.SLOT, start:] = -1
        packed[cls.SEQ_LEN, start:] = 1

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm every size up (compiles kernels, times qmatmul plans), release what the
        warm-ups cached, then capture, largest first so the smaller graphs reuse the largest
        one's memory pool."""
        if not self.capture:
            return
        from kernels.qmatmul_triton import reserve_dequant_buffer

        t0 = time.perf_counter()
        self._pad(self.inputs, 0)
        # The dequant scratch buffer's address is baked into any graph that uses it: grow it
        # to the largest weight now so no later step replaces it.
        quantized = [lin.qweight for lin in self.model.linears() if lin.qweight is not None]
        largest = max((q.out_features * q.in_features for q in quantized), default=0)
        if largest:
            reserve_dequant_buffer(largest, self.model.dtype, self.model.device)
        for size in reversed(self.sizes):
            self._forward(size)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graphs' private pool cannot reuse the normal pool's cache
        free_before = torch.cuda.mem_get_info()[0]
        pool = None
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.memory = free_before - torch.cuda.mem_get_info()[0]
        log.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB",
            len(self.graphs),
            self.max_batch,
            time.perf_counter() - t0,
            self.memory / 2**20,
        )

    @torch.inference_mode()
    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: torch.Tensor,
        seq_lens: list[int],
        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decode step of len(ids) sequences, whose block tables are rows 0..n-1 of the
        runner's table; returns their final hidden states [n, H]. `fill`: (rows, token ids)
        already on the device that replace those rows' ids (tokens the previous step sampled
        and the host has not seen yet).

        The result is a view of a static buffer: use it before the next call."""
        n = len(ids)
        size = self.bucket(n)
        assert size is not None, "caller checks can_run"
        staged = self._stage(size)
        known = torch.tensor([ids, positions, seq_lens])
        staged[self.IDS, :n], staged[self.POS, :n], staged[self.SEQ_LEN, :n] = known
        staged[self.SLOT, :n] = slots
        self._pad(staged, n)
        self.inputs[:, :size].copy_(staged, non_blocking=True)
        if self.capture:
            event = torch.cuda.Event()
            event.record()
            self._staged_events[self.replays % 2] = event
        if fill is not None:
            self.inputs[self.IDS].index_copy_(0, *fill)
        # Padding rows n..size-1 read whatever valid block ids their table rows hold (those of
        # other or earlier sequences): a 1-token context, its result dropped.
        self.replays += 1
        if self.capture:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self._forward(size)[:n]
