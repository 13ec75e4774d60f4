"""The TTFT breakdown (metrics.TTFT_PARTS): its parts add up to time_to_first_token, per
request and over the real server stack (`python -m server --model demo` on 127.0.0.1)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from api_server import ServerProcess, data_url, image_bytes, scrape

from server.engine.messages import FirstTokenTimes
from server.metrics import TTFT_PARTS, Metrics, RequestMetrics, ttft_parts

PART_NAMES = [name for name, _ in TTFT_PARTS]
PREFIX = "grace_serve_"
TTFT = PREFIX + "time_to_first_token_seconds"
VISION = PREFIX + "request_vision_encode_seconds"


def _stamps(arrival: float = 10.0) -> FirstTokenTimes:
    t = FirstTokenTimes(
        received=arrival + 0.003, scheduled=arrival + 0.010, sampled=arrival + 0.050, vision_encode=0.02
    )
    t.sent, t.returned = arrival + 0.001, arrival + 0.051
    return t


def test_parts_are_the_gaps_between_stamps():
    parts = ttft_parts(10.0, _stamps(), 10.060)
    assert parts == pytest.approx([0.001, 0.002, 0.007, 0.040, 0.001, 0.009])
    assert sum(parts) == pytest.approx(0.060)


def test_a_missing_stamp_moves_its_gap_to_the_next_part():
    t = _stamps()
    t.returned = None
    parts = ttft_parts(10.0, t, 10.060)
    assert parts[4] == 0.0 and parts[5] == pytest.approx(0.010)
    assert sum(parts) == pytest.approx(0.060)


def test_request_metrics_observe_each_part_once_at_the_first_token():
    m = Metrics("demo", 4096)
    rm = RequestMetrics(m, arrival=0.0)  # every stamp precedes "now" (monotonic since boot)

    def delta(tokens: int, first: FirstTokenTimes | None) -> SimpleNamespace:
        return SimpleNamespace(num_prompt_tokens=5, num_cached_tokens=0, first_token=first,
                               completion_tokens=[tokens], deltas=[])  # fmt: skip

    rm.on_delta(delta(0, None))  # nothing sampled yet: nothing observed
    rm.on_delta(delta(1, _stamps(0.0)))
    rm.on_delta(delta(2, None))
    rm.finish(1)

    def sample(name: str) -> float:
        return m.registry.get_sample_value(PREFIX + name, {"model_name": "demo", "engine": "0"}) or 0.0

    assert sample("time_to_first_token_seconds_count") == 1
    for name in PART_NAMES:
        assert sample(name + "_count") == 1, name
    total = sum(sample(name + "_sum") for name in PART_NAMES)
    assert total == pytest.approx(sample("time_to_first_token_seconds_sum"))
    assert sample("request_prefill_time_seconds_sum") == pytest.approx(0.040)
    assert sample("request_vision_encode_seconds_sum") == pytest.approx(0.02)


# -- the real stack -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("ttft"), "--max-model-len", "1024", "--max-num-seqs", "4")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _histograms(url: str) -> dict[str, tuple[float, float]]:
    """(count, sum) of TTFT, each part and the vision time."""
    m = scrape(url)
    return {n: (m[PREFIX + n + "_count"], m[PREFIX + n + "_sum"]) for n in [*PART_NAMES, TTFT[len(PREFIX) :],
                                                                           VISION[len(PREFIX) :]]}  # fmt: skip


def _chat(url: str, content: str | list, stream: bool) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, "stream": stream}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


IMAGE = [
    {"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG", (96, 128), seed=7))}},
    {"type": "text", "text": "describe"},
]


@pytest.mark.parametrize(
    ("content", "stream", "with_image"),
    [("hello there", False, False), ("count to three", True, False), (IMAGE, True, True)],
    ids=["text", "text-stream", "image-stream"],
)
def test_parts_add_up_to_ttft_over_http(server, content, stream, with_image):
    before = _histograms(server.url)
    _chat(server.url, content, stream)
    after = _histograms(server.url)
    diff = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}
    for name, (count, total) in diff.items():
        assert count == 1, f"{name} observed {count} times for one request"
        assert total >= 0, f"{name} is negative: {total}"
    ttft = diff[TTFT[len(PREFIX) :]][1]
    parts = sum(diff[name][1] for name in PART_NAMES)
    assert abs(parts - ttft) <= 0.05 * ttft + 0.003, (parts, ttft, diff)
    vision = diff[VISION[len(PREFIX) :]][1]
    assert (vision > 0) == with_image, vision
    assert vision <= diff["request_prefill_time_seconds"][1]  # the tower runs inside the prefill


def test_pixels_cross_the_boundary_as_arrays_and_come_back_as_the_same_tensors():
    """Shorter transit into the engine: no torch shared-memory handoff for image pixels."""
    import pickle

    import numpy as np
    import torch

    from server.engine.client import _tensor_pixels, _wire_pixels
    from server.engine.messages import EngineRequest
    from server.engine.sampling_params import SamplingParams
    from server.model.images import ProcessedImage

    pixels = torch.rand(48, 1536)
    req = EngineRequest("r", [1, 2], SamplingParams(), [ProcessedImage(pixels, (1, 6, 8), "h")])
    wired = pickle.loads(pickle.dumps(_wire_pixels(req)))
    assert isinstance(wired.images[0].pixel_values, np.ndarray)
    back = _tensor_pixels(wired).images[0]
    assert isinstance(back.pixel_values, torch.Tensor) and torch.equal(back.pixel_values, pixels)
    assert (back.grid_thw, back.content_hash) == ((1, 6, 8), "h")
    text = EngineRequest("t", [1], SamplingParams())
    assert _wire_pixels(text) is text and _tensor_pixels(text) is text
