"""run_lockstep: every batch in lock step gives the graph's own outputs; hooks see each node
once with every batch's inputs; ``after`` runs once the node ran; ``until`` stops early."""
import torch

import rarefy as rf
from rarefy.ir.calibration import run_lockstep
from rarefy.ir.fx_utils import get_tensor, set_tensor
from tiny_models import build, example_inputs


def _graph_and_batches():
    model, _ = build("llama")
    batches = [example_inputs("llama", seed=s) for s in range(3)]
    return rf.capture(model, batches[0]), batches


def test_lockstep_outputs_equal_the_graph_run_per_batch():
    graph, batches = _graph_and_batches()
    seen = []
    outputs = run_lockstep(graph, batches, lambda node, per_batch: seen.append((node, len(per_batch))),
                           progress=False)
    for batch, flat in zip(batches, outputs):
        torch.testing.assert_close(flat[0], graph.run_batch(batch)[0], atol=1e-6, rtol=1e-6)
    calls = [n for n in graph.fx.graph.nodes if n.op == "call_function"]
    assert [node for node, _ in seen] == calls and all(count == 3 for _, count in seen)


def test_hook_rewrites_apply_to_the_node_and_after_can_undo_them():
    graph, batches = _graph_and_batches()
    linear = graph.sites("linear")[0]
    node, path = linear.nodes[0], linear.tensors["weight"]
    original = get_tensor(graph.fx, path)
    outputs_seen = {}

    def hook(n, per_batch):
        if n is node:
            set_tensor(graph.fx, path, torch.zeros_like(original))
        elif node in n.all_input_nodes and not outputs_seen:  # the first reader sees the zeroed linear's output
            outputs_seen["value"] = per_batch[0][0][list(n.all_input_nodes).index(node)]

    def after(n):
        if n is node:
            set_tensor(graph.fx, path, original)

    run_lockstep(graph, batches, hook, progress=False, after=after)
    assert float(outputs_seen["value"].abs().max()) == 0.0  # the rewrite took effect before the node ran
    restored = get_tensor(graph.fx, path)  # `after` put the original back: same storage, no copy
    assert restored.data_ptr() == original.data_ptr() and torch.equal(restored, original)


def test_until_stops_after_the_last_named_node():
    graph, batches = _graph_and_batches()
    stop = graph.sites("linear")[1].nodes[0]
    seen = []
    outputs = run_lockstep(graph, batches, lambda node, _: seen.append(node), progress=False, until=[stop])
    assert seen[-1] is stop  # nothing after it was computed
    assert outputs == [[], [], []]
