"""Compute kernels for grace-serve: quantized weights, quantized matmul, attention, norms.

``kernels.qmatmul`` (the function, kernels/quant.py) dispatches a quantized matmul to the Triton
kernels of ``kernels.qmatmul_triton`` or to the plain-torch twins of ``kernels.reference`` (CPU
path and test oracle); ``kernels.attention`` and ``kernels.norms`` hold the other Triton
kernels. This package never imports ``server``.

Importing this package imports the Triton modules, so their kernels are decorated now: on a
CPU-only torch build that sets TRITON_INTERPRET=1 (unless set) and the kernels run in the
interpreter; see kernels/triton_utils.py.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:  # triton is Linux x86-64 only
    from kernels import attention, norms, qmatmul_triton  # noqa: F401

from kernels.quant import QuantizationError, QuantizedWeight, qmatmul, quantize

__all__ = ["QuantizationError", "QuantizedWeight", "qmatmul", "quantize"]
