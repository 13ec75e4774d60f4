"""Write a random-weight checkpoint at the real Qwen3-VL-2B shapes in a GRACE release format.

    python scripts/real_shape_checkpoint.py /tmp/real-w8            # W8G128 QAT, ~7 GB
    python scripts/real_shape_checkpoint.py /tmp/real-w4 --bits 4

What the CPU memory / speed measurements serve (scripts/cpu_real_shape_bench.py). It is ~7 GB
and takes a few minutes and ~9 GB of RAM to write: never a CI fixture; write it outside the
repository. The files come from the demo writer itself (server/model/demo.py), run with the
real shapes (server/model/synthetic.py) and the training's pixel limits in place of the demo's;
the tokenizer is the demo's (a few hundred ids) under the real 151936-row vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.model import demo
from server.model.synthetic import REAL_2B_CONFIG

# GRACE training pixel limits (GRACE_FORMAT.md)
REAL_MIN_PIXELS = 784
REAL_MAX_PIXELS = 200704


class _RealVocabTokenizer:
    """The demo tokenizer, reporting the real vocabulary size so the writer sizes the
    embedding (151936 x 2048) as the real model's."""

    def __init__(self, tok: Any, vocab_size: int) -> None:
        self._tok, self._vocab_size = tok, vocab_size

    def get_vocab_size(self) -> int:
        return self._vocab_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def real_text_config() -> dict:
    t = REAL_2B_CONFIG["text_config"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "rms_norm_eps")
    return {k: t[k] for k in keys} | {"mrope_section": list(t["rope_scaling"]["mrope_section"])}


def real_vision_config() -> dict:
    v = dict(REAL_2B_CONFIG["vision_config"])
    v.pop("out_hidden_size")  # the writer sets it from the text width
    return v


@contextlib.contextmanager
def real_shapes() -> Iterator[None]:
    """The demo writer's module-level shapes swapped for the real ones while it runs."""
    saved = {k: getattr(demo, k) for k in ("DEMO_TEXT", "DEMO_VISION", "DEMO_MIN_PIXELS", "DEMO_MAX_PIXELS")}
    build = demo.build_tokenizer
    vocab = REAL_2B_CONFIG["text_config"]["vocab_size"]
    demo.DEMO_TEXT, demo.DEMO_VISION = real_text_config(), real_vision_config()
    demo.DEMO_MIN_PIXELS, demo.DEMO_MAX_PIXELS = REAL_MIN_PIXELS, REAL_MAX_PIXELS
    demo.build_tokenizer = lambda seed, *a, **kw: _RealVocabTokenizer(build(seed, *a, **kw), vocab)  # type: ignore[assignment]
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(demo, k, v)
        demo.build_tokenizer = build


def write_real_shape_checkpoint(out: Path, bits: int = 8, seed: int = 0) -> Path:
    with real_shapes():
        path = demo.write_demo_checkpoint(out, bits=bits, fmt="qat", seed=seed)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("grace_demo", None)  # not the demo: served by the rules for real checkpoints
    cfg["real_shape_random"] = {"seed": seed, "bits": bits}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write (outside the repository)")
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    repo, out = Path(__file__).resolve().parents[1], a.out.resolve()
    if out == repo or repo in out.parents:
        ap.error("write it outside the repository: it is ~7 GB")
    t0 = time.perf_counter()
    path = write_real_shape_checkpoint(a.out, a.bits, a.seed)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
