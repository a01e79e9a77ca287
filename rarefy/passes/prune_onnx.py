"""The ONNX-dialect side of ``PruneHeads`` / ``PruneChannels``: statistics, FLAP bias, rewrite.

The groups come from ``rarefy.ir.onnx_structure`` (heads: Michel et al. 2019; channels and
FLAP's bias compensation: An et al. 2024); the scores are ``prune.unit_scores``, the same
code as the FX dialect, read through ``OnnxRewrite.tensor`` (weights in the nn.Linear
``[N, K]`` layout whatever the ONNX layout). Calibration statistics for ``wanda`` / ``flap``
come from running the graph in ONNX Runtime (optimisations off) with every consumer's input
added as a graph output, one batch at a time.

The rewrite never edits a tensor in place: the exporter shares equal initializers between
layers (zero biases, all-ones norms) and shape constants between nodes, so every sliced
weight and bias becomes a new initializer on its own node, every patched shape a new
constant (or a new Concat of the old pieces with one constant replaced) on its own node;
the initializers left without a use are removed. Value shapes along the pruned axis are
updated (ONNX Runtime rejects stale static shapes); the values whose axis the analysis lost
have their shape cleared for ONNX Runtime to infer.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ir.graph import Graph
from ..ir.onnx_dialect import clone_model
from ..ir.onnx_sites import _add_initializer
from ..ir.onnx_structure import const_array, shape_entries
from .prune import flap_delta


class OnnxRewrite:
    """Tensor access, statistics and the rewrite of the groups of one ONNX-dialect graph."""

    def __init__(self, graph, groups: list):
        self.graph = graph
        self.linears = {key: entry for group in groups for key, entry in group.linears.items()}
        self.detached: set[str] = set()  # initializers this rewrite stopped using
        self.names = {v.name for node in graph.onnx.graph for v in node.outputs}  # new values get fresh names

    def _fresh(self, hint: str) -> str:
        # onnx-ir names unnamed values "val_<i>", which the exporter's own values already use
        name, i = hint, 0
        while name in self.names or name in self.graph.onnx.graph.initializers:
            i += 1
            name = f"{hint}_{i}"
        self.names.add(name)
        return name

    def tensor(self, key: str) -> torch.Tensor:
        site, role = self.linears[key]
        if role == "bias":
            return torch.from_numpy(np.array(site.info["bias_value"].const_value.numpy()))
        return site.info["weight_value"]()

    def input_stats(self, groups: list, batches: list, progress: bool) -> dict[str, dict]:
        """Per consumer weight: channel sum, sum of squares and token count of its input, from ORT."""
        names = {key: self.linears[key][0].info["input"].name for group in groups for key in group.consumers}
        model = clone_model(self.graph.onnx)
        values = {v.name: v for node in model.graph for v in node.outputs}
        first = len(model.graph.outputs)
        wanted = sorted(set(names.values()))
        model.graph.outputs.extend(values[name] for name in wanted)
        runner = Graph("onnx", model, self.graph.signature)
        sums: dict[str, dict] = {}
        for batch in tqdm(batches, disable=not progress, desc="structured pruning statistics (ONNX Runtime)"):
            for name, out in zip(wanted, runner.run_batch(batch)[first:]):
                x = out.reshape(-1, out.shape[-1]).to(torch.float64)
                acc = sums.setdefault(name, {"sum": 0, "sum_sq": 0, "count": 0})
                acc["sum"] = acc["sum"] + x.sum(0)
                acc["sum_sq"] = acc["sum_sq"] + (x * x).sum(0)
                acc["count"] += x.shape[0]
        return {key: sums[name] for key, name in names.items()}

    # -- the rewrite ---------------------------------------------------------------------------------
    def compensate_bias(self, group, removed: list[int], activations: dict) -> int:
        """FLAP: bias += W[:, removed] @ mean(x[removed]) on the consumer (a bias Add is created if none)."""
        done = 0
        for key in group.consumers:
            site = self.linears[key][0]
            delta = flap_delta(self.tensor(key), group, removed, activations[key]).float()
            if site.info["bias_value"] is not None:
                old = torch.from_numpy(np.array(site.info["bias_value"].const_value.numpy()))
                self._set_bias(site, old + delta)
            else:
                self._add_bias(site, delta)
            done += 1
        return done

    def prune(self, group, keep: list[int]) -> None:
        """Slice every weight of the group to the kept units, patch shapes, resize value shapes."""
        for key, (site, role) in group.linears.items():
            tensor = self.tensor(key)
            size = group.params[key][0][1]
            index = group.indices(size, keep)
            if role == "bias":
                self._set_bias(site, tensor[index])
            else:
                self._set_weight(site, tensor[:, index] if role == "in" else tensor[index])
            product = next(n for n in site.nodes if n.op_type in ("MatMul", "Gemm")).outputs[0]
            if role == "out" and product not in group.axes:  # the product before its bias Add
                self._resize_last(product, len(index))
        per_node = defaultdict(dict)
        for node, entry, literal in group.patches:
            per_node[node][entry] = literal // group.units * len(keep)
        for node, sizes in per_node.items():
            self._patch_shape(node, sizes)
        self._resize(group, len(keep))
        self._drop_detached()

    def _resize(self, group, kept: int) -> None:
        import onnx_ir as ir

        for value, axis in group.axes.items():
            if value.shape is None:
                continue
            dims = list(value.shape.dims)
            if isinstance(dims[axis], int):
                dims[axis] = dims[axis] // group.units * kept
                value.shape = ir.Shape(dims)
        for value in group.lost:
            value.shape = None

    @staticmethod
    def _resize_last(value, size: int) -> None:
        import onnx_ir as ir

        if value.shape is not None:
            value.shape = ir.Shape([*value.shape.dims[:-1], size])

    def _hint(self, site, role: str) -> str:
        return f"{site.name.replace('#', '_')}.{role}"

    def _swap_input(self, node, index: int, new) -> None:
        old = node.inputs[index]
        node.replace_input_with(index, new)
        if old is not None and old.is_initializer():
            self.detached.add(old.name)

    def _set_weight(self, site, weight: torch.Tensor) -> None:
        """Write ``weight`` ([N, K]) back in the site's layout (MatMul [K, N], Transpose of [N, K], Gemm)."""
        first = site.nodes[0]
        main = next(n for n in site.nodes if n.op_type in ("MatMul", "Gemm"))
        if first.op_type == "Transpose":
            node, index, array = first, 0, weight.numpy()
            first.outputs[0].shape = None
        elif main.op_type == "Gemm" and (main.attributes.get("transB") and main.attributes["transB"].value):
            node, index, array = main, 1, weight.numpy()
        else:
            node, index, array = main, 1, weight.T.numpy()
        self._swap_input(node, index, _add_initializer(self.graph, self._hint(site, "weight"), array))

    def _set_bias(self, site, bias: torch.Tensor) -> None:
        value = _add_initializer(self.graph, self._hint(site, "bias"), bias.numpy())
        main = next(n for n in site.nodes if n.op_type in ("MatMul", "Gemm"))
        if main.op_type == "Gemm" and len(main.inputs) > 2 and main.inputs[2] is site.info["bias_value"]:
            self._swap_input(main, 2, value)
            return
        add = site.nodes[-1]
        self._swap_input(add, list(add.inputs).index(site.info["bias_value"]), value)
        site.info["bias_value"] = value

    def _add_bias(self, site, bias: torch.Tensor) -> None:
        import onnx_ir as ir

        out = site.info["output"]
        init = _add_initializer(self.graph, self._hint(site, "flap_bias"), bias.numpy())
        uses = list(out.uses())  # before the Add below becomes one of them
        add = ir.node("Add", [out, init])
        add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
        add.outputs[0].name = self._fresh(f"{out.name}_flap_bias")
        producer = out.producer()
        for use in uses:
            use.node.replace_input_with(use.idx, add.outputs[0])
        self.graph.onnx.graph.insert_after(producer, add)
        if out.is_graph_output():
            outputs = self.graph.onnx.graph.outputs
            outputs[outputs.index(out)] = add.outputs[0]
        site.info["output"], site.info["bias_value"] = add.outputs[0], init
        site.nodes.append(add)

    def _patch_shape(self, node, sizes: dict[int, int]) -> None:
        """Give ``node`` a shape input of its own with ``sizes`` at those entries."""
        import onnx_ir as ir

        shape = node.inputs[1]
        entries = shape_entries(shape)
        pieces: dict = {}
        for entry, size in sizes.items():
            _, _, position, offset = entries[entry]
            if position not in pieces:
                source = shape if position is None else shape.producer().inputs[position]
                pieces[position] = const_array(source).reshape(-1).astype(np.int64).copy()
            pieces[position][offset] = size
        hint = f"{node.name}.shape"
        if None in pieces:
            self._swap_input(node, 1, _add_initializer(self.graph, hint, pieces[None]))
            return
        concat = shape.producer()
        inputs = list(concat.inputs)
        for position, array in pieces.items():
            inputs[position] = _add_initializer(self.graph, hint, array)
        new = ir.node("Concat", inputs, {"axis": 0})
        new.outputs[0].dtype, new.outputs[0].shape = ir.DataType.INT64, ir.Shape([len(entries)])
        new.outputs[0].name = self._fresh(f"{node.name}_pruned_shape")
        self.graph.onnx.graph.insert_before(node, new)
        node.replace_input_with(1, new.outputs[0])

    def _drop_detached(self) -> None:
        initializers = self.graph.onnx.graph.initializers
        for name in sorted(self.detached):
            value = initializers.get(name)
            if value is not None and not list(value.uses()) and not value.is_graph_output():
                del initializers[name]
        self.detached.clear()
