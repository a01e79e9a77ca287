"""Structure analysis: channel-dependency groups and residual blocks of an FX graph (networkx).

Every dimension of every tensor in the graph is a *slot* ``(node name, dim)``. An op table
(``COUPLING``) maps each aten op to the rule that says which slots of its inputs and output
must keep the same channels: a linear ties its input's last dim to the weight's columns and
its output's last dim to the weight's rows and bias; elementwise ops tie aligned dims (a
broadcast size-1 dim ties nothing); a reshape ties the dims whose sizes match, and a dim
split into ``(heads, head_dim)`` (or merged from it) is tied to its *outer* factor only, so
removing a unit of that slot removes a whole head (the inner factor is a group of its own).
The connected components of the slot graph are the dependency groups: the channels that
must be removed together, from every weight, bias, norm and shape constant they touch.

A group is prunable only if every op in it has a rule: an op missing from the table blocks
the groups of all its slots and the group names it (rarefy never guesses). Groups that reach
a graph input or output, or that are reduced by a norm, are not prunable either, and groups
whose weights lie in several blocks (the residual hidden stream, which couples every block
and the embeddings) are prunable in principle but excluded, each with its reason.

Slot sizes inside a group differ when heads are shared (a KV head of grouped-query attention
serves ``n_rep`` query heads): the group's *unit* count is its smallest slot size and every
slot maps unit ``u`` to the contiguous block ``[u * size / units, (u + 1) * size / units)``,
which is how ``view``, ``repeat_kv`` and ``enable_gqa`` lay heads out.

``residual_blocks(graph)`` lists the residual adds: add nodes that join the residual stream
(a block's hidden input, carried through casts, dropout and norms) with a branch.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch

aten = torch.ops.aten
Slot = tuple[str, int]

# ops that produce nothing to prune or only read shapes
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, operator.getitem}
_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.silu.default,
    aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.pow.Tensor_Scalar,
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.dropout.default, aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
    aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.add.Scalar, aten.mul.Scalar,
    aten.sub.Scalar, aten.div.Scalar, aten.softmax.int, aten._softmax.default, aten.type_as.default,
    aten._to_copy.default, aten.eq.Tensor, aten.__and__.Tensor, aten.le.Tensor, aten.ge.Scalar, aten.ne.Scalar,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
SHAPE_ARG_OPS = _RESHAPES | {aten.expand.default}  # ops whose shape argument may name a channel count
_STREAM_OPS = {aten.to.dtype, aten.to.dtype_layout, aten.dropout.default, aten.alias.default, aten.clone.default,
               aten.contiguous.default, aten.layer_norm.default} | _RESHAPES


@dataclass
class DependencyGroup:
    """Channels that must be pruned together, and everything in the graph that holds them."""

    index: int
    slots: dict[Slot, int]  # (node name, dim) -> size of that dim
    params: dict[str, list[tuple[int, int]]]  # attribute path -> [(dim, size)]
    units: int  # how many removable units (channels, heads or KV groups) the group has
    kind: str  # "mlp_channels" | "attention_heads" | "hidden" | "other"
    blocks: list[str] = field(default_factory=list)
    prunable: bool = False
    reason: str = ""  # why not prunable ("" when prunable)
    consumers: list[str] = field(default_factory=list)  # linear weights whose input columns are in the group

    def indices(self, size: int, keep: list[int]) -> torch.Tensor:
        """Raw indices of a slot of ``size`` that the kept units cover."""
        per_unit = size // self.units
        return torch.cat([torch.arange(u * per_unit, (u + 1) * per_unit) for u in keep])

    def __repr__(self) -> str:
        return (f"DependencyGroup({self.index}, {self.kind}, units={self.units}, params={len(self.params)}, "
                f"prunable={self.prunable}{'' if self.prunable else ', ' + repr(self.reason)})")


# -- the op table: each rule returns the (slot, slot) couplings of one node ----------------------------
def _shape(x) -> tuple | None:
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _aligned(node, inputs) -> list[tuple[Slot, Slot]]:
    """Broadcasting: dims aligned from the right tie when the input dim is not a broadcast 1."""
    out = _shape(node)
    pairs = []
    for x in inputs:
        shape = _shape(x)
        if shape is None or out is None:
            continue
        for k in range(1, len(shape) + 1):
            if not _is_one(shape[-k]) or _is_one(out[-k]):
                pairs.append(((x.name, len(shape) - k), (node.name, len(out) - k)))
    return pairs


def _tensor_args(node) -> list[torch.fx.Node]:
    flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, torch.fx.Node) and _shape(a) is not None]


def _elementwise(node):
    return _aligned(node, _tensor_args(node))


def _linear(node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    rank = len(_shape(node))
    pairs = [((x.name, d), (node.name, d)) for d in range(rank - 1)]
    pairs += [((x.name, rank - 1), (w.name, 1)), ((node.name, rank - 1), (w.name, 0))]
    if isinstance(bias, torch.fx.Node):
        pairs.append(((node.name, rank - 1), (bias.name, 0)))
    return pairs


def _addmm(node):  # addmm(bias, x, w): x [N, K] @ w [K, M] (GPT-2's Conv1D)
    bias, x, w = node.args[:3]
    pairs = [((x.name, 0), (node.name, 0)), ((x.name, 1), (w.name, 0)), ((node.name, 1), (w.name, 1))]
    return pairs + _aligned(node, [bias])


def _matmul(node):  # a [..., n, k] @ b [..., k, m]
    a, b = node.args[:2]
    sa, sb, so = _shape(a), _shape(b), _shape(node)
    pairs = [((a.name, len(sa) - 1), (b.name, len(sb) - 2)), ((node.name, len(so) - 2), (a.name, len(sa) - 2)),
             ((node.name, len(so) - 1), (b.name, len(sb) - 1))]
    for x, s in ((a, sa), (b, sb)):
        for k in range(3, len(s) + 1):
            if not _is_one(s[-k]):
                pairs.append(((x.name, len(s) - k), (node.name, len(so) - k)))
    return pairs


def _sdpa(node):  # q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] -> [B, H, L, Ev]
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pairs = [((q.name, 3), (k.name, 3)), ((node.name, 3), (v.name, 3)), ((node.name, 2), (q.name, 2)),
             ((k.name, 2), (v.name, 2))]
    for d in (0, 1):  # batch and heads; Hkv < H is grouped-query attention (contiguous groups)
        pairs += [((node.name, d), (x.name, d)) for x in (q, k, v)]
    if isinstance(mask, torch.fx.Node):
        pairs += _aligned(node, [mask])
    return pairs


def _embedding(node):
    w, idx = node.args[:2]
    rank = len(_shape(node))
    return [((node.name, rank - 1), (w.name, 1))] + [((idx.name, d), (node.name, d)) for d in range(rank - 1)]


def _layer_norm(node):
    x, normalized = node.args[:2]
    rank = len(_shape(node))
    pairs = [((x.name, d), (node.name, d)) for d in range(rank)]
    for p in node.args[2:4]:
        if isinstance(p, torch.fx.Node):
            pairs += [((p.name, j), (node.name, rank - len(normalized) + j)) for j in range(len(normalized))]
    return pairs


def _permutation(node):
    x = node.args[0]
    rank = len(_shape(node))
    if node.target is aten.transpose.int:
        order = list(range(rank))
        a, b = node.args[1] % rank, node.args[2] % rank
        order[a], order[b] = order[b], order[a]
    else:
        order = [d % rank for d in node.args[1]]
    return [((x.name, src), (node.name, dst)) for dst, src in enumerate(order)]


def _unsqueeze(node):
    x, dim = node.args[:2]
    rank = len(_shape(node))
    dim %= rank
    return [((x.name, d), (node.name, d if d < dim else d + 1)) for d in range(rank - 1)]


def _select(node):
    x, dim = node.args[:2]
    rank = len(_shape(x))
    dim %= rank
    return [((x.name, d), (node.name, d if d < dim else d - 1)) for d in range(rank) if d != dim]


def _slice(node):
    x, dim = node.args[0], node.args[1] % len(_shape(node))
    pairs = [((x.name, d), (node.name, d)) for d in range(len(_shape(node))) if d != dim]
    if _shape(x)[dim] == _shape(node)[dim]:  # a full slice keeps every channel
        pairs.append(((x.name, dim), (node.name, dim)))
    return pairs


def _cat(node):
    tensors = [t for t in node.args[0] if isinstance(t, torch.fx.Node)]
    rank = len(_shape(node))
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    return [((t.name, d), (node.name, d)) for t in tensors for d in range(rank) if d != dim]


def _reduction(node):
    x = node.args[0]
    rank = len(_shape(x))
    dims = node.args[1] if len(node.args) > 1 else list(range(rank))
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    pairs, out_dim = [], 0
    for d in range(rank):
        if d not in dims:
            pairs.append(((x.name, d), (node.name, out_dim)))
        out_dim += 1 if (keep or d not in dims) else 0
    return pairs


def _reshape(node):
    """Match input and output dims by equal prefix products; a split or merge ties the outer factor."""
    x = node.args[0]
    a, b = _shape(x), _shape(node)
    prefix_a = [sympy.Integer(1)]
    for s in a:
        prefix_a.append(prefix_a[-1] * _expr(s))
    prefix_b = [sympy.Integer(1)]
    for s in b:
        prefix_b.append(prefix_b[-1] * _expr(s))
    bounds, j = [(0, 0)], 0
    for i in range(1, len(a) + 1):
        for jj in range(j + 1, len(b) + 1):
            if prefix_a[i] == prefix_b[jj]:  # sympy products are canonical: structural equality suffices
                bounds.append((i, jj))
                j = jj
                break
    if bounds[-1] != (len(a), len(b)):
        raise _Unsupported(f"{node.name}: reshape {a} -> {b} has no matching factorisation")
    pairs = []
    for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
        ins = [d for d in range(i0, i1) if not _is_one(a[d])]
        outs = [d for d in range(j0, j1) if not _is_one(b[d])]
        if not ins or not outs:
            continue
        if len(ins) > 1 and len(outs) > 1:
            raise _Unsupported(f"{node.name}: reshape {a} -> {b} regroups several dims at once")
        pairs.append(((x.name, ins[0]), (node.name, outs[0])))  # the outer factor of a split / merge
    return pairs


def _expand(node):
    x = node.args[0]
    shape, out = _shape(x), _shape(node)
    offset = len(out) - len(shape)
    return [((x.name, d), (node.name, d + offset)) for d in range(len(shape))
            if not (_is_one(shape[d]) and not _is_one(out[d + offset]))]


COUPLING = {
    **{op: _elementwise for op in _ELEMENTWISE},
    **{op: _reshape for op in _RESHAPES},
    **{op: _reduction for op in _REDUCTIONS},
    aten.linear.default: _linear, aten.addmm.default: _addmm, aten.matmul.default: _matmul,
    aten.bmm.default: _matmul, aten.scaled_dot_product_attention.default: _sdpa,
    aten.embedding.default: _embedding, aten.layer_norm.default: _layer_norm,
    aten.transpose.int: _permutation, aten.permute.default: _permutation, aten.unsqueeze.default: _unsqueeze,
    aten.select.int: _select, aten.slice.Tensor: _slice, aten.cat.default: _cat, aten.expand.default: _expand,
}


class _Unsupported(Exception):
    """A rule that cannot tie a node's dims; the node's slots are blocked."""


# -- building the slot graph ---------------------------------------------------------------------------
def slot_graph(gm: torch.fx.GraphModule, resizable: dict[str, set[int]] | None = None) -> nx.Graph:
    """The networkx graph of slots; node attributes: size, and ``blocked`` / ``reduced`` reasons.

    Graph inputs and outputs are blocked, except the dims ``resizable`` names per node (a
    decoder's past and present k/v along their head dim: pruning heads shrinks the cache)."""
    resizable = resizable or {}
    g = nx.Graph()
    for node in gm.graph.nodes:
        shape = _shape(node)
        if shape is not None:
            for d, size in enumerate(shape):
                g.add_node((node.name, d), size=size)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            _mark(g, node, "blocked", f"reaches the graph input {node.name}", resizable.get(node.name))
        elif node.op == "output":
            for arg in torch.utils._pytree.tree_leaves(node.args):
                if isinstance(arg, torch.fx.Node):
                    _mark(g, arg, "blocked", f"reaches the graph output ({arg.name})", resizable.get(arg.name))
        elif node.op == "call_function" and node.target not in _IGNORED and _shape(node) is not None:
            _couple(g, node)
        elif node.op == "call_function" and node.target is operator.getitem and _shape(node) is not None:
            _mark(g, node, "blocked", f"{node.name} is one output of the multi-output op {node.args[0].name}")
    return g


def _couple(g: nx.Graph, node: torch.fx.Node) -> None:
    rule = COUPLING.get(node.target)
    if rule is None:
        for x in [node] + _tensor_args(node):
            _mark(g, x, "blocked", f"op {node.target} at {node.name} has no coupling rule")
        return
    try:
        pairs = rule(node)
    except _Unsupported as exc:
        for x in [node] + _tensor_args(node):
            _mark(g, x, "blocked", str(exc))
        return
    for a, b in pairs:
        if a in g and b in g:
            g.add_edge(a, b)
    if node.target in _REDUCTIONS or node.target is aten.layer_norm.default:
        x = node.args[0]
        rank = len(_shape(x))
        dims = node.args[1] if node.target in _REDUCTIONS else range(rank - len(node.args[1]), rank)
        for d in ([dims] if isinstance(dims, int) else dims):
            g.nodes[(x.name, d % rank)]["reduced"] = f"normalised over by {node.name} ({node.target})"


def _mark(g: nx.Graph, node: torch.fx.Node, key: str, reason: str, exempt: set[int] | None = None) -> None:
    for d in range(len(_shape(node) or ())):
        if d not in (exempt or ()):
            g.nodes[(node.name, d)].setdefault(key, reason)


def dependency_groups(graph, include_unparameterised: bool = False) -> list[DependencyGroup]:
    """The channel-dependency groups of an FX-dialect graph (those that touch a weight, by default)."""
    gm = graph.fx
    g = slot_graph(gm, _cache_head_dims(graph))
    by_name = {n.name: n for n in gm.graph.nodes}
    block_of = _block_by_attr(graph)
    groups = []
    for component in sorted(nx.connected_components(g), key=lambda c: min(c)):
        slots = {s: g.nodes[s]["size"] for s in sorted(component)}
        params: dict[str, list[tuple[int, int]]] = {}
        for (name, d), size in slots.items():
            node = by_name[name]
            if node.op == "get_attr":
                params.setdefault(node.target, []).append((d, size))
        if not params and not include_unparameterised:
            continue
        groups.append(_describe(len(groups), slots, params, g, by_name, block_of))
    return groups


def _cache_head_dims(graph) -> dict[str, set[int]]:
    """A decoder-with-past graph's cache inputs and outputs, resizable along the head dim (1)."""
    if "causal_lm" not in graph.meta:
        return {}
    gm = graph.fx
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][3:]
    presents = list(gm.graph.output_node().args[0])[1:]
    return {n.name: {1} for n in placeholders + presents if isinstance(n, torch.fx.Node)}


def _describe(index, slots, params, g, by_name, block_of) -> DependencyGroup:
    static = [s for s in slots.values() if isinstance(s, int)]
    units = min(static) if static else 0
    blocks = sorted({block_of[p] for p in params if p in block_of})
    consumers = sorted({by_name[n].target for (n, d) in slots if by_name[n].op == "get_attr" and d == 1
                        and any(u.target is aten.linear.default and u.args[1] is by_name[n] for u in by_name[n].users)})
    splits = any(by_name[n].target in _RESHAPES and _shape(by_name[n]) is not None
                 and len(_shape(by_name[n])) > len(_shape(by_name[n].args[0])) for n, _ in slots)
    kind = "other"
    if len(blocks) > 1 or (blocks and any(p not in block_of for p in params)):
        kind = "hidden"
    elif blocks and consumers:
        kind = "attention_heads" if splits else "mlp_channels"
    group = DependencyGroup(index, slots, params, units, kind, blocks, consumers=consumers)
    group.reason = _why_not_prunable(group, g)
    group.prunable = not group.reason
    return group


def _why_not_prunable(group: DependencyGroup, g: nx.Graph) -> str:
    blockers = [g.nodes[slot][key] for key in ("blocked", "reduced") for slot in group.slots if key in g.nodes[slot]]
    if group.kind == "hidden":
        also = f"; also: {blockers[0]}" if blockers else ""
        return "the residual hidden stream couples every block and the embeddings: excluded by default" + also
    if blockers:
        return blockers[0]
    if not group.blocks:
        return "its weights lie outside the transformer blocks (embeddings, heads, position tables)"
    if any(not isinstance(s, int) for s in group.slots.values()):
        return "a dim of the group has a dynamic (symbolic) size"
    if group.units < 2 or any(s % group.units for s in group.slots.values()):
        return f"slot sizes {sorted(set(group.slots.values()))} do not split into {group.units} equal units"
    if group.kind == "other":
        return "the group has no linear whose input columns it could remove"
    return ""


def _block_by_attr(graph) -> dict[str, str]:
    out = {}
    for block in graph.sites("block"):
        for node in block.nodes:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    out[arg.target] = block.name
    return out


# -- residual blocks ---------------------------------------------------------------------------------
@dataclass
class ResidualAdd:
    """One residual add: ``node = skip + branch`` inside ``block``."""

    block: str
    node: torch.fx.Node
    skip: torch.fx.Node
    branch: torch.fx.Node


def residual_blocks(graph) -> list[ResidualAdd]:
    """The residual adds of each block: adds that join the carried hidden stream with a branch."""
    out = []
    for block in graph.sites("block"):
        stream = block.info.get("hidden_input")
        members = set(block.nodes)
        carried = {stream} if stream is not None else set()
        for node in block.nodes:
            if node.op != "call_function":
                continue
            if node.target in _STREAM_OPS and node.args and node.args[0] in carried:
                carried.add(node)
            elif node.target is aten.add.Tensor and len(node.args) == 2 and all(
                    isinstance(a, torch.fx.Node) for a in node.args):
                skip = next((a for a in node.args if a in carried), None)
                if skip is not None:
                    branch = node.args[1] if node.args[0] is skip else node.args[0]
                    if branch in members or branch not in carried:
                        out.append(ResidualAdd(block.name, node, skip, branch))
                        carried.add(node)
    return out


def group_summary(groups: list[DependencyGroup]) -> dict[str, int]:
    """Counts per kind and prunability, for reports."""
    counts: dict[str, int] = {}
    for group in groups:
        key = f"{group.kind}:{'prunable' if group.prunable else 'not_prunable'}"
        counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = ["DependencyGroup", "ResidualAdd", "COUPLING", "SHAPE_ARG_OPS", "dependency_groups", "residual_blocks",
           "slot_graph", "group_summary"]
