"""Continuous batching: which tokens of which sequences run in the next step.

Each step packs running decodes first (one token each), then prefill chunks of running and
waiting sequences under `max_num_batched_tokens`, capped at `max_num_seqs` sequences. When
a decode needs a block and none is free, the newest running sequence is preempted (its
blocks freed, to be recomputed later) and goes back to the front of the waiting queue.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass

from .kv_cache import BlockManager
from .messages import FinishReason
from .sequence import ScheduledChunk, Sequence, Status


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    seqs: list[Sequence]  # parallel to chunks
    preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.bm.blocks_needed(num_tokens) <= self.bm.num_blocks

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One pass, as vLLM v1: each running sequence, then each waiting one, catches up
        its num_computed by as many tokens as it still needs and the budget allows. Running
        decodes go first (one token each), then running chunked prefills, then admissions
        (FCFS). A decode that needs a block and finds none preempts the newest running
        sequence (itself if it is the newest)."""
        plan = _StepPlan(self.max_num_batched_tokens)
        block_size = self.bm.block_size
        running = Status.RUNNING
        for seq in self._running_decodes_first():
            if plan.budget <= 0:
                break
            if seq.status is not running or (seq.num_pending and self._ends_with_pending(seq)):
                continue  # preempted earlier in this pass, or nothing left to compute
            total = len(seq.data.token_ids) + seq.num_pending  # seq.num_tokens, read once
            end = plan.chunk_end(seq, total)
            # the common case first: the blocks it has hold `end` (no call, no allocation);
            # this loop runs once per running sequence per step, so it is kept to plain ops
            if -(-end // block_size) <= len(seq.block_table) or self._make_room(seq, end, plan):
                plan.add(seq, end, total)

        gated: list[Sequence] = []
        while self.waiting and plan.budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._gated(seq):
                gated.append(self.waiting.popleft())  # a sibling waits for the shared prompt
                continue
            seq.gate = None
            if seq.num_pending:  # preempted with a token in flight: admitted once it has
                break  # arrived (next step); FCFS, so nobody behind it goes first
            if not self._admit(seq):
                break  # FCFS: nobody jumps the queue when the head does not fit
            total = seq.num_tokens
            plan.add(seq, plan.chunk_end(seq, total), total)
        self.waiting.extendleft(reversed(gated))
        self.num_preemptions += plan.preempted
        return SchedulerOutput(plan.chunks, plan.seqs, plan.preempted)

    def _running_decodes_first(self) -> list[Sequence]:
        """Running sequences in admission order, decodes before chunked prefills."""
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for s in self.running:  # s.in_prefill, inlined: this runs per sequence per step
            (prefills if len(s.data.token_ids) + s.num_pending - s.num_computed > 1 else decodes).append(s)
        decodes += prefills
        return decodes

    def _make_room(self, seq: Sequence, end: int, plan: _StepPlan) -> bool:
        """Blocks for `seq`'s tokens up to `end` (a prefill's were all taken at admission;
        a decode may need one more), preempting the newest running sequence while the pool
        is full. False: `seq` does not run this step (it gave way itself, or its token in
        flight may end it: better wait one step than evict another sequence for it)."""
        while self.bm.blocks_needed(end) > len(seq.block_table):
            if self.bm.append_block(seq.block_table):
                continue
            if seq.num_pending:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted += 1
            if victim is seq:
                return False
            plan.drop(victim)  # in case it was chosen earlier in this pass
        return True

    def _gated(self, seq: Sequence) -> bool:
        """A sibling (n > 1) waits until the first one's prompt is computed, to share it."""
        gate = seq.gate
        return gate is not None and gate.status is not Status.FINISHED and gate.num_computed < gate.num_prompt

    def _admit(self, seq: Sequence) -> bool:
        """Move the head of the waiting queue to running with blocks for its tokens (+1), or
        False when the pool cannot hold it now."""
        first = seq.scheduled_time is None  # not a readmission after preemption
        got = self.bm.allocate_prompt(seq.data.token_ids, seq.spans, reserve=1, count_stats=first)
        if got is None:
            return False
        self.waiting.popleft()
        seq.block_table, cached = got
        seq.num_computed = cached
        seq.num_registered_blocks = cached // self.bm.block_size
        if first:  # a readmission finds its own blocks: no prefix-cache hit
            seq.num_cached_prompt_tokens = min(cached, seq.num_prompt)
            seq.scheduled_time = time.monotonic()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """The token in flight is the sequence's last (max_tokens or the context length):
        scheduling it again would compute a token nobody gets."""
        if not seq.num_pending:
            return False
        return seq.num_tokens - seq.num_prompt >= seq.max_output_tokens

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, keep generated tokens, requeue at the front."""
        self.running.remove(seq)
        self.bm.free_table(seq.block_table)
        seq.num_computed = 0
        seq.num_registered_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    # -- after the step ------------------------------------------------------------------

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts and publish newly full blocks to the prefix cache."""
        caching, block_size = self.bm.enable_prefix_caching, self.bm.block_size
        for chunk, seq in zip(out.chunks, out.seqs):
            if seq.status is not Status.RUNNING:
                continue
            seq.num_computed = chunk.end
            # a decode fills a block once in block_size steps: skip the call in between
            if caching and (seq.num_registered_blocks + 1) * block_size <= chunk.end:
                seq.num_registered_blocks = self.bm.register_computed(
                    seq.block_table, seq.data.token_ids, seq.spans, seq.num_registered_blocks, chunk.end
                )

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.bm.free_table(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason


class _StepPlan:
    """The chunks one schedule() pass has chosen so far, and the token budget left."""

    __slots__ = ("budget", "chunks", "preempted", "seqs")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chunks: list[ScheduledChunk] = []
        self.seqs: list[Sequence] = []  # parallel to chunks
        self.preempted = 0

    def chunk_end(self, seq: Sequence, num_tokens: int) -> int:
        """Where `seq`'s chunk ends: all the tokens it still needs (of its `num_tokens`), as
        far as the budget goes."""
        return min(num_tokens, seq.num_computed + self.budget)

    def add(self, seq: Sequence, end: int, num_tokens: int) -> None:
        """Run tokens [num_computed, end) of `seq` (which has `num_tokens`: end is at most
        that, less where the budget runs out); logits only where its known tokens end."""
        start = seq.num_computed
        self.chunks.append(ScheduledChunk(seq.data, start, end, seq.block_table, end == num_tokens))
        self.seqs.append(seq)
        self.budget -= end - start

    def drop(self, seq: Sequence) -> None:
        """Take back `seq`'s chunk, if it has one (it was preempted after being chosen)."""
        if seq in self.seqs:
            i = self.seqs.index(seq)
            self.budget += self.chunks[i].end - self.chunks[i].start
            del self.seqs[i], self.chunks[i]
