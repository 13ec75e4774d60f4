"""Next-token selection for a batch of sequences, vectorized over the batch.

Random draws are keyed by (seed, sequence, output position) through an exponential race
(argmax p / E with E ~ Exp(1) is a sample from p), so a seeded request gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runner import SequenceData
from .sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1
GREEDY_BELOW = 1e-5


@dataclass
class SamplingInput:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    data: SequenceData  # all token ids (prompt + output) without copies
    sample_index: int = 0  # which of the n siblings
    stop_token_ids: frozenset[int] = frozenset()  # EOS ids + params.stop_token_ids, for min_tokens


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the chosen token, [(token id, logprob)] top alternatives) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _noise_key(seed: int, sample_index: int, position: int) -> int:
    # splitmix-style mix so nearby (seed, position) pairs give unrelated streams
    z = (
        seed * 0x9E3779B97F4A7C15 + sample_index * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB
    ) & _MASK64
    z ^= z >> 31
    return z & _MASK64


def _exponential(vocab: int, key: int | None, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    if key is None:
        g.seed()
    else:
        g.manual_seed(key)
    return torch.empty(vocab).exponential_(generator=g).to(device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingInput]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, as in vLLM."""
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.data.token_ids)), dtype=torch.long)
            seen = seen[seen < vocab].to(logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.data.num_output_tokens:
            counts = torch.bincount(torch.tensor(r.data.output_token_ids), minlength=vocab)[:vocab].to(logits)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return logits


def _filter(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask tokens outside top-k / top-p nucleus / min-p to -inf (rows independent)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    cum_before = probs.cumsum(-1) - probs
    drop |= cum_before >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, rows: list[SamplingInput]) -> SampleResult:
    """logits [B, V] fp32 for the next token of each row -> chosen ids (+ logprobs)."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(-1) if any(r.params.logprobs is not None for r in rows) else None
    logits = apply_penalties(logits.clone(), rows)
    for i, r in enumerate(rows):  # min_tokens: no stopping token before the minimum
        if r.params.min_tokens and r.data.num_output_tokens < r.params.min_tokens and r.stop_token_ids:
            ids = torch.tensor(sorted(r.stop_token_ids), device=logits.device)
            logits[i, ids[ids < logits.shape[-1]]] = float("-inf")

    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=dev)
    greedy = temps < GREEDY_BELOW  # tiny temperatures overflow logits / t: treat them as greedy
    chosen = logits.argmax(-1)
    if not bool(greedy.all()):
        top_k = torch.tensor([r.params.top_k for r in rows], device=dev)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        probs = _filter(scaled, top_k, top_p, min_p).softmax(-1)
        noise = torch.stack(
            [
                _exponential(
                    logits.shape[-1],
                    None
                    if r.params.seed is None
                    else _noise_key(r.params.seed, r.sample_index, r.data.num_output_tokens),
                    dev,
                )
                for r in rows
            ]
        )
        sampled = (probs / noise).argmax(-1)
        chosen = torch.where(greedy, chosen, sampled)

    token_ids = chosen.tolist()
    out_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, r in enumerate(rows):
        if r.params.logprobs is None or raw_logprobs is None:
            out_logprobs.append(None)
            continue
        lp = raw_logprobs[i]
        top: list[tuple[int, float]] = []
        if r.params.logprobs:
            vals, idx = lp.topk(r.params.logprobs)
            top = list(zip(idx.tolist(), vals.tolist()))
        out_logprobs.append((float(lp[token_ids[i]]), top))
    return SampleResult(token_ids, out_logprobs)
