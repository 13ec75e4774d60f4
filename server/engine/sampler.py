"""Next-token selection for a batch of sequences, vectorized over the batch.

Sampling is by inverse CDF with one uniform draw per row, made on the host from a key of
(seed, sibling, output position), so a seeded request gets the same tokens whatever else
shares its batch, and the device does three passes over the logits (softmax, running sum,
search) whatever the batch.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import torch

from server.transfer import to_device

from .sampling_params import GREEDY_BELOW, SamplingParams
from .sequence import SequenceData
from .structured import GrammarState, apply_bitmask, fill_bitmask

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingInput:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    data: SequenceData  # all token ids (prompt + output) without copies
    sample_index: int = 0  # which of the n siblings
    stop_token_ids: frozenset[int] = frozenset()  # EOS ids + params.stop_token_ids, for min_tokens
    grammar: GrammarState | None = None  # its matcher, advanced to this row's last token
    # greedy with nothing to apply or report: the whole batch may take the argmax alone
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.plain = (
            p.temperature < GREEDY_BELOW
            and p.logprobs is None
            and not p.logit_bias
            and not p.min_tokens
            and self.grammar is None
            and not _penalized(self)
        )


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the chosen token, [(token id, logprob)] top alternatives) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _noise_key(seed: int, sample_index: int, position: int) -> int:
    """A 64-bit key per (seed, sibling, position): splitmix64's finalizer over their sum, so
    nearby triples give unrelated keys."""
    z = (
        seed * 0x9E3779B97F4A7C15 + sample_index * 0xD1B54A32D192ED03 + position * 0x8CB92BA72F3D8DD7
    ) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_unseeded = random.Random()  # draws of requests without a seed (seeded from os.urandom)


def uniform_draw(key: int) -> float:
    """A uniform draw in [0, 1) from a mixed 64-bit key (its top 53 bits)."""
    return (key >> 11) * 2.0**-53


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, the first maximum on ties. On CPU max's indices are the same ids
    (tests/test_sampler.py) ~3x faster than argmax (64 x 151,936: 2.1 vs 6.2 ms); a GPU
    keeps argmax (its speed there is not the question)."""
    return logits.max(-1).indices if logits.device.type == "cpu" else logits.argmax(-1)


def _penalized(r: SamplingInput) -> bool:
    p = r.params
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


class TokenCounts:
    """Per sequence, on the device: how often each token occurs in its output and which
    tokens its prompt holds, one row each, kept across steps. A step adds only the tokens
    appended since the last (one per row), so penalties cost no host work that grows with
    the sequence; the rows of a batch are one index_select away.

    A row is given back when its sequence is garbage (rows are taken per SequenceData; its
    tokens only ever grow, preemption keeps them)."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(0, vocab, device=device)
        self.in_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self._rows: weakref.WeakKeyDictionary[SequenceData, list[int]] = weakref.WeakKeyDictionary()
        self._free: list[int] = []
        self.tokens_added = 0  # tokens scattered in (a count for tests: one per row per step)

    def _take_row(self, data: SequenceData) -> list[int]:
        if not self._free:  # double the rows (rare: the batch grew past every earlier one)
            n = self.counts.shape[0]
            grow = max(8, n)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab)])
            self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(grow, self.vocab)])
            self._free += range(n + grow - 1, n - 1, -1)
        rec = [self._free.pop(), 0]  # [row, output tokens counted]
        self._rows[data] = rec
        weakref.finalize(data, self._free.append, rec[0])
        return rec

    def rows(self, datas: list[SequenceData]) -> torch.Tensor:
        """The rows of these sequences, brought up to date with their tokens: long [B]."""
        vocab = self.vocab
        rows: list[int] = []
        fresh: list[int] = []
        prompt_at: list[int] = []  # flat (row, token) indices
        output_at: list[int] = []
        for d in datas:
            rec = self._rows.get(d)
            if rec is None:
                rec = self._take_row(d)
                fresh.append(rec[0])
                base = rec[0] * vocab
                prompt_at += [base + t for t in set(d.prompt_token_ids) if t < vocab]
            row, counted = rec
            if d.num_output_tokens > counted:
                base = row * vocab
                new = d.token_ids[d.num_prompt_tokens + counted :]
                output_at += [base + t for t in new if t < vocab]
                rec[1] = d.num_output_tokens
            rows.append(row)
        dev = self.device
        if fresh:
            idx = to_device(fresh, dev, torch.long)
            self.counts.index_fill_(0, idx, 0.0)
            self.in_prompt.index_fill_(0, idx, False)
        if prompt_at:
            self.in_prompt.view(-1).index_fill_(0, to_device(prompt_at, dev, torch.long), True)
        if output_at:
            at = to_device(output_at, dev, torch.long)
            self.counts.view(-1).index_add_(0, at, torch.ones(len(output_at), device=dev))
            self.tokens_added += len(output_at)
        return to_device(rows, dev, torch.long)


def apply_penalties(
    logits: torch.Tensor, rows: list[SamplingInput], counts: TokenCounts | None = None
) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, as in vLLM,
    for the whole batch in a few tensor ops over its rows of `counts` (None: counted now)."""
    vocab, dev = logits.shape[-1], logits.device
    if counts is None or counts.vocab != vocab:
        counts = TokenCounts(vocab, dev)
    at = counts.rows([r.data for r in rows])
    out_counts = counts.counts.index_select(0, at)
    seen = counts.in_prompt.index_select(0, at) | (out_counts > 0)
    rep = to_device([r.params.repetition_penalty for r in rows], dev, logits.dtype)[:, None]
    freq = to_device([float(r.params.frequency_penalty) for r in rows], dev, logits.dtype)[:, None]
    pres = to_device([float(r.params.presence_penalty) for r in rows], dev, logits.dtype)[:, None]
    # x / 1 and x * 1 are x, and x - 0 is x: unpenalized rows come out unchanged
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - (freq * out_counts + pres * (out_counts > 0).to(logits))


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingInput]) -> None:
    """Every row's logit_bias in one index_add over the flattened (contiguous) logits."""
    vocab = logits.shape[-1]
    flat: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(rows):
        for t, v in (r.params.logit_bias or {}).items():
            if t < vocab:
                flat.append(i * vocab + t)
                vals.append(float(v))
    if flat:
        dev = logits.device
        logits.view(-1).index_add_(0, to_device(flat, dev, torch.long), to_device(vals, dev, logits.dtype))


def apply_grammars(logits: torch.Tensor, rows: list[SamplingInput]) -> None:
    """Forbidden tokens of every constrained row to -inf: one host mask fill for all of
    them, one copy, applied on the device."""
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    if constrained:
        states = [rows[i].grammar for i in constrained]
        mask = fill_bitmask(states, logits.shape[-1], logits.device)  # type: ignore[arg-type]
        apply_bitmask(logits, constrained, mask)


def _filtered_sorted_probs(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities in descending order with tokens outside top-k / the top-p nucleus / min-p
    set to 0 (not renormalized: the inverse CDF scales by each row's kept mass), and the
    token id of each sorted position."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    _drop_outside_nucleus(probs, drop, top_p, min_p)
    return probs.masked_fill_(drop, 0.0), order


def _drop_outside_nucleus(
    probs: torch.Tensor, drop: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> None:
    """Add to `drop` (in place) the sorted positions top-p and min-p leave out."""
    cum_before = probs.cumsum(-1) - probs
    drop |= cum_before >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0].fill_(False)  # the most likely token always survives


def _draws(rows: list[SamplingInput]) -> list[float]:
    """One uniform per row: keyed by (seed, sibling, position) when seeded, so a row's token
    never depends on what else is in the batch."""
    return [
        _unseeded.random()
        if r.params.seed is None
        else uniform_draw(_noise_key(r.params.seed, r.sample_index, r.data.num_output_tokens))
        for r in rows
    ]


def _inverse_cdf(probs: torch.Tensor, draws: list[float]) -> torch.Tensor:
    """Row i: the token where the cumulative probability first exceeds draws[i] x the row's
    total. fp64 running sums keep the rounding far below any probability worth sampling;
    zero-probability tokens can never be chosen."""
    cdf = probs.double().cumsum(-1)
    u = to_device(draws, probs.device, torch.float64) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


class PendingSample:
    """A sample launched on the device: `token_ids` stay there (the next step can read them
    without a round trip); `result()` waits only for this sample's copies to the host, which
    were queued right behind it, so work queued later keeps running."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        want_lp: list[int],
        top_counts: list[int],
    ) -> None:
        self.token_ids = token_ids
        self._want_lp, self._top_counts = want_lp, top_counts
        tensors = [token_ids, *(logprobs or ())]
        self._event: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            tensors = host
        self._host = tensors

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host[0].tolist()
        out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(token_ids)
        if self._want_lp:
            picked, top_vals, top_ids = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self._want_lp):
                k = self._top_counts[j]
                out[i] = (picked[j], list(zip(top_ids[j][:k], top_vals[j][:k])))
        return SampleResult(token_ids, out)


def sample(
    logits: torch.Tensor, rows: list[SamplingInput], counts: TokenCounts | None = None
) -> SampleResult:
    """logits [B, V] fp32 for the next token of each row -> chosen ids (+ logprobs)."""
    return sample_async(logits, rows, counts).result()


def _filtered(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def _sample_rows(logits: torch.Tensor, rows: list[SamplingInput], filtered: bool) -> torch.Tensor:
    """Sampled token per row (all rows alike: filtered or not). The path a row takes depends
    only on its own parameters, so a seeded row gets the same token whatever its batch-mates."""
    dev = logits.device
    temps = to_device([r.params.temperature for r in rows], dev, torch.float32)
    scaled = logits / temps[:, None]
    if not filtered:
        return _inverse_cdf(scaled.softmax(-1), _draws(rows))
    top_k = to_device([r.params.top_k for r in rows], dev, torch.long)
    top_p = to_device([r.params.top_p for r in rows], dev, torch.float32)
    min_p = to_device([r.params.min_p for r in rows], dev, torch.float32)
    draws = _draws(rows)
    if dev.type == "cpu" and scaled.shape[-1] > 2 * NUCLEUS_PROBE:
        return _sample_probed(scaled, top_k, top_p, min_p, draws)
    return _sample_sorted(scaled, top_k, top_p, min_p, draws)


def _sample_sorted(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, draws: list[float]
) -> torch.Tensor:
    probs, order = _filtered_sorted_probs(scaled, top_k, top_p, min_p)
    return order.gather(1, _inverse_cdf(probs, draws)[:, None])[:, 0]


# On CPU a filtered row first looks at its top NUCLEUS_PROBE logits: the full sort of 64 x
# 151,936 takes ~310 ms there, topk(1024) ~21 ms and a logsumexp ~16 ms. A GPU sorts
# instead: choosing per row would need the device's answer on the host (a sync per step).
NUCLEUS_PROBE = 1024


def _sample_probed(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, draws: list[float]
) -> torch.Tensor:
    """_filtered_sorted_probs + _inverse_cdf over each row's top NUCLEUS_PROBE logits where
    every token its filters keep is among them (top-k within the probe, or the probe's mass
    reaching top-p, or its last token below min-p): the same sorted prefix, so the same
    token for the same draw. Other rows (a flat distribution) take the full sort. Which
    path a row takes depends on its own logits only."""
    n, vocab = scaled.shape
    within_k = (top_k > 0) & (top_k <= NUCLEUS_PROBE)
    lse = scaled.logsumexp(-1)
    # the probe holds at most NUCLEUS_PROBE x the top probability: where that is short of
    # top-p in every row (a flat distribution, as random weights give), sort at once
    p_max = (scaled.amax(-1) - lse).exp()
    if not (within_k | (min_p > 0) | (NUCLEUS_PROBE * p_max >= top_p)).any():
        return _sample_sorted(scaled, top_k, top_p, min_p, draws)
    vals, ids = scaled.topk(NUCLEUS_PROBE, dim=-1)  # sorted, descending
    ranks = torch.arange(NUCLEUS_PROBE).expand(n, -1)
    drop = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
    # normalized as the full path does: over the top-k when it is set, else the whole row
    norm = torch.where(within_k, vals.masked_fill(drop, float("-inf")).logsumexp(-1), lse)
    probs = (vals - norm[:, None]).exp().masked_fill_(drop, 0.0)
    _drop_outside_nucleus(probs, drop, top_p, min_p)
    holds = within_k | ((top_p < 1.0) & (probs.sum(-1) >= top_p)) | ((min_p > 0) & drop[:, -1])
    holds &= (top_k == 0) | (top_k <= NUCLEUS_PROBE)  # a wider top-k normalizes beyond the probe
    flags = holds.tolist()
    probed = [i for i in range(n) if flags[i]]
    rest = [i for i in range(n) if not flags[i]]
    chosen = torch.empty(n, dtype=torch.long)
    if probed:
        at = torch.tensor(probed)
        pos = _inverse_cdf(probs.masked_fill_(drop, 0.0).index_select(0, at), [draws[i] for i in probed])
        chosen[at] = ids.index_select(0, at).gather(1, pos[:, None])[:, 0]
    if rest:
        at = torch.tensor(rest)
        chosen[at] = _sample_sorted(
            scaled.index_select(0, at), top_k[at], top_p[at], min_p[at], [draws[i] for i in rest]
        )
    return chosen


def sample_async(
    logits: torch.Tensor, rows: list[SamplingInput], counts: TokenCounts | None = None
) -> PendingSample:
    """Queue the sampling of each row's next token; nothing waits for the device.

    Every decision that depends only on the parameters is made on the host, and host data
    reaches the device through non-blocking copies; the device copies back only the chosen
    ids and the requested logprobs."""
    logits = logits.float()
    if all(r.plain for r in rows):  # the common batch: one argmax, no per-row passes
        return PendingSample(greedy_tokens(logits), None, [], [])
    dev = logits.device
    vocab = logits.shape[-1]
    want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    want_lp_idx = to_device(want_lp, dev, torch.long) if want_lp else None
    raw_logprobs = logits.index_select(0, want_lp_idx).log_softmax(-1) if want_lp_idx is not None else None
    biased = any(r.params.logit_bias for r in rows)
    constrained = any(r.grammar is not None for r in rows)
    if biased or constrained or any(_penalized(r) or r.params.min_tokens for r in rows):
        logits = logits.clone()  # the caller's logits stay as they were (a failed step retries)
    if biased:
        apply_logit_bias(logits, rows)
    if constrained:  # before penalties and filters: they then see only the allowed tokens
        apply_grammars(logits, rows)
    penalized = [i for i, r in enumerate(rows) if _penalized(r)]
    if penalized:
        at = to_device(penalized, dev, torch.long)
        part = apply_penalties(logits.index_select(0, at), [rows[i] for i in penalized], counts)
        logits = logits.index_copy(0, at, part)
    # min_tokens: no stopping token before the minimum, every such row in one index_fill.
    # Not for grammar rows: the grammar decides where the output may end (a complete
    # grammar allows only EOS, and masking it too would leave no token at all).
    stops = [
        i * vocab + t
        for i, r in enumerate(rows)
        if r.params.min_tokens and r.grammar is None and r.data.num_output_tokens < r.params.min_tokens
        for t in r.stop_token_ids
        if t < vocab
    ]
    if stops:  # not setitem: that may sync on a GPU
        logits.view(-1).index_fill_(0, to_device(stops, dev, torch.long), float("-inf"))

    # tiny temperatures overflow logits / t: those rows stay greedy
    sampled = [i for i, r in enumerate(rows) if r.params.temperature >= GREEDY_BELOW]
    chosen = greedy_tokens(logits) if len(sampled) < len(rows) else None
    for filtered in (False, True):
        group = [i for i in sampled if _filtered(rows[i].params) == filtered]
        if len(group) == len(rows):  # the whole batch alike: no gather, no scatter
            chosen = _sample_rows(logits, rows, filtered)
        elif group:
            idx = to_device(group, dev, torch.long)
            picked = _sample_rows(logits.index_select(0, idx), [rows[i] for i in group], filtered)
            if chosen is None:
                chosen = torch.empty(len(rows), dtype=torch.long, device=dev)
            chosen = chosen.index_copy(0, idx, picked)
    assert chosen is not None

    logprobs = None
    top_counts = [rows[i].params.logprobs or 0 for i in want_lp]
    if raw_logprobs is not None and want_lp_idx is not None:
        chosen_lp = raw_logprobs.gather(1, chosen.index_select(0, want_lp_idx)[:, None])[:, 0]
        vals, idx_top = raw_logprobs.topk(max(top_counts), dim=-1)  # k = 0 gives empty rows
        logprobs = (chosen_lp, vals, idx_top)
    return PendingSample(chosen, logprobs, want_lp, top_counts)
