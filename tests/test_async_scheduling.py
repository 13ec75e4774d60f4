"""Async scheduling (the default on CUDA): step N+1 is scheduled and launched before step N's
tokens reach the host, its decode inputs taken from N's sampled tokens on the device.

On CPU nothing overlaps, but the bookkeeping is the same: these tests run the async engine on
the demo checkpoint and require exactly the sync engine's results, through chunked prefill,
images, preemption, prefix caching, n > 1, seeded sampling with penalties and logprobs, stop
tokens and strings, aborts, and the decode-graph static path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from server import LLM, SamplingParams
from server.engine.core import EngineArgs, EngineCore, EngineRequest

WORDS = "alpha beta gamma delta red green blue cat dog bird tree house river stone".split()


def _chats(count: int) -> list[list[dict]]:
    rng = np.random.default_rng(11)
    chats = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS, size=3 + 11 * i))
        if i % 4 == 2:
            im = Image.fromarray(rng.integers(0, 255, (40 + 12 * i, 72, 3), dtype=np.uint8))
            chats.append(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": im}, {"type": "text", "text": text}],
                    }
                ]
            )
        else:
            chats.append([{"role": "user", "content": text}])
    return chats


def _params(count: int) -> list[SamplingParams]:
    """Greedy, seeded sampling with filters and penalties, logprobs, n=2, min_tokens, EOS on
    and off, and max_tokens from 1 up."""
    out = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=1 + 3 * i)
        elif kind == 1:
            p = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=i, max_tokens=12, logprobs=3)
        elif kind == 2:
            p = SamplingParams(
                temperature=0.8, seed=i, n=2, max_tokens=9, repetition_penalty=1.3, presence_penalty=0.5
            )
        elif kind == 3:
            p = SamplingParams(temperature=0, max_tokens=14, min_tokens=6, ignore_eos=True, logprobs=0)
        else:
            p = SamplingParams(temperature=1.0, seed=100 + i, min_p=0.05, frequency_penalty=0.4, max_tokens=7)
        out.append(p)
    return out


def _summary(outs) -> list:
    return [
        [
            (
                c.token_ids,
                c.finish_reason,
                [(d.token_id, d.logprob, d.top_logprobs) for d in c.logprobs or []],
            )
            for c in o.outputs
        ]
        for o in outs
    ]


def _assert_same(got: list, want: list) -> None:
    """Token ids, finish reasons and logprob token ids exactly; logprob values to 1e-5: a
    step's batch differs between the modes (async schedules a finished sequence's row once
    more), and CPU matmuls round differently for different batch sizes (~1e-7)."""

    def ids(summary: list) -> list:
        return [[(t, r, [(d, [a for a, _ in top]) for d, _, top in lps]) for t, r, lps in o] for o in summary]

    def values(summary: list) -> list[float]:
        return [
            v for o in summary for _, _, lps in o for _, lp, top in lps for v in [lp] + [b for _, b in top]
        ]

    assert ids(got) == ids(want)
    assert values(got) == pytest.approx(values(want), abs=1e-5)


def _assert_released(llm: LLM) -> None:
    core = llm.engine
    core.block_manager.check_invariants()
    assert core.block_manager.num_used == 0 and not core.has_unfinished() and not core.requests
    assert core._inflight is None


@pytest.mark.parametrize("graphs", [False, True])
def test_async_equals_sync_on_a_mixed_workload(demo_dir, graphs: bool) -> None:
    path = str(demo_dir("w8"))
    kw = dict(device="cpu", max_model_len=768, max_num_batched_tokens=48, max_num_seqs=8)
    sync = LLM(path, async_scheduling=False, **kw)
    fast = LLM(path, async_scheduling=True, **kw)
    if graphs:
        fast.engine.runner.enable_decode_graphs(8, fast.engine.max_model_len, capture=False)
    chats, params = _chats(14), _params(14)
    want = _summary(sync.chat(chats, params))
    got = _summary(fast.chat(chats, params))
    _assert_same(got, want)
    reasons = {c[1] for o in want for c in o}
    assert reasons == {"length", "stop"}, reasons  # some end on EOS, some on max_tokens
    _assert_released(fast)
    if graphs:
        assert fast.engine.runner.decode_graphs.replays > 10


def test_async_with_preemption_matches_an_unconstrained_run(demo_dir) -> None:
    """A pool of 20 blocks for 6 sequences growing to 90+ tokens each: preemption happens
    while tokens are in flight, and every output still equals the roomy sync run."""
    path = str(demo_dir("w8"))
    prompts = [" ".join(WORDS[i : i + 5] * 6) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = [
        o.outputs[0].token_ids for o in LLM(path, device="cpu", max_model_len=512).generate(prompts, params)
    ]
    tight = LLM(path, device="cpu", num_kv_blocks=20, max_model_len=320, async_scheduling=True)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert got == want
    assert tight.engine.scheduler.num_preemptions > 0
    _assert_released(tight)


def test_no_step_is_spent_past_max_tokens(demo_dir) -> None:
    """A sequence whose in-flight token is its last is not scheduled again: with EOS ignored
    the async engine runs exactly as many forwards and tokens as the sync one."""
    path = str(demo_dir("w8"))
    counts = {}
    for mode in (False, True):
        llm = LLM(path, device="cpu", async_scheduling=mode)
        seen: list[int] = []
        llm.engine.model.register_forward_hook(lambda _m, args, _o, seen=seen: seen.append(args[0].shape[0]))
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 2, 5, 9)]
        outs = llm.generate(["one two", "three four five", "six", "seven eight nine ten"], params)
        assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 5, 9]
        counts[mode] = (len(seen), sum(seen))
    assert counts[True] == counts[False]


def test_prefix_cache_and_stop_strings_under_async(demo_dir) -> None:
    """The second request sharing a long prefix hits the same cached blocks as in sync mode;
    a stop string ends a sequence while its next token is in flight, with the same text."""
    path = str(demo_dir("w8"))
    shared = " ".join(WORDS * 8)
    results = {}
    for mode in (False, True):
        llm = LLM(path, device="cpu", async_scheduling=mode)
        first = llm.generate([shared + " first"], SamplingParams(temperature=0, max_tokens=8))[0]
        second = llm.generate([shared + " second"], SamplingParams(temperature=0, max_tokens=8))[0]
        stats = llm.engine.stats()
        text = first.outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 2] if len(text) > 3 else text
        stopped = llm.generate([shared + " first"], SamplingParams(temperature=0, max_tokens=8, stop=[stop]))[
            0
        ]
        results[mode] = (
            first.outputs[0].token_ids,
            second.outputs[0].token_ids,
            stats.prefix_cache_hits,
            stopped.outputs[0].text,
            stopped.outputs[0].finish_reason,
        )
        _assert_released(llm)
    assert results[True] == results[False]
    assert results[True][2] > 0


def _full_pool_with_two_decodes(pending: bool):
    """Two running sequences fill a 4-block pool (block size 4); each has 8 computed tokens and
    a 9th token (in flight if `pending`, else known) that needs a third block."""
    from server.engine.kv_cache import BlockManager, BlockSpans
    from server.engine.scheduler import Scheduler, Sequence
    from server.engine.sequence import SequenceData

    sched = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), 4, 64)
    seqs = []
    for rid in ("old", "new"):
        data = SequenceData.from_prompt(list(range(1, 7)), [], torch.arange(6).expand(3, -1), 0)
        seqs.append(Sequence(rid, 0, data, SamplingParams(max_tokens=20), BlockSpans(), max_model_len=64))
        sched.add(seqs[-1])
    assert len(sched.schedule().chunks) == 2 and sched.bm.num_available == 0
    for seq in seqs:
        seq.data.append(7)
        seq.data.append(8)
        seq.num_computed = 8
        if pending:
            seq.num_pending = 1
        else:
            seq.data.append(9)
    return sched, seqs


def test_a_sequence_with_a_token_in_flight_never_preempts_another() -> None:
    """Its in-flight token may be its last (EOS, a stop token): it waits one step instead of
    evicting a sequence for a block it may never use. Without a token in flight the older
    sequence preempts the newer one, as before."""
    sched, _ = _full_pool_with_two_decodes(pending=True)
    out = sched.schedule()
    assert out.chunks == [] and sched.num_preemptions == 0 and len(sched.running) == 2
    sched, (old, new) = _full_pool_with_two_decodes(pending=False)
    out = sched.schedule()
    assert out.seqs == [old] and sched.num_preemptions == 1 and list(sched.waiting) == [new]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_follow_up_turn_reuses_the_blocks_the_answer_filled(demo_dir, async_scheduling: bool) -> None:
    """Multi-turn chat: the next request repeats the prompt and the generated answer. Every
    full block of both (generated tokens included, registered once their ids reached the
    host) is a prefix-cache hit."""
    llm = LLM(str(demo_dir("w8")), device="cpu", async_scheduling=async_scheduling)
    cfg = llm.config
    text_vocab = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for shift in range(30):  # the random demo model may answer with special tokens: a prompt
        prompt = [(11 * i + shift) % 200 + 5 for i in range(40)]  # whose answer is plain text
        generated = llm.generate([prompt], greedy)[0].outputs[0].token_ids
        if max(generated) < text_vocab:
            break
    else:
        pytest.fail("no prompt with a plain-text answer")
    follow_up = llm.generate([prompt + generated + [7, 8, 9]], SamplingParams(temperature=0, max_tokens=2))[0]
    computed = len(prompt) + len(generated) - 1  # the last generated token was never an input
    assert follow_up.num_cached_tokens == computed // 16 * 16 == 64
    _assert_released(llm)


def test_abort_while_a_token_is_in_flight(demo_dir) -> None:
    """Abort a request between steps while its sampled token is still on the device: it gets
    one abort output and nothing after; the other request finishes; every block comes back."""
    core = EngineCore(EngineArgs(model=str(demo_dir("w8")), device="cpu", async_scheduling=True))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for rid, ids in (("a", [5, 6, 7, 8, 9]), ("b", [10, 11, 12])):
        core.add_request(EngineRequest(rid, ids, params))
    seen = {"a": 0, "b": 0}
    for _ in range(4):
        for out in core.step():
            seen[out.request_id] += len(out.new_token_ids)
    assert core._inflight is not None and any(s.num_pending for s in core._inflight.seqs)
    aborted = core.abort_request("a")
    assert [o.finish_reason for o in aborted] == ["abort"]
    after = []
    for _ in range(100):
        if not core.has_unfinished():
            break
        after += core.step()
    assert all(o.request_id == "b" for o in after)
    assert seen["b"] + sum(len(o.new_token_ids) for o in after) == 12
    assert after[-1].finish_reason == "length"
    core.block_manager.check_invariants()
    assert core.block_manager.num_used == 0 and core._inflight is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_steps_never_wait_for_the_gpu(demo_dir) -> None:
    """In steady decoding, with greedy, sampled (top-p), penalized, min_tokens and logprob
    rows, an async step issues no synchronizing CUDA call: torch's sync debug mode turns any
    (a blocking copy, .item(), a data-dependent size) into an error. The host then waits only
    on the event behind the previous step's sampled tokens."""
    llm = LLM(str(demo_dir("w8")), device="cuda", max_model_len=512, max_num_seqs=8)
    core = llm.engine
    assert core.async_scheduling and core.runner.decode_graphs is not None
    params = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=60, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.7, seed=2, max_tokens=60, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(
            temperature=1.0, max_tokens=60, frequency_penalty=0.5, presence_penalty=0.3, min_tokens=50
        ),
    ]
    for i, p in enumerate(params):
        core.add_request(EngineRequest(f"r{i}", [5 + i, 6, 7, 8, 9], p, eos_token_ids=[2]))
    for _ in range(6):  # prefill and first decodes, eagerly compiled and tuned
        core.step()
    assert not core.scheduler.waiting and all(not s.in_prefill for s in core.scheduler.running)
    replays = core.runner.decode_graphs.replays
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [out for _ in range(8) for out in core.step()]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == 8 * 4 and core.runner.decode_graphs.replays == replays + 8
