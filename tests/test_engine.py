"""Continuous batching on the demo checkpoint: concurrent mixed requests with tiny prefill
chunks, preemption, prefix caching, sampling, abort, and exact block accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import ReferenceInputs, reference_model, with_inline_images
from PIL import Image

from server import LLM, SamplingParams
from server.engine.core import EngineArgs, EngineCore, EngineRequest, RequestRejected
from server.engine.runner import powers_of_two_to
from server.model.loader import load_model

WORDS = "the cat sat on a red mat while two blue birds sang over the green tree near one small house".split()


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _conversations(count: int) -> list[tuple[list[dict], list[Image.Image]]]:
    """Prompts of different lengths; every third one carries an image of its own size."""
    rng = np.random.default_rng(7)
    convs = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS, size=3 + 9 * i))
        if i % 3 == 0:
            im = _image(40 + 20 * i, 200 - 5 * i, i)
            convs.append(
                ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], [im])
            )
        else:
            convs.append(([{"role": "user", "content": text}], []))
    return convs


@pytest.fixture(scope="module")
def oracle(demo_dir):
    path = demo_dir("w8")
    return reference_model(load_model(path)), ReferenceInputs(path)


def _reference_greedy(oracle, messages, images, max_tokens: int, eos: list[int]) -> list[int]:
    ref, inputs = oracle
    ref_in = inputs.build(messages, images)
    with torch.no_grad():
        gen = ref.generate(
            **ref_in, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
    return gen[0, ref_in["input_ids"].shape[1] :].tolist()


def _assert_all_blocks_released(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_used == 0, f"{bm.num_used} KV blocks still referenced after all requests ended"
    assert not llm.engine.requests and not llm.engine.scheduler.has_work()


def test_concurrent_chunked_requests_match_transformers_alone(demo_dir, oracle):
    """24 requests of different lengths (8 with images) submitted together, prefill chunks
    of 32 tokens mixed with decodes: each greedy output equals transformers' run alone."""
    llm = LLM(str(demo_dir("w8")), device="cpu", max_num_batched_tokens=32, max_model_len=1024)
    convs = _conversations(24)
    params = SamplingParams(temperature=0, max_tokens=10)
    outs = llm.chat([with_inline_images(m, ims) for m, ims in convs], params)
    eos = llm.processor.eos_token_ids
    lengths = {len(o.prompt_token_ids) for o in outs}
    assert len(lengths) > 20 and max(lengths) > 3 * 32, "prompts should vary and need several chunks"
    for (messages, images), out in zip(convs, outs):
        assert out.outputs[0].token_ids == _reference_greedy(oracle, messages, images, 10, eos)
    _assert_all_blocks_released(llm)


def test_preemption_keeps_outputs_identical(demo_dir):
    """A pool of 24 blocks cannot hold 6 growing sequences: some are preempted and
    recomputed, and every output still equals the unconstrained run."""
    convs = [with_inline_images(m, ims) for m, ims in _conversations(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(str(demo_dir("w8")), device="cpu", max_model_len=512)
    roomy_outs = roomy.chat(convs, params)
    expected = [o.outputs[0].token_ids for o in roomy_outs]
    tight = LLM(
        str(demo_dir("w8")), device="cpu", max_model_len=384, num_kv_blocks=24, max_num_batched_tokens=64
    )
    outs = tight.chat(convs, params)
    got = [o.outputs[0].token_ids for o in outs]
    assert tight.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == expected
    _assert_all_blocks_released(tight)
    # prefix-cache stats count each prompt once: a readmitted sequence finding its own
    # blocks again is not a hit (and its prompt not a new query)
    stats, roomy_stats = tight.engine.stats(), roomy.engine.stats()
    assert stats.prefix_cache_queries == sum(len(o.prompt_token_ids) for o in outs)
    assert stats.prefix_cache_hits == roomy_stats.prefix_cache_hits
    assert [o.num_cached_tokens for o in outs] == [o.num_cached_tokens for o in roomy_outs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_readmission_after_preemption_mid_prefill_is_no_cache_hit(demo_dir, async_scheduling):
    """B (36 tokens, shared with nobody) is preempted part-way through its chunked prefill by
    A's growth and readmitted onto its own cached blocks: its usage reports 0 cached tokens,
    as the prefix-cache stats do."""
    core = EngineCore(
        EngineArgs(
            model=str(demo_dir("w8")),
            device="cpu",
            async_scheduling=async_scheduling,
            block_size=4,
            num_kv_blocks=12,
            max_model_len=48,
            max_num_batched_tokens=8,
            max_num_seqs=4,
        )
    )
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    core.add_request(EngineRequest("A", [5, 6, 7], greedy))
    first = {}
    for step in range(500):
        if step == 2:
            b = EngineRequest("B", list(range(100, 136)), SamplingParams(temperature=0, max_tokens=4))
            core.add_request(b)
        elif step > 2 and not core.has_unfinished():
            break
        for o in core.step():
            if o.num_prompt_tokens:
                first[o.request_id] = (o.num_prompt_tokens, o.num_cached_tokens)
    stats = core.stats()
    assert stats.num_preemptions > 0, "the pool was meant to force a preemption"
    assert first == {"A": (3, 0), "B": (36, 0)}
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (39, 0)


def test_prefix_cache_hits_shared_prefix_and_image(demo_dir):
    """Two requests share a ~200-token prefix with an image: the second reuses every full
    shared block (hit counter == shared full blocks) and gives the same output as without
    the cache; the vision tower does not run again for the same image."""
    path = str(demo_dir("w8"))
    im = _image(90, 120, 11)
    prefix = " ".join(np.random.default_rng(3).choice(WORDS, size=170))
    conv = lambda q: [  # noqa: E731
        {"role": "system", "content": prefix},
        {"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]},
    ]
    params = SamplingParams(temperature=0, max_tokens=12)
    llm = LLM(path, device="cpu", max_model_len=1024)
    first = llm.chat(conv("What color is it?"), params)[0]
    stats0 = llm.engine.stats()
    second = llm.chat(conv("How many things are there?"), params)[0]
    stats1 = llm.engine.stats()

    a, b = first.prompt_token_ids, second.prompt_token_ids
    common = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    assert common >= 200, f"shared prefix is only {common} tokens"
    shared_blocks = common // 16
    assert stats1.prefix_cache_hits - stats0.prefix_cache_hits == shared_blocks * 16
    assert second.num_cached_tokens == shared_blocks * 16
    assert stats1.vision_runs == stats0.vision_runs == 1, "the same image must not be encoded twice"

    uncached = LLM(path, device="cpu", max_model_len=1024, enable_prefix_caching=False)
    assert (
        second.outputs[0].token_ids
        == uncached.chat(conv("How many things are there?"), params)[0].outputs[0].token_ids
    )
    _assert_all_blocks_released(llm)


@pytest.fixture(scope="module")
def w8_llm(demo_dir):
    return LLM(str(demo_dir("w8")), device="cpu", max_model_len=512)


def test_seed_reproducible_whatever_the_batch(w8_llm):
    """A seeded request samples the same tokens alone and inside a batch of others."""
    msg = [{"role": "user", "content": "tell me about the red house"}]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = w8_llm.chat(msg, seeded)[0].outputs[0].token_ids
    others = [[{"role": "user", "content": f"word {w} " * (i + 1)}] for i, w in enumerate(WORDS[:5])]
    batch = w8_llm.chat(
        [*others[:2], msg, *others[2:]],
        [SamplingParams(temperature=1.0, max_tokens=16)] * 2
        + [seeded]
        + [SamplingParams(temperature=0.7, max_tokens=16)] * 3,
    )
    assert batch[2].outputs[0].token_ids == alone
    other_seed = w8_llm.chat(msg, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=4321))[0]
    assert other_seed.outputs[0].token_ids != alone


def test_top_k_one_is_greedy(w8_llm):
    msg = [{"role": "user", "content": "describe a blue bird"}]
    greedy = w8_llm.chat(msg, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    topk1 = (
        w8_llm.chat(msg, SamplingParams(temperature=1.3, top_k=1, max_tokens=16, seed=5))[0]
        .outputs[0]
        .token_ids
    )
    assert topk1 == greedy


def test_logprobs_match_reference_log_softmax(w8_llm, oracle):
    """Reported logprobs (chosen + top-5) equal log_softmax of transformers' logits."""
    messages = [{"role": "user", "content": "the green tree"}]
    out = w8_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, logprobs=5))[0]
    ref, inputs = oracle
    ids = inputs.build(messages, [])["input_ids"]
    full = torch.cat([ids, torch.tensor([out.outputs[0].token_ids])], dim=1)
    with torch.no_grad():
        lsm = ref(input_ids=full).logits[0].log_softmax(-1)
    n = ids.shape[1]
    for step, lp in enumerate(out.outputs[0].logprobs):
        row = lsm[n - 1 + step]
        assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
        vals, idx = row.topk(5)
        assert [t for t, _ in lp.top_logprobs] == idx.tolist()
        assert np.allclose([v for _, v in lp.top_logprobs], vals.tolist(), atol=1e-4)


def test_n_siblings_share_prompt_blocks(demo_dir):
    """n=3: three outputs; siblings reuse the first one's full prompt blocks."""
    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=512)
    messages = [{"role": "user", "content": " ".join(WORDS * 3)}]
    out = llm.chat(messages, SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=9))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "siblings should sample differently"
    full_blocks = (len(out.prompt_token_ids) - 1) // 16
    assert full_blocks >= 3
    assert llm.engine.stats().prefix_cache_hits == 2 * full_blocks * 16
    _assert_all_blocks_released(llm)


def test_stop_strings_and_stop_token_ids(w8_llm):
    msg = [{"role": "user", "content": "count the birds"}]
    base = w8_llm.chat(msg, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = w8_llm.chat(msg, SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.index(stop)]
    tok = base.token_ids[4]
    by_id = w8_llm.chat(msg, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0].outputs[0]
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tok
    assert base.finish_reason == "length"


def test_abort_frees_blocks_within_one_step(demo_dir):
    llm = LLM(str(demo_dir("w8")), device="cpu", max_model_len=512)
    core = llm.engine
    ids = llm.processor.process_chat(
        [{"role": "user", "content": "a long answer please " * 8}]
    ).prompt_token_ids
    core.add_request(EngineRequest("r1", ids, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)))
    for _ in range(6):  # prefill + a few decodes
        core.step()
    assert core.block_manager.num_used > 0
    outs = core.abort_request("r1")
    assert [o.finish_reason for o in outs] == ["abort"]
    assert core.block_manager.num_used == 0
    assert core.step() == []
    core.block_manager.check_invariants()


def test_requests_that_can_never_fit_are_rejected(demo_dir):
    """A context longer than the KV pool is refused at start (explicit) or capped (default),
    so no admitted request can outgrow the pool and stall the queue behind it."""
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        LLM(str(demo_dir("w8")), device="cpu", max_model_len=128, num_kv_blocks=4)
    llm = LLM(str(demo_dir("w8")), device="cpu", num_kv_blocks=8)  # 128 tokens: the context is capped
    core = llm.engine
    assert core.max_model_len == 128 and core.stats().max_model_len == 128
    with pytest.raises(RequestRejected, match="maximum context length"):
        core.add_request(EngineRequest("long", list(range(5, 200)), SamplingParams(max_tokens=4)))
    with pytest.raises(RequestRejected, match="exceeds"):
        core.add_request(EngineRequest("max", list(range(5, 50)), SamplingParams(max_tokens=100)))
    # no max_tokens: the rest of the (capped) context, which the pool can always hold
    core.add_request(
        EngineRequest(
            "rest", list(range(5, 50)), SamplingParams(temperature=0, ignore_eos=True, max_tokens=None)
        )
    )
    out = []
    for _ in range(200):
        out += [t for o in core.step() for t in o.new_token_ids]
        if not core.has_unfinished():
            break
    assert len(out) == 128 - 45 and not core.has_unfinished()
    pad = llm.config.image_token_id
    with pytest.raises(
        RequestRejected, match="image tokens"
    ):  # pads without an image must not crash the engine
        core.add_request(EngineRequest("pads", [5, pad, pad, 6], SamplingParams(max_tokens=4)))
    assert not core.scheduler.has_work()


def test_synthetic_model_runs_through_the_engine():
    """The benchmark's in-memory random model (here at demo-like shapes) serves requests."""
    import copy

    from server.engine.core import EngineArgs, EngineCore
    from server.model.synthetic import REAL_2B_CONFIG, random_model

    cfg = copy.deepcopy(REAL_2B_CONFIG)
    cfg["text_config"].update(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    cfg["text_config"]["rope_scaling"]["mrope_section"] = [12, 10, 10]
    cfg["vision_config"].update(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=256,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    cfg.update(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    model = random_model(cfg, bits=4, device="cpu", dtype=torch.float32)
    assert model.layers[0].qkv_proj.qweight.bits == 4
    core = EngineCore(EngineArgs(device="cpu", max_model_len=256, num_kv_blocks=32), model=model)
    core.add_request(
        EngineRequest("s", list(range(10, 60)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    )
    tokens = []
    for _ in range(20):
        tokens += [t for o in core.step() for t in o.new_token_ids]
        if not core.has_unfinished():
            break
    assert len(tokens) == 5 and all(0 <= t < 512 for t in tokens)


def test_preemption_victim_is_the_newest_sequence(demo_dir):
    """Under KV pressure the newest request gives way (here: the requester itself), so the
    oldest request is never evicted by a newer one and finishes first."""
    llm = LLM(str(demo_dir("w8")), device="cpu", num_kv_blocks=5, block_size=4, enable_prefix_caching=False)
    core = llm.engine
    preempted: list[str] = []
    real = core.scheduler._preempt

    def spy(seq):
        preempted.append(seq.request_id)
        real(seq)

    core.scheduler._preempt = spy
    sp = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    core.add_request(EngineRequest("old", [10, 11, 12, 13, 14, 15], sp))
    core.add_request(EngineRequest("new", [20, 21, 22], sp))
    finished: list[str] = []
    for _ in range(300):
        finished += [o.request_id for o in core.step() if o.finish_reason]
        if not core.has_unfinished():
            break
    assert preempted and "old" not in preempted
    assert finished == ["old", "new"]
    _assert_all_blocks_released(llm)


def test_encoder_cache_eviction_during_a_request_is_safe(demo_dir):
    """A one-byte encoder cache evicts on every store: a request with a cached image plus a
    new one must still be served (a lost cache hit once crashed the engine)."""
    path = str(demo_dir("w8"))
    a, b = _image(64, 96, 21), _image(80, 40, 22)
    first = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "one"}]}]
    both = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b}]}]
    params = SamplingParams(temperature=0, max_tokens=6)
    tiny = LLM(path, device="cpu", max_model_len=512, encoder_cache_bytes=1)
    tiny.chat(first, params)
    got = tiny.chat(both, params)[0].outputs[0].token_ids
    roomy = LLM(path, device="cpu", max_model_len=512)
    assert got == roomy.chat(both, params)[0].outputs[0].token_ids


def test_chunks_encode_only_the_images_they_overlap(demo_dir, oracle):
    """Four images in one prompt, prefilled in 8-token chunks with a one-entry encoder
    cache: each image runs through the vision tower once (a chunk encodes only the images it
    overlaps, and an image split across chunks stays cached), and the greedy output equals
    transformers'."""
    path = str(demo_dir("w8"))
    images = [_image(64, 96, 31), _image(40, 120, 32), _image(96, 64, 33), _image(56, 56, 34)]
    content = [{"type": "image"}, {"type": "text", "text": "and"}] * 4 + [{"type": "text", "text": "compare"}]
    messages = [{"role": "user", "content": content}]
    llm = LLM(path, device="cpu", max_model_len=1024, max_num_batched_tokens=8, encoder_cache_bytes=1)
    out = llm.chat(with_inline_images(messages, images), SamplingParams(temperature=0, max_tokens=8))[0]
    assert llm.engine.runner.vision_runs == 4
    assert len(out.prompt_token_ids) > 6 * 8, "the prompt should need many chunks"
    eos = llm.processor.eos_token_ids
    assert out.outputs[0].token_ids == _reference_greedy(oracle, messages, images, 8, eos)
    _assert_all_blocks_released(llm)


def test_warm_up_runs_every_step_shape_without_touching_the_pool(demo_dir):
    """The start-up sweep (on CUDA, so no kernel compiles and no qmatmul M bucket is tuned
    mid-traffic): each prefill size over no context and as the tail of a max_model_len one,
    decodes of 1, 2, 4, ... up to max_num_seqs rows and one at max_model_len, two images;
    every chunk on block 0 only, the block manager untouched; the engine then serves, and its
    greedy output equals a fresh engine's (the garbage in block 0 is overwritten before read)."""
    kw = dict(device="cpu", max_num_batched_tokens=300, num_kv_blocks=40, max_model_len=512, max_num_seqs=6)
    llm = LLM(str(demo_dir("w8")), **kw)
    runner = llm.engine.runner
    calls: list[tuple[int, int]] = []  # (tokens, longest context) of each forward
    hook = llm.engine.model.register_forward_hook(
        lambda _m, args, _o: calls.append((args[0].shape[0], args[3].max_seq_len))
    )
    vision: list[int] = []
    vhook = llm.engine.model.visual.register_forward_hook(
        lambda _m, args, _o: vision.append(args[0].shape[0])
    )
    sizes = powers_of_two_to(300)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    runner.warm_up(sizes, max_num_seqs=6, max_model_len=512, images=True)
    hook.remove()
    vhook.remove()
    prefills = [c for m in sizes for c in ((m, m), (m, 512))]
    decodes = [(b, 1) for b in (1, 2, 4, 6)] + [(1, 512)]
    assert calls == prefills + decodes
    assert vision == [4, 64]  # patches of a 1-token and a 16-token image (merge 2 x 2)
    assert llm.engine.block_manager.num_used == 0
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["a b c", "the red cat sat on the mat " * 3]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    fresh = LLM(str(demo_dir("w8")), **kw)
    assert got == [o.outputs[0].token_ids for o in fresh.generate(prompts, params)]


def test_tiny_temperature_is_greedy(w8_llm):
    """temperature 1e-40 would overflow logits / t (NaN probabilities): it is treated as greedy."""
    msg = [{"role": "user", "content": "a small blue bird"}]
    greedy = w8_llm.chat(msg, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert w8_llm.chat(msg, SamplingParams(temperature=1e-40, max_tokens=8))[0].outputs[0].token_ids == greedy
