"""The integer runtime: what a calibrated model runs on after it is saved and loaded.

A fake-quant model (quant/) keeps float weights and re-quantizes them on every call: it is the
instrument calibration and evaluation use. The runtime form holds the integer weights only and
calls integer kernels (oneDNN's int8 convolution and linear on x86 CPUs), computing what the
simulated model computes up to float accumulation order. Pure torch: nothing here knows diffusers.
"""

from .convert import RUNTIMES, RuntimeReport, check_runtime, is_integer_runtime, runtime_weight_nbytes, to_integer_runtime
from .kernels import onednn_available
from .layers import IntegerConv2d, IntegerLayer, IntegerLinear

__all__ = ["RUNTIMES", "IntegerConv2d", "IntegerLayer", "IntegerLinear", "RuntimeReport", "check_runtime",
           "is_integer_runtime", "onednn_available", "runtime_weight_nbytes", "to_integer_runtime"]
