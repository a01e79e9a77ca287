"""Kernel tests run under the Triton interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs,
i.e. before ``rarefy.kernels`` is imported; conftest files load first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
