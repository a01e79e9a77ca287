"""The call convention a graph was captured with, and the check that inputs match it.

A model is called with positional tensors, keyword tensors, or both; rarefy keeps the
pytree spec of ``(args, kwargs)`` and of the outputs, so every backend accepts the same
call and returns the same structure. Dimensions that were captured as dynamic are
``None`` in ``shapes``; every other dimension must match exactly. ONNX-dialect graphs (an
ONNX Runtime program) also take numpy arrays, checked like tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .errors import InputMismatchError


def split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs or a calibration batch into ``(args, kwargs)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, list):
        return tuple(inputs), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if hasattr(inputs, "keys") and hasattr(inputs, "__getitem__"):  # BatchEncoding and friends
        return (), {k: inputs[k] for k in inputs.keys()}
    raise InputMismatchError(
        f"inputs must be a tensor, a tuple of positional tensors or a dict of keyword tensors, "
        f"got {type(inputs).__name__}"
    )


def _from_numpy(name: str, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise InputMismatchError(f"input {name!r} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    return value


@dataclass
class Signature:
    """Names, dtypes and shapes of the flattened inputs, and the spec of the outputs."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int | None, ...]]
    in_spec: Any = None  # pytree spec of (args, kwargs); None for ONNX-dialect graphs
    out_spec: Any = None  # pytree spec of the outputs; None means a flat tuple

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """Flatten a call into input tensors in signature order, checking each one."""
        if self.in_spec is None:
            leaves = [_from_numpy(name, v) for name, v in zip(self.names, self._flatten_by_name(args, kwargs))]
        else:
            kwargs = self._order_kwargs(kwargs)
            leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
            if spec != self.in_spec:
                raise InputMismatchError(
                    f"inputs do not match the captured signature: expected {self.describe()}, "
                    f"got {len(args)} positional and keywords {sorted(kwargs)}"
                )
        for name, value, dtype, shape in zip(self.names, leaves, self.dtypes, self.shapes):
            self._check(name, value, dtype, shape)
        return list(leaves)

    def unflatten(self, outputs: list[torch.Tensor]) -> Any:
        if self.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def describe(self) -> str:
        parts = []
        for name, dtype, shape in zip(self.names, self.dtypes, self.shapes):
            dims = ", ".join("?" if d is None else str(d) for d in shape)
            parts.append(f"{name}: {str(dtype).replace('torch.', '')}[{dims}]")
        return "(" + ", ".join(parts) + ")"

    def _order_kwargs(self, kwargs: dict) -> dict:
        expected = self.in_spec.child(1).context if self.in_spec is not None else None
        if expected is None or set(kwargs) != set(expected):
            return kwargs
        return {k: kwargs[k] for k in expected}

    def _flatten_by_name(self, args: tuple, kwargs: dict) -> list:
        unknown = set(kwargs) - set(self.names)
        if unknown or len(args) + len(kwargs) != len(self.names):
            raise InputMismatchError(
                f"inputs do not match the graph's signature {self.describe()}: got "
                f"{len(args)} positional and keywords {sorted(kwargs)}"
            )
        by_name = dict(zip(self.names, args))
        for k, v in kwargs.items():
            if k in by_name:
                raise InputMismatchError(f"input {k!r} given both by position and by keyword")
            by_name[k] = v
        return [by_name[n] for n in self.names]

    @staticmethod
    def _check(name: str, value: Any, dtype: torch.dtype, shape: tuple) -> None:
        if not isinstance(value, torch.Tensor):
            raise InputMismatchError(f"input {name!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != dtype:
            raise InputMismatchError(f"input {name!r} has dtype {value.dtype}, the graph expects {dtype}")
        if value.dim() != len(shape):
            raise InputMismatchError(
                f"input {name!r} has {value.dim()} dimensions {tuple(value.shape)}, the graph expects "
                f"{len(shape)} ({', '.join('?' if d is None else str(d) for d in shape)})"
            )
        for axis, (got, want) in enumerate(zip(value.shape, shape)):
            if want is not None and got != want:
                raise InputMismatchError(
                    f"input {name!r} has size {got} in dimension {axis}; it was captured as static "
                    f"size {want} (pass dynamic_shapes= to rf.capture to make it dynamic)"
                )
