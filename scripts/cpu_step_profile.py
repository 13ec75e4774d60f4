"""Where a batch-1 decode step goes on CPU: ours (EngineCore.step) or transformers' forward with
its KV cache, on the same checkpoint, with a torch.profiler table of the ops by self time.

    python scripts/cpu_step_profile.py ours /tmp/real-w8 --steps 8
    python scripts/cpu_step_profile.py transformers /tmp/real-w8 --steps 8

Run the two one after the other on a quiet machine (each loads the model in its own process:
~7 GB for the real shapes) and compare ms/step and the op tables; under load the numbers say
nothing (two compute threads on two cores: one descheduled thread stalls every op).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _ours(path: str) -> Callable[[], None]:
    from server.engine.core import EngineRequest
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(path)
    prompt = llm.processor.process_chat([{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    llm.engine.add_request(EngineRequest("profile", prompt.prompt_token_ids, params, prompt.images, []))
    return lambda: llm.engine.step() and None


def _transformers(path: str) -> Callable[[], None]:
    from transformers import AutoTokenizer, DynamicCache, Qwen3VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    state = {"ids": ids if torch.is_tensor(ids) else ids["input_ids"], "cache": DynamicCache()}

    @torch.inference_mode()
    def step() -> None:
        out = model(input_ids=state["ids"], past_key_values=state["cache"], use_cache=True)
        state["ids"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["cache"] = out.past_key_values

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["ours", "transformers"])
    ap.add_argument("path", help="checkpoint folder")
    ap.add_argument("--steps", type=int, default=8, help="profiled decode steps")
    ap.add_argument("--rows", type=int, default=25, help="ops in the table")
    a = ap.parse_args()
    step = _ours(a.path) if a.which == "ours" else _transformers(a.path)
    for _ in range(3):  # prefill, then two decode steps untimed
        step()
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    ms = [round(t * 1e3, 1) for t in times]
    print(
        f"{a.which}: ms per decode step {ms}, median {statistics.median(ms)} ({torch.get_num_threads()} threads)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
