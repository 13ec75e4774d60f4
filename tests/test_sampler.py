"""The sampler's statistics and bookkeeping, on hand-made logits (fixed seeds: deterministic).

Each row draws one uniform from a key of (seed, sibling, position) and inverts the CDF: these
tests check that this samples the filtered, tempered distribution, that rows are independent
of the batch, and that logprobs are the ones asked for."""

from __future__ import annotations

import torch

from server.engine.sampler import SamplingInput, _noise_key, sample, uniform_draw
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import SequenceData

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def _rows(n: int, **params: object) -> list[SamplingInput]:
    data = SequenceData.from_prompt([1, 2, 3], [], torch.zeros(3, 3, dtype=torch.long), 0)
    return [SamplingInput(SamplingParams(seed=i, **params), data) for i in range(n)]  # type: ignore[arg-type]


def _frequencies(logits: torch.Tensor, n: int, **params: object) -> torch.Tensor:
    out = sample(logits.expand(n, -1).clone(), _rows(n, **params))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[-1]).float() / n


def _chi2(freq: torch.Tensor, expected: torch.Tensor, n: int) -> float:
    keep = expected > 0
    return float((n * (freq[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_draws_are_uniform_over_seeds_siblings_and_positions() -> None:
    """The per-row uniform draws: flat histograms along each key component, all in [0, 1),
    and neighbouring positions of one seed uncorrelated."""
    n = 20_000
    for key in (
        lambda i: _noise_key(i, 0, 0),  # seeds
        lambda i: _noise_key(42, i, 3),  # siblings
        lambda i: _noise_key(42, 0, i),  # positions
        lambda i: _noise_key(-i, 0, 0),  # negative seeds
    ):
        u = torch.tensor([uniform_draw(key(i)) for i in range(n)], dtype=torch.float64)
        assert float(u.min()) >= 0 and float(u.max()) < 1
        freq = torch.histc(u, bins=20, min=0, max=1) / n
        assert _chi2(freq, torch.full((20,), 1 / 20), n) < 45  # 19 degrees of freedom: p ~ 1e-3
        assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.03


def test_samples_follow_the_distribution() -> None:
    n = 20_000
    freq = _frequencies(PROBS.log(), n, temperature=1.0)
    assert _chi2(freq, PROBS, n) < 25, freq  # 5 degrees of freedom: p ~ 1e-4


def test_temperature_sharpens_the_distribution() -> None:
    n = 20_000
    want = PROBS**2 / (PROBS**2).sum()  # T = 0.5
    assert _chi2(_frequencies(PROBS.log(), n, temperature=0.5), want, n) < 25


def test_top_k_top_p_min_p_renormalize_what_they_keep() -> None:
    n = 20_000
    logits = PROBS.log()
    top2 = torch.zeros_like(PROBS)
    top2[:2] = PROBS[:2] / PROBS[:2].sum()
    assert _chi2(_frequencies(logits, n, top_k=2), top2, n) < 25
    # top_p 0.75: 0.4 + 0.25 = 0.65 < 0.75, so the third token (0.15) completes the nucleus
    top3 = torch.zeros_like(PROBS)
    top3[:3] = PROBS[:3] / PROBS[:3].sum()
    freq = _frequencies(logits, n, top_p=0.75)
    assert _chi2(freq, top3, n) < 25 and freq[3:].sum() == 0
    # min_p 0.3: keep tokens with p >= 0.3 * 0.4 = 0.12
    freq = _frequencies(logits, n, min_p=0.3)
    assert _chi2(freq, top3, n) < 25 and freq[3:].sum() == 0


def _expected(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The distribution a request asks for, written out plainly: temperature, then top-k, then
    the top-p nucleus of what top-k kept (renormalized), then min-p against the most likely
    token; renormalize what is left."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept = order[: top_k or len(order)]
    mass = probs[kept].sum()
    total = 0.0
    for tok in kept.tolist():
        if total >= top_p and keep.any():
            break
        keep[tok] = True
        total += float(probs[tok] / mass)
    keep &= probs >= min_p * probs.max()
    keep[order[0]] = True
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def test_filter_combinations_sample_the_filtered_distribution() -> None:
    """Temperature x top-k x top-p x min-p together: the frequencies over 12,000 seeded draws
    match the plainly written distribution (and tokens outside it never appear)."""
    n = 12_000
    logits = torch.tensor([2.0, 1.6, 1.2, 1.0, 0.5, 0.2, -0.5, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        for top_k, top_p, min_p in (
            (0, 0.6, 0.0),
            (5, 0.9, 0.0),
            (5, 0.6, 0.1),
            (3, 1.0, 0.3),
            (0, 1.0, 0.2),
        ):
            params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
            want = _expected(logits, **params)
            freq = _frequencies(logits, n, **params)
            assert freq[want == 0].sum() == 0, params
            dof = int((want > 0).sum()) - 1
            assert _chi2(freq, want, n) < 20 + 4 * dof, (params, freq, want)


def test_seeded_rows_do_not_depend_on_the_batch_and_unseeded_vary() -> None:
    logits = torch.randn(1, 1000)
    rows = _rows(6, temperature=1.0)
    batch = sample(logits.expand(6, -1).clone(), rows).token_ids
    alone = [sample(logits.clone(), [r]).token_ids[0] for r in rows]
    assert batch == alone and len(set(batch)) > 1
    data = rows[0].data
    free = [SamplingInput(SamplingParams(temperature=1.0), data) for _ in range(20)]
    assert len(set(sample(logits.expand(20, -1).clone(), free).token_ids)) > 5


def test_seeded_row_ignores_batch_mates_with_other_filters() -> None:
    """A seeded row's token is the same alone and next to rows using top-k / top-p / min-p
    (or none): which path samples a row depends only on its own parameters."""
    logits = torch.randn(4, 2000, generator=torch.Generator().manual_seed(9))
    data = SequenceData.from_prompt([1, 2], [], torch.zeros(3, 2, dtype=torch.long), 0)
    plain = SamplingInput(SamplingParams(temperature=1.0, seed=5), data)
    nucleus = SamplingInput(SamplingParams(temperature=1.0, seed=6, top_p=0.8), data)
    mates = [
        SamplingInput(SamplingParams(temperature=0.7, seed=1, top_k=5), data),
        SamplingInput(SamplingParams(temperature=0), data),
        SamplingInput(SamplingParams(temperature=1.3, seed=2, min_p=0.1), data),
    ]
    for seed in range(40):  # many draws: a path switch would change most of them
        plain.params.seed, nucleus.params.seed = seed, 1000 + seed
        alone = [
            sample(logits[:1].clone(), [plain]).token_ids[0],
            sample(logits[1:2].clone(), [nucleus]).token_ids[0],
        ]
        mixed = sample(logits.clone(), [plain, nucleus, mates[0], mates[2]]).token_ids
        assert mixed[:2] == alone, seed
        mixed = sample(logits[[0, 1, 2]].clone(), [plain, nucleus, mates[1]]).token_ids
        assert mixed[:2] == alone, seed


def test_logprobs_per_row_count_and_values() -> None:
    """Rows ask 0, 3, none and 20 alternatives; each gets exactly that, in order, with the
    log-softmax values of the raw logits; greedy and sampled rows mixed."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    data = SequenceData.from_prompt([1], [], torch.zeros(3, 1, dtype=torch.long), 0)
    rows = [
        SamplingInput(SamplingParams(temperature=0, logprobs=0), data),
        SamplingInput(SamplingParams(temperature=0.7, seed=1, logprobs=3), data),
        SamplingInput(SamplingParams(temperature=0), data),
        SamplingInput(SamplingParams(temperature=1.0, seed=2, logprobs=20), data),
    ]
    out = sample(logits.clone(), rows)
    ref = logits.log_softmax(-1)
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    assert out.logprobs[2] is None
    for i, k in ((0, 0), (1, 3), (3, 20)):
        chosen_lp, top = out.logprobs[i]
        assert abs(chosen_lp - ref[i, out.token_ids[i]].item()) < 1e-6
        assert len(top) == k
        vals, ids = ref[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in top] == ids.tolist()
        assert all(abs(v - w) < 1e-6 for (_, v), w in zip(top, vals.tolist()))


def _penalties_per_row(logits: torch.Tensor, rows: list[SamplingInput]) -> torch.Tensor:
    """The plain per-row reference (the sampler's former implementation)."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(t for t in set(r.data.token_ids) if t < vocab), dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.data.num_output_tokens:
            out_ids = torch.tensor([t for t in r.data.output_token_ids if t < vocab], dtype=torch.long)
            counts = torch.zeros_like(logits[i]).scatter_add_(
                0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype)
            )
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return logits


def _random_penalty_rows(g: torch.Generator, n: int, vocab: int) -> list[SamplingInput]:
    rows = []
    for i in range(n):
        prompt = torch.randint(0, vocab + 4, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        data = SequenceData.from_prompt(prompt.tolist(), [], torch.zeros(3, len(prompt), dtype=torch.long), 0)
        for t in torch.randint(
            0, vocab, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g
        ).tolist():
            data.append(t)
        kind = i % 4  # unpenalized rows share the batch with penalized ones
        params = SamplingParams(
            repetition_penalty=(1.0, 1.3, 1.0, 0.8)[kind],
            frequency_penalty=(0.0, 0.0, 0.5, 0.2)[kind],
            presence_penalty=(0.0, 0.0, 0.3, -0.4)[kind],
        )
        rows.append(SamplingInput(params, data))
    return rows


def test_batched_penalties_equal_the_per_row_reference_bit_for_bit() -> None:
    from server.engine.sampler import TokenCounts, apply_penalties

    g = torch.Generator().manual_seed(0)
    vocab = 64
    rows = _random_penalty_rows(g, 12, vocab)
    counts = TokenCounts(vocab, torch.device("cpu"))  # kept across steps, as the engine does
    for step in range(6):
        logits = torch.randn(len(rows), vocab, generator=g) * 4
        assert torch.equal(apply_penalties(logits.clone(), rows, counts), _penalties_per_row(logits, rows)), (
            step
        )
        assert torch.equal(
            apply_penalties(logits.clone(), rows), _penalties_per_row(logits, rows)
        )  # fresh counts
        before = counts.tokens_added
        for r in rows:
            r.data.append(int(torch.randint(0, vocab, (1,), generator=g)))
        apply_penalties(logits.clone(), rows, counts)
        assert counts.tokens_added - before == len(rows)  # one new token per row, not the history


def test_penalized_min_tokens_batch_samples_as_row_by_row() -> None:
    g = torch.Generator().manual_seed(1)
    vocab = 64
    rows = _random_penalty_rows(g, 8, vocab)
    for i, r in enumerate(rows):
        r.params.min_tokens = 100 if i % 2 else 0
        r.params.temperature = 0.0  # greedy: comparable token for token
        r.stop_token_ids = frozenset({3, 7, 200})
    logits = torch.randn(len(rows), vocab, generator=g) * 4
    batch = sample(logits.clone(), rows).token_ids
    alone = [sample(logits[i : i + 1].clone(), [r]).token_ids[0] for i, r in enumerate(rows)]
    assert batch == alone
    masked = torch.tensor([2, 3, 7]).expand(8, -1)
    assert all(batch[i] not in (3, 7) for i in range(1, 8, 2))
    expected = _penalties_per_row(logits, rows)
    expected[1::2].scatter_(1, masked[1::2][:, 1:], float("-inf"))
    assert batch == expected.argmax(-1).tolist()  # greedy: the penalized, masked argmax


def test_greedy_tokens_are_argmax_also_on_ties_infinities_and_nan() -> None:
    """greedy_tokens (max's indices, faster on CPU) picks what argmax picks: the first
    maximum. Tried: many ties (values in {0, 1, 2}) over odd widths that cross vector and
    thread chunks, -inf columns, bf16-rounded rows, an all--inf row, NaN (argmax's NaN wins)."""
    from server.engine.sampler import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for width in (1, 7, 33, 512, 4099, 151_936):
        x = torch.randint(0, 3, (5, width), generator=g).float()
        x[1, ::3] = float("-inf")
        x[2] = x[2].bfloat16().float()
        x[3] = float("-inf")
        if width > 5:
            x[4, width // 2] = float("nan")
        assert torch.equal(greedy_tokens(x), x.argmax(-1)), width


def test_cpu_nucleus_probe_picks_what_the_full_sort_picks(monkeypatch) -> None:
    """On CPU a filtered row samples over its top NUCLEUS_PROBE logits when every token its
    filters keep is there: the same token as the full sort for the same draw. Tried: peaked
    rows (the probe holds the nucleus), peaks with a heavy tail, flat rows (they fall back),
    top-p, top-k inside and beyond the probe, min-p, combinations; both paths must run."""
    from server.engine import sampler

    g = torch.Generator().manual_seed(3)
    width, n = 8192, 96
    logits = torch.randn(n, width, generator=g)
    logits[::3, :20] += torch.linspace(12, 4, 20)  # peaked rows,
    logits[1::3, :20] += torch.linspace(9, 6, 20)  # a heavy tail beside the peak,
    # and flat rows
    configs = [
        {"top_p": 0.9},
        {"top_k": 40},
        {"top_k": 200},
        {"min_p": 0.05},
        {"top_p": 0.95, "top_k": 30},
        {"top_p": 0.6, "min_p": 0.02},
        {"top_k": 200, "top_p": 0.6},  # normalized over its top-k, wider than the probe
    ]
    data = SequenceData.from_prompt([1, 2, 3], [], torch.zeros(3, 3, dtype=torch.long), 0)
    rows = [
        SamplingInput(SamplingParams(temperature=0.9, seed=i, **configs[i % len(configs)]), data)  # type: ignore[arg-type]
        for i in range(n)
    ]
    full_sorts: list[int] = []
    real = sampler._filtered_sorted_probs

    def counted(x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full_sorts.append(x.shape[0])
        return real(x, *rest)

    monkeypatch.setattr(sampler, "_filtered_sorted_probs", counted)
    monkeypatch.setattr(sampler, "NUCLEUS_PROBE", 64)
    probed = sample(logits.clone(), rows).token_ids
    assert 0 < sum(full_sorts) < n, f"both paths should run: {full_sorts} of {n} rows fell back"
    flat = [i for i in range(n) if i % 3 == 2 and "top_k" not in configs[i % len(configs)]]
    flat = [i for i in flat if "min_p" not in configs[i % len(configs)]]
    flat_probed = sample(logits[flat].clone(), [rows[i] for i in flat]).token_ids  # sorts at once
    monkeypatch.setattr(sampler, "NUCLEUS_PROBE", width)  # vocab <= 2 x probe: no probe
    assert sample(logits.clone(), rows).token_ids == probed
    assert flat_probed == [probed[i] for i in flat]
