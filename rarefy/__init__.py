"""rarefy: capture a model as a graph, compress it with verified passes, lower it to
ONNX Runtime or Triton. See README.md and ``rarefy passes``."""
from . import passes
from .api import optimize
from .backends import compile_graph as compile
from .backends.onnx_decoder import export_decoder
from .backends.onnx_lowering import export_onnx
from .dynamo import dynamo_backend
from .generate import generate
from .ir import Calibration, Graph, capture, load
from .ir.causal_lm import capture_causal_lm
from .ir.decoder import capture_decoder
from .ir.errors import (CalibrationError, CaptureError, InputMismatchError, LoadError, PassError, RarefyError,
                        RecipeError, UnsupportedError, VerificationError)
from .passes.report import Report
from .recipe import Recipe

__version__ = "0.1.0"
__all__ = [
    "capture", "capture_causal_lm", "capture_decoder", "generate", "load", "optimize", "compile", "export_onnx",
    "export_decoder", "Graph", "Report",
    "Recipe", "Calibration", "passes",
    "RarefyError", "CaptureError", "LoadError", "InputMismatchError", "UnsupportedError", "PassError",
    "VerificationError", "CalibrationError", "RecipeError", "dynamo_backend",
]
