"""Capture a PyTorch / Hugging Face model as an FX-dialect ``rf.Graph``.

Capture goes through ``torch.export.export(..., strict=False)`` (``torch.fx.symbolic_trace``
fails on every current Hugging Face model). Batch and sequence dimensions are dynamic by
default: dimension 0 of every tensor input, dimension 1 of 2-D integer inputs (token ids,
masks, positions) and of 3-D float inputs ([batch, sequence, features]); image dimensions
stay static. GPT-2-style ``Conv1D`` layers (``addmm`` with a [in, out] weight) are
rewritten to ``aten.linear`` with the transposed weight, so every pass sees one linear form. Hugging Face caches
are switched off for the capture and the model's config and training flag are restored
afterwards, so the user's model is left exactly as it was.
"""
from __future__ import annotations

import inspect
import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .graph import Graph
from .signature import Signature, split_inputs

log = logging.getLogger(__name__)


def capture(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> Graph:
    """Capture ``model`` called with ``example_inputs`` (a tuple or dict of tensors)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"rf.capture expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    _check_example_tensors(model, args, kwargs)
    bound = _bind(model, args, kwargs)
    if dynamic_shapes is None:
        dynamic_shapes = {name: _default_dims(value) for name, value in bound.items()}
        args, kwargs = _widen_unit_dims(args, kwargs, bound, dynamic_shapes)
    with _capture_mode(model):
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # re-raised with the module that failed and the reason
            raise CaptureError(_explain_failure(model, exc)) from exc
        gm = ep.module()
        _canonicalize_conv1d(gm)
        with torch.no_grad():
            out = gm(*args, **kwargs)
    leaves, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    _, out_spec = pytree.tree_flatten(out)
    names = _leaf_names(in_spec, bound)
    shapes = [_dims_with_dynamic(leaf, dims) for leaf, dims in zip(leaves, _leaf_dims(bound, dynamic_shapes, names))]
    signature = Signature(names, [t.dtype for t in leaves], shapes, in_spec, out_spec)
    meta = {
        "source": type(model).__name__,
        "config": _config_dict(model),
        "dynamic_shapes": _jsonable_dims(dynamic_shapes),
        "example_inputs": (args, kwargs),
    }
    return Graph("fx", gm, signature, meta)


def _canonicalize_conv1d(gm: torch.fx.GraphModule) -> None:
    """addmm(bias, x2d, W[in, out]) with W and bias owned by the graph -> linear(x2d, W.T, bias)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.addmm.default or node.kwargs:
            continue
        bias, x, weight = node.args[:3]
        if not all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in (bias, weight)):
            continue
        owner_path, _, attr = weight.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        transposed = torch.nn.Parameter(getattr(owner, attr).detach().t().contiguous(), requires_grad=False)
        setattr(owner, attr, transposed)  # the graph's own module; the user's model keeps its tensor
        users = [u for u in weight.users if u is not node]
        if users:
            raise CaptureError(f"Conv1D weight {weight.target} is read by other nodes too; cannot canonicalise")
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(torch.ops.aten.linear.default, (x, weight, bias))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
    gm.recompile()


# -- the capture context: eval mode, caches off, everything restored ------------------------
@contextmanager
def _capture_mode(model: torch.nn.Module):
    was_training = model.training
    config = getattr(model, "config", None)
    had_use_cache = config is not None and hasattr(config, "use_cache")
    old_use_cache = getattr(config, "use_cache", None)
    model.eval()
    if had_use_cache:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if had_use_cache:
            config.use_cache = old_use_cache


def _check_example_tensors(model, args, kwargs) -> None:
    for value in list(args) + list(kwargs.values()):
        if not isinstance(value, torch.Tensor) and value is not None:
            raise CaptureError(
                f"rf.capture({type(model).__name__}): example inputs must be tensors, got "
                f"{type(value).__name__}"
            )


def _bind(model, args, kwargs) -> dict[str, Any]:
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"rf.capture({type(model).__name__}): example inputs do not fit forward(): {exc}") from exc
    out = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(f"rf.capture({type(model).__name__}): *args in forward() is not supported; name the inputs")
        else:
            out[name] = value
    return out


def _default_dims(value: Any):
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    dims = {0: Dim.DYNAMIC}
    if (value.dim() == 2 and not value.is_floating_point()) or (value.dim() == 3 and value.is_floating_point()):
        dims[1] = Dim.DYNAMIC  # token ids / masks [B, S], or embeddings [B, S, D]; images stay static
    return dims


def _widen_unit_dims(args, kwargs, bound, dynamic_shapes):
    """torch.export specialises a dynamic dimension whose example size is 1; repeat it to 2."""
    def widen(name, value):
        dims = dynamic_shapes.get(name)
        if not isinstance(value, torch.Tensor) or not dims:
            return value
        for axis in dims:
            if value.shape[axis] == 1:
                value = torch.cat([value, value], dim=axis)
        return value

    names = list(bound)
    new_args = tuple(widen(names[i], a) for i, a in enumerate(args))
    new_kwargs = {k: widen(k, v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _leaf_names(in_spec, bound) -> list[str]:
    n_positional = in_spec.child(0).num_children
    return list(bound)[:n_positional] + list(in_spec.child(1).context or [])


def _leaf_dims(bound, dynamic_shapes, names):
    return [dynamic_shapes.get(n) if isinstance(dynamic_shapes, dict) else None for n in names]


def _dims_with_dynamic(leaf: torch.Tensor, dims) -> tuple:
    dynamic = set(dims or {})
    return tuple(None if axis in dynamic else int(s) for axis, s in enumerate(leaf.shape))


def _jsonable_dims(dynamic_shapes) -> dict:
    if not isinstance(dynamic_shapes, dict):
        return {}
    return {k: sorted(v) if isinstance(v, dict) else None for k, v in dynamic_shapes.items()}


def _config_dict(model) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    try:
        return config.to_dict()
    except Exception:  # a config that cannot serialise still captures
        return {}


def _explain_failure(model: torch.nn.Module, exc: BaseException) -> str:
    """Name the innermost submodule of ``model`` on the failing stack, and the reason."""
    by_id = {id(m): name for name, m in model.named_modules()}
    culprit = None
    tb = exc.__traceback__
    for frame, _ in traceback.walk_tb(tb):
        self_obj = frame.f_locals.get("self")
        if self_obj is not None and id(self_obj) in by_id:
            culprit = (by_id[id(self_obj)], type(self_obj).__name__)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"module '{culprit[0] or '<root>'}' ({culprit[1]})" if culprit else f"model {type(model).__name__}"
    return (
        f"rf.capture could not export {type(model).__name__}: failed in {where}: "
        f"{type(exc).__name__}: {reason}"
    )
