"""FX surgery shared by the KV-cache passes: swap one layer's cache ops and state tensors.

A dense layer of a decode step reads placeholders ``k_cache_i`` / ``v_cache_i`` in
``rarefy::cache_attention`` and writes them back through ``rarefy::cache_write``, whose two
results are step outputs. ``rewrite_layer`` replaces that pattern with a method's attention
and write ops over new state placeholders, keeping the step's invariant: state inputs and
state outputs are listed in the same order (``graph.meta["decoder"]["state"]``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..ir.errors import PassError


@dataclass
class StateTensor:
    """One state tensor of a layer: name, shape without the batch dimension, dtype, initial fill."""

    name: str
    shape: tuple
    dtype: torch.dtype
    fill: float = 0

    def spec(self) -> dict:
        return {"name": self.name, "shape": [None, *self.shape], "dtype": str(self.dtype).replace("torch.", ""),
                "fill": self.fill}


def _layer_nodes(gm, entry):
    by_name = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    k_in, v_in = by_name.get(entry["tensors"]["key"]), by_name.get(entry["tensors"]["value"])
    if k_in is None or v_in is None:
        raise PassError(f"{entry['name']}: cache inputs {entry['tensors']} not found in the step")
    attn = [u for u in k_in.users if u.target is torch.ops.rarefy.cache_attention.default]
    write = [u for u in k_in.users if u.target is torch.ops.rarefy.cache_write.default]
    if len(attn) != 1 or len(write) != 1:
        raise PassError(f"{entry['name']}: expected one cache_attention and one cache_write reading "
                        f"{k_in.name}, found {len(attn)} and {len(write)}")
    return k_in, v_in, attn[0], write[0]


def rewrite_layer(graph, entry: dict, state: list[StateTensor], attention, write) -> None:
    """Swap a dense layer for ``state`` placeholders and the ops built by ``attention`` / ``write``.

    ``attention(gm, q, k_new, v_new, position, scale, placeholders) -> (node, votes_index)``
    (``votes_index`` None when the node is the attention output itself, else the node returns
    (out, votes)); ``write(gm, k_new, v_new, position, placeholders, votes) -> node`` returning
    one tensor per state tensor, in order.
    """
    gm = graph.fx
    g = gm.graph
    k_in, v_in, attn, old_write = _layer_nodes(gm, entry)
    q, k_new, v_new, _, _, position, scale = attn.args
    placeholders = []
    anchor = v_in
    for tensor in state:
        with g.inserting_after(anchor):
            anchor = g.placeholder(tensor.name)
        anchor.name = anchor.target = tensor.name
        placeholders.append(anchor)
    with g.inserting_before(attn):
        node, votes_index = attention(gm, q, k_new, v_new, position, scale, placeholders)
        out = node if votes_index is None else g.call_function(operator.getitem, (node, 0))
        votes = None if votes_index is None else g.call_function(operator.getitem, (node, votes_index))
    attn.replace_all_uses_with(out)
    g.erase_node(attn)
    with g.inserting_before(old_write):
        new_write = write(gm, k_new, v_new, position, placeholders, votes)
        results = [g.call_function(operator.getitem, (new_write, j)) for j in range(len(state))]
    old_items = sorted(old_write.users, key=lambda n: n.args[1])
    output = g.output_node()
    flat = list(output.args[0])
    at = flat.index(old_items[0])
    if flat[at + 1] is not old_items[1]:
        raise PassError(f"{entry['name']}: the cache outputs are not adjacent in the step's outputs")
    output.args = (tuple(flat[:at] + results + flat[at + 2:]),)
    for item in old_items:
        g.erase_node(item)
    g.erase_node(old_write)
    for old in (k_in, v_in):
        for user in list(old.users):  # torch.export reads the batch size off any input: keep dim 0 live
            if user.target is torch.ops.aten.sym_size.int and user.args[1] == 0:
                user.replace_input_with(old, placeholders[0])
        g.erase_node(old)
    _replace_state(graph, entry, state)
    g.lint()
    gm.recompile()


def _replace_state(graph, entry: dict, state: list[StateTensor]) -> None:
    specs = graph.meta["decoder"]["state"]
    names = [s["name"] for s in specs]
    at = names.index(entry["tensors"]["key"])
    specs[at:at + 2] = [t.spec() for t in state]
    entry["tensors"] = {t.name.rsplit("_", 1)[0]: t.name for t in state}
    entry["shapes"] = {t.name.rsplit("_", 1)[0]: list(t.shape) for t in state}
    graph.refresh_signature()
