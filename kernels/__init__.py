"""Compute kernels for grace-serve: quantized weights, quantized matmul, attention, norms.

``kernels.reference`` holds the plain-torch twins (CPU path and test oracle). This package never
imports ``server``.
"""

from kernels.quant import QuantizationError, QuantizedWeight, qmatmul, quantize

__all__ = ["QuantizationError", "QuantizedWeight", "qmatmul", "quantize"]
