"""grace-serve: a dedicated-endpoint server for the GRACE-distilled Qwen3-VL-2B.

`from server import LLM, SamplingParams` for offline use. Imports are lazy so the API
process does not pay for the model code until it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from server.engine.llm import LLM, CompletionOutput, RequestOutput
    from server.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "CompletionOutput", "RequestOutput"):
        from server.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from server.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
