"""The CPU path's paged attention (kernels/torch_attention.py: batched SDPA) against the
reference, on NaN-poisoned caches: a read of a slot a sequence does not own shows as NaN, a
wrong mask or GQA layout as an error far above the tolerance."""

from __future__ import annotations

import pytest
import torch
from paged_batches import SPECS, TOL, make_batch, rel_err

from kernels import reference, torch_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h_q", "h_kv", "d"), [(4, 2, 32), (6, 2, 24), (4, 4, 64), (16, 8, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_on_mixed_batches(dtype, h_q, h_kv, d, causal) -> None:
    # prefill, prefill over a prefix, decode, first token, chunk on a block boundary, padding
    args = make_batch(SPECS, h_q, h_kv, d, dtype, seed=h_q * 100 + d, pad_rows=3)
    scale = d**-0.5
    y = torch_attention.paged_attention(*args, scale, causal)
    ref = reference.paged_attention(*args, scale, causal)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    total = int(args[5][-1])
    assert (y[total:] == 0).all()  # padding rows zero, like the reference


def test_decode_batch_of_uneven_contexts_and_an_empty_sequence() -> None:
    # one-token rows of very different lengths padded together; a sequence with no new token
    args = make_batch([(200, 1), (1, 1), (17, 0), (33, 1), (64, 1)], 16, 8, 64, torch.float32, seed=3)
    y = torch_attention.paged_attention(*args, 0.1)
    assert rel_err(y, reference.paged_attention(*args, 0.1)) < TOL[torch.float32]


def test_a_sequence_past_its_table_is_refused() -> None:
    query, k, v, tables, seq_lens, qsl = make_batch([(40, 1)], 4, 2, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="sequence 0"):
        torch_attention.paged_attention(query, k, v, tables[:, :1], seq_lens, qsl, 0.2)


def test_decode_groups_bound_the_padding() -> None:
    """One long context among many short ones: the padded gather stays within twice the real
    tokens plus the slack (one group would gather 256 x 100k tokens); every row runs once."""
    lens = [100_000] + [20] * 255 + [5_000] * 8
    rows = list(range(len(lens)))
    groups = torch_attention.decode_groups(rows, lens)
    assert sorted(b for g in groups for b in g) == rows
    for g in groups:
        padded, real = len(g) * max(lens[b] for b in g), sum(lens[b] for b in g)
        assert padded <= 2 * real + torch_attention.PAD_SLACK_TOKENS
    assert len(groups) <= 3  # short rows still share a call
    assert torch_attention.decode_groups([0, 1, 2], [30, 40, 50]) == [[2, 1, 0]]


def test_grouped_decode_matches_reference(monkeypatch) -> None:
    # a tiny slack forces several groups on a small batch
    monkeypatch.setattr(torch_attention, "PAD_SLACK_TOKENS", 0)
    args = make_batch([(300, 1), (3, 1), (4, 1), (150, 1), (2, 1)], 8, 4, 32, torch.float32, seed=11)
    assert len(torch_attention.decode_groups([0, 1, 2, 3, 4], args[4].tolist())) > 1
    y = torch_attention.paged_attention(*args, 0.2)
    assert rel_err(y, reference.paged_attention(*args, 0.2)) < TOL[torch.float32]
