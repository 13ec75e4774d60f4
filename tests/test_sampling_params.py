"""The max-output-tokens rule, stated once in SamplingParams.max_output_tokens."""

from __future__ import annotations

from server.engine.sampling_params import SamplingParams


def test_max_output_tokens_is_max_tokens_within_the_context() -> None:
    assert SamplingParams(max_tokens=5).max_output_tokens(num_prompt=10, max_model_len=100) == 5
    assert SamplingParams(max_tokens=None).max_output_tokens(num_prompt=10, max_model_len=100) == 90
    # never past the context length, whatever max_tokens says
    assert SamplingParams(max_tokens=95).max_output_tokens(num_prompt=10, max_model_len=100) == 90
    assert SamplingParams(max_tokens=1).max_output_tokens(num_prompt=99, max_model_len=100) == 1
