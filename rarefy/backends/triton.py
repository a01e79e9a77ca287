"""The Triton backend: the FX graph with every rarefy op swapped for its Triton kernel.

Kernels need triton (an optional extra: ``pip install 'rarefy[triton]'``) and a GPU, or
``TRITON_INTERPRET=1`` set before ``rarefy.kernels`` is first imported (the interpreter runs
them on CPU tensors, slowly: for correctness, not speed).
Ops without a kernel keep their torch reference, and ``kernels_used`` / ``fallbacks`` say
which is which.
"""
from __future__ import annotations

import copy
import os

import torch
from torch.utils import _pytree as pytree

from ..ir.errors import UnsupportedError
from ..ir.fx_utils import get_tensor, set_tensor
from ..ir.graph import Graph
from ..ir.ops import is_rarefy_op

KERNELS: dict = {}  # torch op overload -> "module:function" in rarefy.kernels


def triton_kernel(op, path: str) -> None:
    """Register the kernel that replaces ``op`` on the Triton backend."""
    KERNELS[op] = path


triton_kernel(torch.ops.rarefy.matmul_nbits.default, "rarefy.kernels.matmul_nbits:matmul_nbits")
triton_kernel(torch.ops.rarefy.linear_w8a8.default, "rarefy.kernels.int8_gemm:w8a8_linear")
triton_kernel(torch.ops.rarefy.linear_w8a8_tensor.default, "rarefy.kernels.int8_gemm:w8a8_tensor_linear")
triton_kernel(torch.ops.rarefy.cache_attention.default, "rarefy.kernels.kv_cache:cache_attention_triton")
triton_kernel(torch.ops.rarefy.kivi_attention.default, "rarefy.kernels.kv_cache:kivi_attention_triton")
triton_kernel(torch.ops.rarefy.linear_sparse24.default, "rarefy.kernels.sparse24:sparse24_matmul")
triton_kernel(torch.ops.rarefy.gather_tokens.default, "rarefy.kernels.token_gather:gather_tokens")


def _resolve(path: str):
    import importlib

    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def check_triton_available() -> None:
    from ..kernels._triton import AVAILABLE

    if not AVAILABLE:
        raise UnsupportedError("the triton backend needs triton, an optional extra of rarefy: "
                               "pip install 'rarefy[triton]' (the torch and onnxruntime backends run without it)")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise UnsupportedError(
        "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set in the environment before "
        "rarefy.kernels is imported (the interpreter runs the kernels on the CPU, for testing)"
    )


def _default_device() -> torch.device:
    """The GPU when there is one and the kernels are not interpreted, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


class TritonModule:
    """A compiled graph whose rarefy ops call Triton kernels.

    The graph's weights are copied to ``device`` (default: the GPU, or the CPU under the
    interpreter); input tensors are moved there on each call and outputs stay there."""

    backend = "triton"

    def __init__(self, graph: Graph, device: str | torch.device | None = None):
        if graph.dialect != "fx":
            raise UnsupportedError("the triton backend runs FX-dialect graphs (from rf.capture), not ONNX files")
        check_triton_available()
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UnsupportedError("the triton backend on the CPU needs TRITON_INTERPRET=1 set before rarefy.kernels "
                                   f"is imported (device={self.device})")
        self.signature = graph.signature
        self.module = copy.deepcopy(graph.fx).to(self.device)
        for node in self.module.graph.nodes:
            if node.op == "get_attr":  # constants that are neither parameters nor buffers
                value = get_tensor(self.module, node.target)
                if isinstance(value, torch.Tensor) and value.device != self.device:
                    set_tensor(self.module, node.target, value.to(self.device))
            # devices the capture recorded (aranges, mask casts, metadata asserts): this module's now
            node.args, node.kwargs = torch.fx.node.map_aggregate(
                (node.args, node.kwargs), lambda a: self.device if isinstance(a, torch.device) else a)
        self.kernels_used, self.fallbacks = [], []
        for node in self.module.graph.nodes:
            if node.op != "call_function" or not is_rarefy_op(node.target):
                continue
            if node.target in KERNELS:
                node.target = _resolve(KERNELS[node.target])
                self.kernels_used.append(node.target.__name__)
            else:
                self.fallbacks.append(str(node.target))
        self.module.recompile()

    def __call__(self, *args, **kwargs):
        self.signature.flatten(args, kwargs)  # same input checks as every backend
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))
        with torch.no_grad():
            return self.module(*args, **kwargs)
