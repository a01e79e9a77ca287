"""The IR: capture and load, the Graph wrapper, sites, structure and calibration."""
from . import ops  # registers the rarefy dialect
from .calibration import Calibration
from .capture import capture
from .errors import (CalibrationError, CaptureError, InputMismatchError, LoadError, PassError, RarefyError,
                     RecipeError, UnsupportedError, VerificationError)
from .graph import Graph
from .onnx_dialect import load
