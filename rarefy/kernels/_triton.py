"""``triton`` and ``triton.language``, or stand-ins when triton is not installed.

triton is an optional extra (``pip install 'rarefy[triton]'``). The kernel modules import
``triton`` / ``tl`` from here, so their pure-torch references (the CPU path of every backend
but triton, and the test oracles) import without it: the stand-in's decorators and configs do
nothing at import, and a kernel launched without triton raises an ImportError naming the extra.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False
    MISSING = "this kernel needs triton, an optional extra of rarefy: pip install 'rarefy[triton]'"

    class _MissingKernel:
        """What ``@triton.jit`` / ``triton.autotune`` give without triton: launching raises."""

        def __init__(self, fn=None):
            self.fn = fn

        def __getitem__(self, grid):
            raise ImportError(MISSING)

        def __call__(self, *args, **kwargs):
            raise ImportError(MISSING)

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **options):
            return _MissingKernel(fn) if callable(fn) else _MissingKernel

        @staticmethod
        def autotune(*args, **kwargs):
            return _MissingKernel

        @staticmethod
        def Config(*args, **kwargs):
            return (args, kwargs)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

    class _MissingLanguage:
        constexpr = object  # only ever an annotation

        def __getattr__(self, name):
            raise ImportError(MISSING)

    triton, tl = _MissingTriton(), _MissingLanguage()
