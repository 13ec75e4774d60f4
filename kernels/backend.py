"""The one rule for which kernels run: Triton or the plain-torch reference.

A requested backend is "auto" (Triton for CUDA tensors of a float dtype the kernels take,
when Triton is installed; the reference otherwise), "reference" or "triton" (forced: on CPU
it runs in the Triton interpreter). qmatmul, the model's layers and the engine all ask here.
"""

from __future__ import annotations

import functools
import importlib.util
import traceback
from pathlib import Path

import torch

BACKENDS = ("auto", "reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # cached: asked on every layer call


def check(requested: str, what: str = "kernel") -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown {what} backend {requested!r}; expected one of {BACKENDS}")
    return requested


def resolve(requested: str, device: torch.device | str) -> str:
    """The backend in effect on `device`: "triton" or "reference"."""
    if check(requested) != "auto":
        return requested
    return "triton" if torch.device(device).type == "cuda" and triton_installed() else "reference"


def use_triton(x: torch.Tensor, requested: str) -> bool:
    """Whether the op on `x` runs a Triton kernel ("auto" also needs a dtype the kernels take)."""
    if requested == "triton":
        return True
    return resolve(requested, x.device) == "triton" and x.dtype in TRITON_DTYPES


_PACKAGE_DIR = Path(__file__).resolve().parent
_NOT_KERNELS = {"backend.py", "quant.py", "reference.py"}  # the rule, the dispatcher, plain torch


def failing_kernel(exc: BaseException) -> str:
    """The Triton op an exception came out of, as "kernels.norms.rms_norm": the outermost
    frame in a Triton kernel module (the op the model called); "unknown" if none."""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if path.parent == _PACKAGE_DIR and path.name not in _NOT_KERNELS:
            return f"kernels.{path.stem}.{frame.name}"
    return "unknown"
