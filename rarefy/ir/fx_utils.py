"""Small, shared FX surgery helpers: tensor attributes in, unused ones out."""
from __future__ import annotations

import re

import torch


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Point the attribute ``target`` at ``value`` (a parameter stays a frozen parameter).

    Passes change weights only this way, never by writing into a tensor: graph copies share
    their tensors (``Graph.copy``), so an in-place write would reach the caller's graph.
    """
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = value.detach().contiguous()
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def shared_weights(gm: torch.fx.GraphModule) -> set[str]:
    """Attribute paths of tensors read by more than one op (tied embeddings, shared layers)."""
    readers: dict[int, int] = {}
    paths: dict[int, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tensor = get_tensor(gm, node.target)
            readers[id(tensor)] = readers.get(id(tensor), 0) + len(node.users)
            paths.setdefault(id(tensor), []).append(node.target)
    return {p for key, count in readers.items() if count > 1 for p in paths[key]}


def add_tensor(gm: torch.fx.GraphModule, hint: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer of the root module under a fresh name from ``hint``."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach().contiguous())
    return name


def get_attr_node(gm: torch.fx.GraphModule, before: torch.fx.Node, target: str | None) -> torch.fx.Node | None:
    if target is None:
        return None
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


def drop_unused_attrs(gm: torch.fx.GraphModule) -> int:
    """Delete get_attr nodes without users, and the tensors no remaining node reads."""
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    used_ids = {id(get_tensor(gm, t)) for t in used}
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or id(tensor) in used_ids:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        removed += 1
    return removed


def resize_meta(node: torch.fx.Node, sizes: dict[int, int]) -> None:
    """Give ``node.meta["val"]`` new sizes ``{dim: size}`` (same dtype, device and fake mode)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    shape = [sizes.get(d, s) for d, s in enumerate(val.shape)]
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        node.meta["val"] = val.new_empty(shape)
        return
    with mode:
        node.meta["val"] = val.new_empty(shape)
