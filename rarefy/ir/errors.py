"""Errors raised by rarefy. Each names what failed and where, never a bare traceback."""


class RarefyError(Exception):
    """Base class of every error rarefy raises on purpose."""


class CaptureError(RarefyError):
    """A model could not be captured as a graph; the message names the module and the reason."""


class LoadError(RarefyError):
    """A file could not be read as a model (missing, truncated, corrupt, wrong format)."""


class InputMismatchError(RarefyError, TypeError):
    """Inputs given to a graph do not match the signature it was captured with."""


class UnsupportedError(RarefyError):
    """An op, shape, dialect or model that a pass or backend does not handle; names both."""


class PassError(RarefyError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(RarefyError):
    """An exact pass changed the graph's outputs beyond its stated tolerance."""


class CalibrationError(RarefyError, ValueError):
    """Calibration data is missing, empty, or not finite."""


class RecipeError(RarefyError, ValueError):
    """A recipe names an unknown pass or gives it arguments it does not take."""


class ArgumentError(RecipeError, UnsupportedError):
    """A pass or a pipeline got an argument of the wrong type, outside its range or unknown;
    the message names the pass (or function), the argument, what it takes and what came.
    A RecipeError (a recipe can carry the value) and an UnsupportedError (no pass handles it)."""


class WriteError(RarefyError, OSError):
    """A file could not be written (a full disk, no permission, a file in the way); the message
    names the path and nothing partial is left behind. Also an OSError, with its ``errno``."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
