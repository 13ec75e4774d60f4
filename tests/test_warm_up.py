"""No compile mid-traffic: every Triton specialization (the sm_90 binary a GPU would compile
for a launch, as kernels.build_check keys it) that mixed traffic launches was launched by the
engine's start-up warm-up first (runner.warm_up, as the engine runs it on CUDA).

CPU: the kernels run in the Triton interpreter; the recorder binds each launch's arguments
the way JITFunction.run would on a GPU (integer == 1 / % 16 keys, pointer alignment,
do_not_specialize), so what is compared is what a GPU would have compiled.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hf_reference import with_inline_images
from PIL import Image

from kernels import triton_utils as tu
from kernels.build_check import record_specializations
from server import LLM, SamplingParams
from server.engine.runner import powers_of_two_to

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not tu.INTERPRET,
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 before `import kernels`",
)

MAX_TOKENS, MAX_SEQS, MAX_LEN = 64, 4, 640


def _kernel(key: str) -> str:
    return key.split("'")[3]  # ('module', 'name', ...)


def _traffic(llm: LLM) -> None:
    """Short and long prompts (a ~520-token one in 64-token chunks: prefill over a long cached
    prefix, decode at a long context), an image, n = 2 with sampling, decode batches 1-4, a
    repeated prompt (prefix-cache hit: a prefill over cached blocks)."""
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=1, n=2, max_tokens=3, ignore_eos=True)
    long = "the red cat sat on a mat " * 50
    llm.generate(
        ["a b", "one two three four five six seven eight nine ten eleven", long], [greedy, sampled, greedy]
    )
    llm.generate(["a b"], greedy)  # prefix hit
    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    content = [{"type": "image"}, {"type": "text", "text": "what is it"}]
    llm.chat(with_inline_images([{"role": "user", "content": content}], [Image.fromarray(pixels)]), greedy)


def test_mixed_traffic_after_the_warm_up_launches_no_new_specialization(demo_dir) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(
        str(demo_dir("w8")),
        device=device,
        kernel_backend="triton",
        max_model_len=MAX_LEN,
        max_num_seqs=MAX_SEQS,
        max_num_batched_tokens=MAX_TOKENS,
        num_kv_blocks=120,
    )
    context = ["short"]  # which warm-up steps launch a key: those over a max_model_len context?
    llm.engine.model.register_forward_pre_hook(
        lambda _m, args: context.__setitem__(0, "long" if args[3].max_seq_len == MAX_LEN else "short")
    )
    with record_specializations(lambda: context[0]) as warm:
        llm.engine.runner.warm_up(powers_of_two_to(MAX_TOKENS), MAX_SEQS, MAX_LEN, images=True)
    with record_specializations() as traffic:
        _traffic(llm)
    assert {_kernel(k) for k in traffic} >= {"_attn_kernel", "_gemv_kernel", "_qk_norm_rope_kv_kernel"}
    new = traffic.keys() - warm.keys()
    assert not new, f"{len(new)} specializations first launched by traffic: {sorted(map(_kernel, new))}"

    # The check can fail: a warm-up without its long-context steps would miss the attention
    # plans that split a long context, which traffic's ~520-token prompt needs.
    only_long = {k for k, tags in warm.items() if tags == {"long"}}
    assert only_long & traffic.keys() and {_kernel(k) for k in only_long} == {"_attn_kernel"}
