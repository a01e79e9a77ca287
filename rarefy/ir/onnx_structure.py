"""Structure analysis of ONNX-dialect graphs: the head and channel groups of each block.

The FX dialect ties every dim of every tensor in a slot graph (``structure.py``). An ONNX file
exported from a Hugging Face model is analysed per block instead, from its linear sites:
the output channels of the *producers* (q/k/v, or up/gate/fc1) are followed, one tracked axis
per value, through every node that reads them until they reach the input of the *consumer*
(o, or down/fc2). A rule per op type says where the tracked axis goes: elementwise ops align
it from the right (a side input must be a broadcast 1 there), ``Transpose`` / ``Unsqueeze`` /
``Squeeze`` move it, and a ``Reshape`` keeps the *outer* factor of a split or merge (the
head axis of ``[b, s, H*d] -> [b, s, H, d]``), matched by equal prefix products of the
symbolic dims, as ``structure.py`` does. A reshape that folds the axis into an inner factor
(ONNX Runtime's ``[b, H, s, d] -> [-1, s, d]`` around the key transpose) *loses* it; the lost
values are followed until a node with a tracked input takes the axis up again.

A node without a rule, a graph output, another linear, a reduction, a contraction or a concat
along the tracked axis makes the group not prunable, with its reason (as in the FX dialect).
Every ``Reshape`` and ``Expand`` on the way has its shape input read (a constant, or a Concat
of constant and ``Shape``-derived pieces): the literal entries that hold the tracked axis —
the head count, or the KV-head count of grouped-query ``repeat_kv``'s
``[b, kv_heads, n_rep, s, d]`` — become *patches* for the rewrite. A shape input the analysis
cannot read, or a literal it cannot attribute, is recorded as ``group.error`` (an
``UnsupportedError`` message naming the node) and raised by the pass that selects the block.

Units and their contiguous layout are ``DependencyGroup``'s: the smallest tracked size (KV
heads under grouped-query attention, so a unit is a KV group with its query heads).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy

from .errors import UnsupportedError
from .structure import DependencyGroup

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
    "Relu", "Gelu", "Cast", "CastLike", "Identity", "Dropout", "Where", "IsNaN", "IsInf", "Not", "And", "Or",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Clip", "Softmax", "LogSoftmax",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Softplus", "HardSigmoid", "LeakyRelu", "Elu",
}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceSumSquare", "ReduceLogSumExp"}
_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
_SHAPE_READERS = {"Shape", "Size"}  # their outputs follow the pruned sizes at run time by themselves
_SHAPE_CHAIN = {"Slice", "Gather", "Squeeze", "Unsqueeze", "Concat", "Cast", "Identity"}


@dataclass(repr=False)
class OnnxGroup(DependencyGroup):
    """A DependencyGroup of an ONNX graph, with what its rewrite needs."""

    linears: dict = field(default_factory=dict)  # param key -> (linear Site, "out" | "in" | "bias")
    axes: dict = field(default_factory=dict)  # onnx_ir Value -> tracked axis
    lost: set = field(default_factory=set)  # values derived from the group whose axis cannot be followed
    patches: list = field(default_factory=list)  # (Reshape/Expand node, shape entry, literal size there)
    head_counts: dict = field(default_factory=dict)  # {"num_heads", "num_kv_heads"} of an attention group
    error: str = ""  # an UnsupportedError message, raised by the pass that selects this group


class _Blocked(Exception):
    """The group cannot be pruned; the message says why."""


# -- reading values ---------------------------------------------------------------------------------
def _dims(value) -> list | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape.dims]


def _rank(value, fallback: int | None = None) -> int:
    dims = _dims(value)
    if dims is None:
        if fallback is None:
            raise _Blocked(f"{value.name} has no known rank")
        return fallback
    return len(dims)


def const_array(value) -> np.ndarray | None:
    """The value of an initializer or Constant output, else None."""
    import onnx_ir as ir

    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else np.asarray(tensor.numpy())


def _attr(node, name, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _axes(node, index: int, rank: int) -> list[int] | None:
    """Axes given as input ``index`` (newer opsets) or as the ``axes`` attribute, normalised."""
    array = const_array(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
    axes = array.reshape(-1).tolist() if array is not None else _attr(node, "axes")
    return None if axes is None else [int(a) % rank for a in axes]


def _is_weight(value) -> bool:
    if value is None:
        return False
    if value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Transpose" and bool(producer.inputs[0].is_initializer())


def _runtime(value, depth: int = 0) -> bool:
    """Whether ``value`` is computed from ``Shape`` through shape-bookkeeping ops only."""
    producer = value.producer() if value is not None else None
    if producer is None or depth > 12:
        return False
    if producer.op_type in _SHAPE_READERS:
        return True
    if producer.op_type not in _SHAPE_CHAIN:
        return False
    data = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
    return all(const_array(v) is not None or _runtime(v, depth + 1) for v in data) and any(
        _runtime(v, depth + 1) for v in data)


def shape_entries(value) -> list[tuple] | None:
    """Entries of a shape input: ``("const", literal, piece, offset)`` or ``("dyn", None, piece, offset)``;
    ``piece`` is the Concat input position (None for a whole constant). None when unreadable."""
    array = const_array(value)
    if array is not None:
        return [("const", int(v), None, i) for i, v in enumerate(array.reshape(-1))]
    producer = value.producer()
    pieces = list(enumerate(producer.inputs)) if producer is not None and producer.op_type == "Concat" \
        and _attr(producer, "axis") == 0 else [(None, value)]
    out = []
    for position, piece in pieces:
        array = const_array(piece)
        if array is not None:
            out += [("const", int(v), position, i) for i, v in enumerate(array.reshape(-1))]
            continue
        dims = _dims(piece)
        if not _runtime(piece) or dims is None or len(dims) != 1 or not isinstance(dims[0], int):
            return None
        out += [("dyn", None, position, i) for i in range(dims[0])]
    return out


# -- groups -----------------------------------------------------------------------------------------
def onnx_dependency_groups(graph) -> list[OnnxGroup]:
    """Per block: the attention-heads group (q/k/v -> o) and the MLP-channels group (up/gate -> down)."""
    linears = {s.name: s for s in graph.sites("linear")}
    attention = {s.info["block"]: s for s in graph.sites("attention")}
    groups: list[OnnxGroup] = []
    for block in graph.sites("block"):
        site = attention.get(block.name)
        roles = site.tensors if site is not None else {}
        if all(r in roles for r in "qkvo"):
            groups.append(_group(graph, len(groups), "attention_heads", block.name,
                                 [linears[roles[r]] for r in "qkv"], linears[roles["o"]]))
        elif "qkv" in roles:
            group = OnnxGroup(len(groups), {}, {}, 0, "attention_heads", [block.name])
            group.reason = f"{roles['qkv']} is a fused qkv projection: not split on ONNX graphs"
            groups.append(group)
        mlp = [linears[n] for n in block.info["mlp_linears"]]
        if len(mlp) >= 2:  # the last MLP linear in graph order reads what the others produce
            groups.append(_group(graph, len(groups), "mlp_channels", block.name, mlp[:-1], mlp[-1]))
    return groups


def _group(graph, index: int, kind: str, block: str, producers: list, consumer) -> OnnxGroup:
    group = OnnxGroup(index, {}, {}, 0, kind, [block], consumers=[f"{consumer.name}.weight"])
    for site in producers:
        n = site.info["out_features"]
        group.linears[f"{site.name}.weight"] = (site, "out")
        group.params[f"{site.name}.weight"] = [(0, n)]
        if site.info["bias_value"] is not None:
            group.linears[f"{site.name}.bias"] = (site, "bias")
            group.params[f"{site.name}.bias"] = [(0, n)]
    group.linears[group.consumers[0]] = (consumer, "in")
    group.params[group.consumers[0]] = [(1, consumer.info["in_features"])]
    try:
        splits = _walk(graph, group, producers, consumer)
        sizes = list(group.slots.values()) + [dims[0][1] for dims in group.params.values()]
        group.units = min(sizes)
        if kind == "attention_heads":
            group.head_counts = {"num_heads": splits.get(producers[0].info["output"]),
                                 "num_kv_heads": splits.get(producers[1].info["output"])}
        if group.units < 2 or any(s % group.units for s in sizes):
            raise _Blocked(f"sizes {sorted(set(sizes))} do not split into {group.units} equal units")
    except _Blocked as exc:
        group.reason = str(exc)
    except UnsupportedError as exc:
        group.reason = group.error = str(exc)
    group.prunable = not group.reason
    return group


def _walk(graph, group: OnnxGroup, producers: list, consumer) -> dict:
    """Follow the producers' output channels to the consumer's input; returns {producer output: split size}."""
    main = next(n for n in consumer.nodes if n.op_type in ("MatMul", "Gemm"))
    target = consumer.info["input"]
    starts = {site.info["output"] for site in producers}
    for value in starts:
        group.axes[value] = _rank(value) - 1
    splits = {}
    for node in graph.onnx.graph:
        tracked = [v for v in node.inputs if v is not None and v in group.axes]
        lost = [v for v in node.inputs if v is not None and v in group.lost]
        if not tracked and not lost:
            continue
        if node is main:
            if node.inputs[0] is not target or target not in group.axes:
                raise _Blocked(f"{consumer.name} reads the group through {node.inputs[0].name}, whose axis is lost")
            continue
        if node.op_type in _SHAPE_READERS:
            continue
        if node.op_type in ("MatMul", "Gemm") and any(_is_weight(v) for v in node.inputs[:2]):
            raise _Blocked(f"the group reaches the linear at {node.name}, which is not {consumer.name}")
        if not tracked:
            if node.op_type in ("Reshape", "Expand"):
                _check_literals(node, None)
            group.lost.update(node.outputs)
            continue
        axis, size = _follow(node, group)
        for out in node.outputs:
            if axis is None:
                group.lost.add(out)
                continue
            group.axes[out] = axis
            dims = _dims(out)
            size_here = size if size is not None else (dims[axis] if dims is not None else None)
            if isinstance(size_here, int):
                group.slots[(out.name, axis)] = size_here
        if node.op_type == "Reshape" and node.inputs[0] in starts and isinstance(size, int):
            splits[node.inputs[0]] = size
    for value in list(group.axes) + list(group.lost):
        if value.is_graph_output():
            raise _Blocked(f"reaches the graph output ({value.name})")
    if target not in group.axes or group.axes[target] != _rank(target) - 1:
        raise _Blocked(f"the producers' channels do not reach the input of {consumer.name} on its last axis")
    return splits


# -- the op rules: each returns (output axis or None when lost, size there when known) --------------
def _follow(node, group: OnnxGroup) -> tuple[int | None, int | None]:
    op = node.op_type
    if op in _ELEMENTWISE:
        return _broadcast(node, group), None
    x = node.inputs[0]
    if x not in group.axes:
        raise _Blocked(f"op {op} at {node.name} takes the group through a secondary input")
    a, r = group.axes[x], _rank(x)
    if op == "Transpose":
        return list(_attr(node, "perm") or range(r - 1, -1, -1)).index(a), None
    if op == "Unsqueeze":
        inserted = _axes(node, 1, r + len(_axes(node, 1, 1 << 30) or []))  # axes count against the output rank
        return [d for d in range(r + len(inserted)) if d not in inserted][a], None
    if op == "Squeeze":
        axes = _axes(node, 1, r)
        if axes is None or a in axes:
            raise _Blocked(f"{node.name} (Squeeze) may squeeze the pruned axis")
        return a - sum(d < a for d in axes), None
    if op in ("Reshape", "Expand"):
        return _reshape(node, group, a, r)
    if op == "Slice":
        return _slice(node, a, r), None
    if op in ("Concat", "Split"):
        if _attr(node, "axis", 0) % r == a:
            raise _Blocked(f"{node.name} ({op}) works along the pruned axis")
        if op == "Concat" and any(v not in group.axes or group.axes[v] != a for v in node.inputs):
            raise _Blocked(f"{node.name} (Concat) joins the group with tensors from outside it")
        return a, None
    if op == "MatMul":
        return _matmul(node, group), None
    if op in _REDUCE:
        axes = _axes(node, 1, r)
        if axes is None or a in axes:
            raise _Blocked(f"normalised over by {node.name} ({op})")
        return (a if _attr(node, "keepdims", 1) else a - sum(d < a for d in axes)), None
    if op in _NORMS:
        if a >= _attr(node, "axis", -1) % r:
            raise _Blocked(f"normalised over by {node.name} ({op})")
        return a, None
    raise _Blocked(f"op {op} at {node.name} has no coupling rule")


def _broadcast(node, group: OnnxGroup) -> int:
    ranks = [len(_dims(v)) for v in node.inputs if _dims(v) is not None]
    out_rank = _rank(node.outputs[0], max(ranks, default=0))
    axis = None
    for x in node.inputs:
        if x is not None and x in group.axes:
            here = group.axes[x] + out_rank - _rank(x)
            if axis is not None and axis != here:
                raise _Blocked(f"{node.name} ({node.op_type}) aligns two different axes of the group")
            axis = here
    for x in node.inputs:
        dims = _dims(x)
        if x is None or x in group.axes or x in group.lost or dims is None:
            continue
        k = axis - (out_rank - len(dims))
        if k >= 0 and dims[k] not in (1, None):
            raise _Blocked(f"{x.name} enters {node.name} ({node.op_type}) with {dims[k]} along the pruned axis "
                           f"but does not come from the pruned projections")
    if node.op_type in ("Softmax", "LogSoftmax") and _attr(node, "axis", -1) % out_rank == axis:
        raise _Blocked(f"normalised over by {node.name} ({node.op_type})")
    return axis


def _slice(node, a: int, r: int) -> int:
    starts = const_array(node.inputs[1])
    axes = _axes(node, 3, r) if len(node.inputs) > 3 else None
    axes = axes if axes is not None else list(range(len(starts) if starts is not None else r))
    if a in axes:
        raise _Blocked(f"{node.name} (Slice) slices the pruned axis")
    return a


def _matmul(node, group: OnnxGroup) -> int:
    a_in, b_in = node.inputs[:2]
    ranks = [_rank(v) for v in (a_in, b_in)]
    out_rank = _rank(node.outputs[0], max(ranks))
    axis = None
    for which, x in enumerate((a_in, b_in)):
        if x not in group.axes:
            continue
        a, r = group.axes[x], ranks[which]
        if (which == 0 and a == r - 1) or (which == 1 and a == r - 2):
            raise _Blocked(f"the pruned axis is contracted by {node.name} (MatMul)")
        here = out_rank - 2 if (which == 0 and a == r - 2) else out_rank - 1 if which == 1 and a == r - 1 \
            else a + out_rank - r
        if axis is not None and axis != here:
            raise _Blocked(f"{node.name} (MatMul) aligns two different axes of the group")
        axis = here
    return axis


def _reshape(node, group: OnnxGroup, a: int, r: int) -> tuple[int | None, int | None]:
    """Reshape: the output axis holding the outer factor; Expand: the aligned axis. Records patches."""
    entries = shape_entries(node.inputs[1])
    if entries is None:
        raise UnsupportedError(f"{node.name} ({node.op_type}) takes its shape from {node.inputs[1].name}, which is "
                               f"neither a constant nor a Concat of constants and Shape-derived pieces")
    ins = _dims(node.inputs[0])
    size_in = ins[a] if ins is not None else None
    if node.op_type == "Expand":
        j = a + len(entries) - r
        kind, literal = entries[j][:2]
        if kind == "const" and literal != 1:
            if literal != size_in:
                raise _Blocked(f"{node.name} (Expand) broadcasts the pruned axis from {size_in} to {literal}")
            group.patches.append((node, j, literal))
        return j, size_in
    out_dims = _dims(node.outputs[0]) or [None] * len(entries)
    zero_copies = not _attr(node, "allowzero", 0)
    eff = []
    for i, (kind, literal, _, _) in enumerate(entries):
        if kind == "const" and literal > 0:
            eff.append(literal)
        elif kind == "const" and literal == 0 and zero_copies and ins is not None and i < len(ins):
            eff.append(ins[i])
        else:
            eff.append(out_dims[i] if i < len(out_dims) else None)
    j = _outer_factor(ins, a, eff)
    if j is None:
        _check_literals(node, ins, a)
        return None, None
    kind, literal = entries[j][:2]
    if kind == "const" and literal > 0:
        group.patches.append((node, j, literal))
    elif kind == "const" and literal == 0 and zero_copies and j != a:
        raise _Blocked(f"{node.name} (Reshape) copies dim {j} of its input where the pruned axis lands")
    return j, eff[j]


def _outer_factor(ins, a: int, eff: list) -> int | None:
    """The output dim whose prefix product equals the input's prefix before axis ``a``."""
    def expr(d):
        return None if d is None else sympy.Integer(d) if isinstance(d, int) else sympy.Symbol(str(d))

    if ins is None or any(expr(d) is None for d in ins[:a]):
        return None
    before = sympy.Mul(*[expr(d) for d in ins[:a]])
    product = sympy.Integer(1)
    for j, d in enumerate(eff):
        if product == before and d != 1:
            return j
        if expr(d) is None:
            return None
        product = product * expr(d)
    return None


def _check_literals(node, ins, axis: int | None = None) -> None:
    """A reshape that loses the pruned axis may keep literal sizes only for dims the pruning leaves alone."""
    entries = shape_entries(node.inputs[1]) or []
    kept = {d for i, d in enumerate(ins or []) if i != axis}
    odd = [literal for kind, literal, _, _ in entries if kind == "const" and literal not in (-1, 0, 1)
           and literal not in kept]
    if odd:
        raise UnsupportedError(f"{node.name} ({node.op_type}) folds the pruned axis into another dim and gives "
                               f"the literal sizes {odd}; rarefy cannot tell which of them counts the pruned units")


__all__ = ["OnnxGroup", "onnx_dependency_groups", "shape_entries", "const_array"]
