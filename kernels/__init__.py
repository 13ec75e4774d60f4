"""Compute kernels for grace-serve: quantized weights, quantized matmul, attention, norms.

``kernels.reference`` holds the plain-torch twins (CPU path and test oracle); ``kernels.qmatmul``
(module), ``kernels.attention`` and ``kernels.norms`` the Triton kernels. This package never
imports ``server``.

Name clash, handled here: ``kernels.qmatmul`` is the dispatcher *function* (kernels/quant.py),
while kernels/qmatmul.py is a module of the same name. Importing a submodule for the first time
sets it as a package attribute, which would replace the function; so the Triton modules are
imported first and the function bound after. Reach the module with
``from kernels.qmatmul import ...`` or ``importlib.import_module("kernels.qmatmul")``.

Importing this package on a CPU-only torch build sets TRITON_INTERPRET=1 (unless set) so that
the Triton kernels run in the interpreter; see kernels/triton_utils.py.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:  # triton is Linux x86-64 only
    from kernels import attention, norms  # noqa: F401
    from kernels import qmatmul as _qmatmul_module  # noqa: F401

from kernels.quant import QuantizationError, QuantizedWeight, qmatmul, quantize

__all__ = ["QuantizationError", "QuantizedWeight", "qmatmul", "quantize"]
