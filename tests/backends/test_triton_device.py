"""The triton backend puts the whole graph on its device: weights, lifted constants, and the
devices that capture recorded in factory ops, casts and metadata asserts (run on a GPU, a CPU
tensor left anywhere fails the first kernel or index). Checked structurally on the meta device,
which needs no GPU; the user's graph stays on the CPU."""
import torch
from torch.utils import _pytree as pytree

import rarefy as rf
from rarefy.backends.triton import TritonModule
from rarefy.ir.fx_utils import get_tensor
from rarefy.passes import QuantizeWeights
from tiny_models import build


def _recorded_devices(gm) -> set:
    return {a.type for n in gm.graph.nodes for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.device)}


def _attr_devices(gm) -> set:
    values = [get_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    return {v.device.type for v in values if isinstance(v, torch.Tensor)}


def test_every_tensor_and_recorded_device_moves_to_the_module_device():
    model, inputs = build("llama")
    graph = rf.optimize(rf.capture(model, inputs), [QuantizeWeights(bits=4, group_size=32)], progress=False)
    assert _recorded_devices(graph.fx) == {"cpu"}  # capture recorded the CPU: the check below can fail
    module = TritonModule(graph, device="meta")
    assert module.kernels_used
    assert _recorded_devices(module.module) == {"meta"}
    assert _attr_devices(module.module) == {"meta"}
    assert {t.device.type for t in [*module.module.parameters(), *module.module.buffers()]} <= {"meta"}
    assert _attr_devices(graph.fx) == {"cpu"} and _recorded_devices(graph.fx) == {"cpu"}  # the input is untouched
