"""Scheduler.schedule, one pass: running decodes first, then running chunked prefills, then
admissions (FCFS), each catching up its computed tokens as far as the token budget goes."""

from __future__ import annotations

import torch

from server.engine.kv_cache import BlockManager, BlockSpans
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import Sequence, SequenceData, Status


def _seq(rid: str, prompt_len: int) -> Sequence:
    data = SequenceData.from_prompt(list(range(1, prompt_len + 1)), [], torch.zeros(3, prompt_len), 0)
    return Sequence(rid, 0, data, SamplingParams(max_tokens=20), BlockSpans(), max_model_len=256)


def _chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, c.start, c.end, c.want_logits) for c, s in zip(out.chunks, out.seqs)]


def _run(sched: Scheduler, out: SchedulerOutput) -> None:
    """The step ran: computed counts advance and each sequence that was sampled gets a token."""
    sched.after_step(out)
    for chunk, seq in zip(out.chunks, out.seqs):
        if chunk.want_logits:
            seq.data.append(99)


def test_decodes_then_chunked_prefills_then_admissions_under_the_budget() -> None:
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), 4, 8)
    a, b, c = _seq("a", 3), _seq("b", 20), _seq("c", 2)
    sched.add(a)
    out = sched.schedule()
    assert _chunks(out) == [("a", 0, 3, True)]
    _run(sched, out)
    sched.add(b)
    out = sched.schedule()  # a decodes; b is admitted and takes the rest of the budget
    assert _chunks(out) == [("a", 3, 4, True), ("b", 0, 7, False)]
    _run(sched, out)
    sched.add(c)
    out = sched.schedule()  # no budget left for c: it waits
    assert _chunks(out) == [("a", 4, 5, True), ("b", 7, 14, False)]
    assert list(sched.waiting) == [c]
    _run(sched, out)
    out = sched.schedule()  # b's last chunk, then c with the one token left
    assert _chunks(out) == [("a", 5, 6, True), ("b", 14, 20, True), ("c", 0, 1, False)]
    assert [s.status for s in (a, b, c)] == [Status.RUNNING] * 3 and sched.num_preemptions == 0


def test_the_head_of_the_queue_that_does_not_fit_blocks_those_behind_it() -> None:
    """FCFS: a smaller request behind a head that finds no blocks is not admitted first."""
    sched = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), 4, 64)
    first, big, small = _seq("first", 7), _seq("big", 12), _seq("small", 2)
    for seq in (first, big, small):
        sched.add(seq)
    out = sched.schedule()
    assert _chunks(out) == [("first", 0, 7, True)] and list(sched.waiting) == [big, small]
