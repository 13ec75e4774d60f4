"""The kernel budget of a decode step (server/engine/kernel_count.py), and the counter itself.

The budget is counted on a 2-layer build of the real 2B shapes and scaled to 28 layers; the
Triton launches are recorded without running them (execute=False: the interpreter would take
minutes at these shapes), which a small model shows counts the same as running them."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels import norms
from kernels import triton_utils as tu
from server.engine import kernel_count as kc
from server.model.synthetic import REAL_2B_CONFIG, random_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not tu.INTERPRET, reason="needs the Triton interpreter or a GPU"
)

# Kernels per decoder layer and per decode step of the 28-layer model (issue 11's goal:
# <= 8 per layer, <= 240 at batch 1, <= 260 at batch 64): met; lower them if fusions land.
PER_LAYER = {1: 8, 64: 8}
TOTAL = {1: 239, 64: 239}


@pytest.fixture(scope="module")
def real_shape_model():
    return kc.build_model(layers=2)


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_step_kernel_budget(real_shape_model, batch: int) -> None:
    count = kc.count_decode_step(real_shape_model, batch, execute=False)
    print(kc.format_table(count))
    assert count.per_layer_each == [count.per_layer] * 2  # every layer counts the same
    assert count.per_layer <= PER_LAYER[batch]
    assert count.total() <= TOTAL[batch]
    # the step's essentials are all seen: a GEMV/GEMM per linear, attention, logits, the
    # greedy pick (argmax on a GPU; on CPU, where this counts, max's indices: sampler.greedy_tokens)
    names = {name for _, _, name, _ in count.rows()}
    assert {"_attn_kernel", "aten.linear"} <= names
    assert {"aten.argmax", "aten.max"} & names
    assert "copy to device" in {kind for _, kind, _, _ in count.rows()}


def _small_model():
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
    cfg["vision_config"].update(depth=1, hidden_size=64, intermediate_size=128, num_heads=4)
    cfg["vision_config"].update(out_hidden_size=256, num_position_embeddings=64, deepstack_visual_indexes=[])
    return random_model(cfg, bits=8, dtype=torch.float32)


def test_recording_without_running_counts_what_running_does() -> None:
    model = _small_model()
    ran = kc.count_decode_step(model, 3, context=40, execute=True)
    dry = kc.count_decode_step(model, 3, context=40, execute=False)
    assert ran.counts == dry.counts
    assert ran.per_layer > 0 and ran.constant > 0


def test_counter_counts_kernels_not_views_allocations_or_host_work() -> None:
    dev = torch.randn(4, 8, dtype=torch.bfloat16)
    host = torch.randn(4, 8, dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    mode = kc._Counter([dev, weight])
    counts = mode.counts
    with torch.inference_mode(), kc._triton_launches(counts, mode, execute=True), mode:
        dev.view(8, 4).t().unsqueeze(0), dev.reshape(32)  # views: nothing
        dev.to(torch.bfloat16).contiguous()  # no-ops: nothing
        torch.empty(16)  # allocation: nothing
        (host * 2).sum()  # host work: nothing
        y = dev + 1  # one kernel, and its result lives on the device
        y.float()  # a dtype change is a kernel
        y.t().reshape(32)  # a reshape that must copy is one
        dev.copy_(host)  # an upload
        norms.rms_norm(y, weight, 1e-6)  # one Triton launch; its wrapper's allocations are not kernels
    assert counts == {
        (kc.OUTSIDE, "torch", "aten.add"): 1,
        (kc.OUTSIDE, "torch", "aten.to"): 1,
        (kc.OUTSIDE, "torch", "aten.reshape"): 1,
        (kc.OUTSIDE, "copy to device", "aten.copy_"): 1,
        (kc.OUTSIDE, "triton", "_rms_norm_kernel"): 1,
    }
