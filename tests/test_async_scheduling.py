"""Async scheduling (the default on CUDA): step N+1 is scheduled and launched before step N's
tokens reach the host, its decode inputs taken from N's sampled tokens on the device.

On CPU nothing overlaps, but the bookkeeping is the same: these tests run the async engine on
the demo checkpoint and require exactly the sync engine's results, through chunked prefill,
images, preemption, prefix caching, n > 1, seeded sampling with penalties and logprobs, stop
tokens and strings, aborts, and the decode-graph static path."""

from __future__ import annotations

import numpy as np
import pytest
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
                [(d.token_id, d.logprob, d.top_logprobs) for d in (c.logprobs or [])],
            )
            for c in o.outputs
        ]
        for o in outs
    ]


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
    assert got == want
    assert {r for o in want for (r,) in [(c[1],) for c in o]} >= {"length"}
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
