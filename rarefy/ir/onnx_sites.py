"""Sites of ONNX-dialect graphs, and the in-place rewrites of their linears.

``linear``: a ``MatMul`` whose weight is an initializer ``[K, N]`` (directly, or through a
``Transpose`` of an ``[N, K]`` initializer), or a ``Gemm`` with an initializer weight
(``alpha = beta = 1``, ``transA = 0``); a following ``Add`` of a 1-D ``[N]`` initializer is
its bias. The name is the module path from the exporter's ``pkg.torch.onnx.name_scopes``
metadata (``torch.onnx.export(dynamo=True)`` writes it), else the weight initializer's name
without ``.weight``, else the node's name. ``info["weight_value"]()`` returns the weight as a
torch ``[N, K]`` tensor, the nn.Linear layout every quantizer expects.

``block`` / ``attention``: linear names grouped by ``prefix.<i>`` as in the FX dialect; the
attention part of a block is the longest common module path of its q/k/v/o linears. Head
counts come from ``graph.meta["config"]`` when the graph carries one (ONNX files do not).

Rewrites (called by the quantization passes): ``replace_with_matmul_nbits`` (one
``com.microsoft::MatMulNBits`` node, or the 3-bit dequantize subgraph) and
``replace_with_w8a8`` (per-token int8 activations + ``MatMulIntegerToFloat``). Both store
packed integer initializers, take the bias into the new node and drop the fp32 weight.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import numpy as np
import torch

from . import onnx_quant
from .errors import UnsupportedError
from .sites import _ROLE_PATTERNS, Site, _block_prefix, attention_from_block, site_finder

_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _initializer(value):
    return value if value is not None and value.const_value is not None and value.is_initializer() else None


def _weight_of(node):
    """(weight initializer, layout 'kn' or 'nk', Transpose node or None) of a MatMul/Gemm."""
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None, None, None
        weight = _initializer(node.inputs[1])
        return weight, ("nk" if attrs.get("transB", 0) else "kn"), None
    source = node.inputs[1]
    weight = _initializer(source)
    if weight is not None:
        return weight, "kn", None
    producer = source.producer() if source is not None else None
    if producer is not None and producer.op_type == "Transpose" and len(list(source.uses())) == 1:
        perm = producer.attributes.get("perm")
        if perm is not None and list(perm.value) == [1, 0]:
            weight = _initializer(producer.inputs[0])
            if weight is not None:
                return weight, "nk", producer
    return None, None, None


def _bias_of(node, n_out: int):
    """The bias initializer (Gemm's input C, or a following Add) and the Add node, if any."""
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _initializer(node.inputs[2])
        return (bias, None) if bias is not None and tuple(bias.shape) == (n_out,) else (None, None)
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add":
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = _initializer(other)
    if bias is None or tuple(bias.shape) != (n_out,):
        return None, None
    return bias, add


def _site_name(node, weight) -> str:
    scopes = node.metadata_props.get(_NAME_SCOPES)
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parts = []
        if len(parts) >= 2 and parts[-2]:
            return parts[-2]
    if weight.name and not weight.name.startswith("val_"):
        return weight.name[: -len(".weight")] if weight.name.endswith(".weight") else weight.name
    return node.name or weight.name


def _weight_value(weight, layout: str):
    def value() -> torch.Tensor:
        array = torch.from_numpy(np.array(weight.const_value.numpy()))
        return array.T.contiguous() if layout == "kn" else array

    return value


@site_finder("linear", "onnx")
def _onnx_linear_sites(graph) -> list[Site]:
    sites, seen = [], defaultdict(int)
    for node in graph.onnx.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        weight, layout, transpose = _weight_of(node)
        if weight is None or len(weight.shape) != 2:
            continue
        k, n = weight.shape if layout == "kn" else tuple(reversed(tuple(weight.shape)))
        bias, add = _bias_of(node, n)
        name = _site_name(node, weight)
        seen[name] += 1
        if seen[name] > 1:  # two products in one module: keep names unique
            name = f"{name}#{seen[name] - 1}"
        nodes = [n_ for n_ in (transpose, node, add) if n_ is not None]
        tensors = {"weight": weight.name, **({"bias": bias.name} if bias is not None else {})}
        sites.append(Site("linear", name, nodes, tensors, {"weight": (n, k)}, {
            "in_features": k, "out_features": n, "weight_value": _weight_value(weight, layout),
            "input": node.inputs[0], "output": (add or node).outputs[0], "bias_value": bias,
        }))
    return sites


@site_finder("block", "onnx")
def _onnx_block_sites(graph) -> list[Site]:
    linears = [s.name for s in _onnx_linear_sites(graph)]
    paths = [[(".".join(n.split(".")[:i]), "") for i in range(1, n.count(".") + 1)] for n in linears]
    prefix = _block_prefix(paths)
    if prefix is None:
        return []
    members: dict[int, list[str]] = defaultdict(list)
    for name in linears:
        rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else ""
        index = rest.split(".", 1)[0]
        if index.isdigit():
            members[int(index)].append(name)
    sites = []
    for index in sorted(members):
        name, names = f"{prefix}.{index}", members[index]
        attention = _attention_part(name, names)
        in_attention = [n for n in names if attention and n.startswith(attention + ".")]
        sites.append(Site("block", name, [], {}, {}, {
            "attention": attention, "attention_linears": in_attention,
            "mlp_linears": [n for n in names if n not in in_attention], "linears": names,
        }, index=index))
    return sites


def _attention_part(block: str, names: list[str]) -> str | None:
    roles = [n for n in names if any(p.search(n[len(block) + 1:]) for r, p in _ROLE_PATTERNS.items() if r != "o")]
    if not roles:
        return None
    part = ".".join(os.path.commonprefix([n.split(".") for n in roles]))
    if not part.startswith(block + "."):
        return None
    parent = part.rsplit(".", 1)[0]  # BERT: q/k/v in attention.self, o in attention.output
    if parent != block and any(n.startswith(parent + ".") and not n.startswith(part + ".") for n in names):
        return parent
    return part


@site_finder("attention", "onnx")
def _onnx_attention_sites(graph) -> list[Site]:
    config = graph.meta.get("config") or {}
    out = []
    for block in _onnx_block_sites(graph):
        site = attention_from_block(block, config, block.info["linears"])
        if site is not None:
            out.append(site)
    return out


# -- rewrites -----------------------------------------------------------------------------------
def _add_initializer(graph, hint: str, array: np.ndarray):
    import onnx_ir as ir

    g = graph.onnx.graph
    name, i = hint, 0
    while name in g.initializers:
        i += 1
        name = f"{hint}_{i}"
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))
    g.register_initializer(value)
    return value


def _replace(graph, site: Site, builder: onnx_quant.TapeBuilder, new_output) -> None:
    """Swap the site's nodes for the builder's, keep the output's name, drop dead weights."""
    import onnx_ir as ir

    model = graph.onnx
    g = model.graph
    old = site.info["output"]
    new_output.name = old.name
    nodes = list(builder.tape.nodes)
    ir.convenience.replace_nodes_and_values(g, site.nodes[-1], site.nodes, nodes, [old], [new_output])
    for domain, version in builder.tape.used_opsets:
        model.opset_imports.setdefault(domain or "", version or 1)
    model.opset_imports.setdefault(onnx_quant.MSFT_DOMAIN, 1)
    weight = g.initializers.get(site.tensors["weight"])
    if weight is not None and not list(weight.uses()) and not weight.is_graph_output():
        del g.initializers[weight.name]


def _opset(graph) -> int:
    return graph.onnx.opset_imports.get("", 18)


def replace_with_matmul_nbits(graph, site: Site, packed: dict, bits: int, block_size: int) -> None:
    """Rewrite ``site`` as MatMulNBits (2/4/8 bits) or the 3-bit dequantize subgraph."""
    n, k = site.info["out_features"], site.info["in_features"]
    hint = site.name.replace("#", "_")
    qweight = _add_initializer(graph, f"{hint}.qweight", packed["qweight"].numpy())
    scales_2d = packed["scales"].float().numpy()
    zp = packed["zero_points"]
    b = onnx_quant.TapeBuilder(_opset(graph))
    x, bias = site.info["input"], site.info["bias_value"]
    if bits in onnx_quant.MATMUL_NBITS_BITS:
        scales = _add_initializer(graph, f"{hint}.scales", scales_2d.reshape(-1))
        zeros = _add_initializer(graph, f"{hint}.zero_points", zp.numpy().reshape(-1)) if zp is not None else None
        y = onnx_quant.matmul_nbits(b, x, qweight, scales, zeros, bias, k, n, bits, block_size)
    elif bits == 3:
        scales = _add_initializer(graph, f"{hint}.scales", scales_2d)
        zeros = _add_initializer(graph, f"{hint}.zero_points", zp.numpy()) if zp is not None else None
        y = onnx_quant.dequant_matmul(b, x, qweight, scales, zeros, bias, k, n, bits, block_size)
    else:
        raise UnsupportedError(f"{site.name}: no ONNX lowering for {bits}-bit weights")
    _replace(graph, site, b, y)


def replace_with_w8a8(graph, site: Site, w_q: torch.Tensor, w_scale: torch.Tensor, granularity: str = "token") -> None:
    """Rewrite ``site`` as dynamic int8 activations (per token or per tensor) x int8 ``w_q [N, K]``
    (per-channel scales)."""
    hint = site.name.replace("#", "_")
    w_t = _add_initializer(graph, f"{hint}.w_int8", w_q.T.contiguous().numpy())
    scale = _add_initializer(graph, f"{hint}.w_scale", w_scale.float().numpy())
    b = onnx_quant.TapeBuilder(_opset(graph))
    build = onnx_quant.w8a8_linear if granularity == "token" else onnx_quant.w8a8_tensor_linear
    y = build(b, site.info["input"], w_t, scale, site.info["bias_value"])
    _replace(graph, site, b, y)
