"""Structured pruning (PruneChannels / PruneHeads): quality, ONNX Runtime latency and file size.

* SmolLM2-135M: MLP intermediate channels removed to take away 10 %, 20 % and 30 % of the
  transformer-block linear parameters (embeddings excluded: the tied 49152 x 576 table is never
  pruned; the fraction of *all* parameters is reported beside it), magnitude versus FLAP.
  Attention is left whole: SmolLM2 has 3 KV groups per layer, so the smallest head step is a
  third of the attention. Perplexity on the evaluation text through the rarefy graph, the ONNX
  file size, and ONNX Runtime latency on 1 x 256 tokens.
* all-MiniLM-L6-v2, batch 32 x 128: fractions 0.1 .. 0.5 of the block linear parameters,
  removed as ``round(f * 12)`` heads per layer plus as many MLP channels as make up the rest;
  embedding cosine (mean-pooled, L2-normalised, mean over sentences) of the ONNX Runtime
  output against fp32 torch, and ONNX Runtime speedup against the unpruned ONNX model.

Calibration: the King James Bible's calibration split (Genesis to Psalm 62); evaluation: its
evaluation split (Psalm 62 to Revelation) -- disjoint text, named in the results. Latency: medians of ``--repeats`` runs with the unpruned and the
pruned session measured alternately, graph optimisations on, 2 intra-op threads. Magnitude, FLAP
and Torch-Pruning remove the same number of heads / channels per block, so the models have the
same shapes: only FLAP's is exported and timed (it carries the extra compensation biases), which
keeps the run to one ONNX export per fraction on this shared machine. The tool a
user would otherwise pick, Torch-Pruning (``pip install torch-pruning``; skipped with the reason
when absent), prunes MiniLM at the same per-block counts with its group-magnitude criterion
and goes through the same capture / ONNX / ORT path. On SmolLM2 it is not run. Run
``flock /tmp/rarefy-bench.lock python benchmarks/prune_structured.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rarefy as rf
from rarefy.eval.data import describe, sentence_batches, token_batches
from rarefy.eval.metrics import per_row_cosine, perplexity
from rarefy.models import load_minilm, load_smollm2, mean_pool_embedding
from rarefy.passes import PruneChannels, PruneHeads

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # 1 for quality-only runs side by side


def _block_linear_params(graph) -> int:
    blocks = graph.sites("block")
    names = {n for b in blocks for n in b.info["linears"]}
    return sum(s.info["in_features"] * s.info["out_features"] for s in graph.sites("linear") if s.name in names)


def _params(graph) -> int:
    return graph.parameter_bytes() // 4


def _alternating_latency(base, pruned, inputs, repeats) -> tuple[float, float]:
    """Medians (ms) of ``repeats`` runs each, the two sessions measured in turn."""
    base(**inputs), pruned(**inputs)  # warm-up
    times = {"base": [], "pruned": []}
    for _ in range(repeats):
        for name, run in (("base", base), ("pruned", pruned)):
            start = time.perf_counter()
            run(**inputs)
            times[name].append(1000 * (time.perf_counter() - start))
    return statistics.median(times["base"]), statistics.median(times["pruned"])


def _export(graph, workdir: Path, name: str):
    """Write the ONNX file; return its size in bytes and an ORT runner (optimisations on)."""
    import onnxruntime as ort

    path = rf.export_onnx(graph, workdir / f"{name}.onnx")
    size = path.stat().st_size + sum(p.stat().st_size for p in workdir.glob(f"{name}.onnx.data"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    path.unlink()  # the session holds the model; keep /tmp small

    def run(**batch):
        outputs = session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})
        return [torch.from_numpy(o) for o in outputs]

    return size, run


def smollm2(quick: bool, repeats: int, workdir: Path) -> dict:
    model, tok = load_smollm2()
    calib = token_batches(tok, "kjv", "calibration", n_batches=1 if quick else 8, batch_size=1, seq_len=512)
    evaluation = token_batches(tok, "kjv", "evaluation", n_batches=1 if quick else 8, batch_size=1, seq_len=512)
    latency_input = token_batches(tok, "kjv", "evaluation", n_batches=1, batch_size=1, seq_len=256, seed=1)[0]
    graph = rf.capture(model, calib[0])
    n_blocks = len(graph.sites("block"))
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    block_params, total = _block_linear_params(graph), _params(graph)
    base_bytes, base_ort = _export(graph, workdir, "fp32")
    rows = {"fp32": {"ppl": perplexity(graph, evaluation), "params": total, "onnx_bytes": base_bytes}}
    for fraction in ((0.2,) if quick else (0.1, 0.2, 0.3)):
        count = round(fraction * block_params / (n_blocks * 3 * hidden))  # gate + up rows, down columns
        for method in ("magnitude", "flap"):  # same shapes: only flap's model is exported and timed
            name = f"{method}_{int(fraction * 100)}"
            start = time.perf_counter()
            out = rf.optimize(graph, [PruneChannels(count=count, method=method)], calibration=calib,
                              evaluation=evaluation[:1], progress=False)
            seconds = time.perf_counter() - start
            rows[name] = {
                "method": method, "channels_removed_per_block": count, "of_channels": inter,
                "block_linear_fraction": round(count * 3 * hidden * n_blocks / block_params, 4),
                "total_param_fraction": round((total - _params(out)) / total, 4), "params": _params(out),
                "ppl": perplexity(out, evaluation), "optimize_s": seconds,
            }
            if method == "flap":
                size, pruned_ort = _export(out, workdir, name)
                base_ms, pruned_ms = _alternating_latency(base_ort, pruned_ort, latency_input, repeats)
                rows[name].update({"onnx_bytes": size, "ort_ms_base": base_ms, "ort_ms": pruned_ms,
                                   "speedup": base_ms / pruned_ms})
            print(f"[prune_structured] smollm2 {name}: {rows[name]}", flush=True)
    return {"model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF)",
            "calibration": describe("kjv", "calibration") + f": {len(calib)} x 512 tokens",
            "evaluation": describe("kjv", "evaluation") + f": {len(evaluation)} x 512 tokens", "block_linear_params": block_params, "rows": rows,
            "latency_input": "1 x 256 tokens"}


def torch_pruning_minilm(calib_batch, n_heads: int, n_channels: int):
    """all-MiniLM-L6-v2 pruned by Torch-Pruning (group magnitude, the same per-block head and channel
    counts, embeddings and pooler ignored so only heads and MLP channels go); None if not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model, _ = load_minilm()
    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {lin: m.num_attention_heads for m in attentions for lin in (m.query, m.key, m.value)}
    pruner = tp.pruner.MetaPruner(
        model, dict(calib_batch), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=n_channels / model.config.intermediate_size, ignored_layers=[model.pooler, model.embeddings],
        output_transform=lambda out: out[0].sum(), num_heads=num_heads, prune_head_dims=False,
        prune_num_heads=True, head_pruning_ratio=n_heads / model.config.num_attention_heads)
    pruner.step()
    for m in attentions:  # Torch-Pruning leaves the head bookkeeping to the user
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
    return model, f"torch-pruning {tp.__version__} MetaPruner, GroupMagnitudeImportance(p=2)"


def minilm(quick: bool, repeats: int, workdir: Path) -> dict:
    model, tok = load_minilm()
    calib = sentence_batches(tok, "kjv", "calibration", n_batches=1 if quick else 4, batch_size=16, max_len=128)
    evaluation = sentence_batches(tok, "kjv", "evaluation", n_batches=1, batch_size=8 if quick else 32, max_len=128)
    batch = evaluation[0]
    graph = rf.capture(model, calib[0])
    config = model.config
    hidden, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    head_params, channel_params = 4 * hidden * (hidden // heads), 2 * hidden
    n_blocks = len(graph.sites("block"))
    block_params, total = _block_linear_params(graph), _params(graph)
    reference = mean_pool_embedding(graph(**batch)[0], batch["attention_mask"])
    base_bytes, base_ort = _export(graph, workdir, "fp32")
    rows = {}
    for fraction in ((0.3,) if quick else (0.1, 0.2, 0.3, 0.4, 0.5)):
        n_heads = round(fraction * heads)
        n_channels = max(0, round((fraction * block_params / n_blocks - n_heads * head_params) / channel_params))
        for method in ("magnitude", "flap"):  # same shapes: only flap's model is exported and timed
            name = f"{method}_{int(fraction * 100)}"
            out = rf.optimize(graph, [PruneHeads(count=n_heads, method=method),
                                      PruneChannels(count=n_channels, method=method)],
                              calibration=calib, evaluation=evaluation, progress=False)
            removed = n_blocks * (n_heads * head_params + n_channels * channel_params)
            rows[name] = {
                "method": method, "heads_removed_per_block": n_heads, "of_heads": heads,
                "channels_removed_per_block": n_channels, "of_channels": inter,
                "block_linear_fraction": round(removed / block_params, 4),
                "total_param_fraction": round((total - _params(out)) / total, 4),
            }
            if method == "flap":  # cosine of the ORT output
                size, pruned_ort = _export(out, workdir, name)
                embedding = mean_pool_embedding(pruned_ort(**batch)[0], batch["attention_mask"])
                base_ms, pruned_ms = _alternating_latency(base_ort, pruned_ort, batch, repeats)
                rows[name].update({"onnx_bytes": size, "ort_ms_base": base_ms, "ort_ms": pruned_ms,
                                   "speedup": base_ms / pruned_ms})
            else:  # cosine of the rarefy graph (ORT matches it to ~1e-6, see tests/passes/test_prune.py)
                embedding = mean_pool_embedding(out(**batch)[0], batch["attention_mask"])
            rows[name]["embedding_cosine"] = per_row_cosine(reference, embedding)
            print(f"[prune_structured] minilm {name}: {rows[name]}", flush=True)
        pruned = torch_pruning_minilm(calib[0], n_heads, n_channels)
        if pruned is None:
            rows[f"torch_pruning_{int(fraction * 100)}"] = {"skipped": "torch-pruning is not installed"}
            continue
        tp_model, tool = pruned
        with torch.no_grad():  # cosine of the pruned torch model (same shapes as flap's when the counts match)
            embedding = mean_pool_embedding(tp_model(**batch)[0], batch["attention_mask"])
        layer = tp_model.encoder.layer[0]
        tp_params = sum(p.numel() for p in tp_model.parameters())
        rows[f"torch_pruning_{int(fraction * 100)}"] = {
            "method": tool, "heads_removed_per_block": heads - layer.attention.self.num_attention_heads,
            "of_heads": heads, "channels_removed_per_block": inter - layer.intermediate.dense.out_features,
            "of_channels": inter, "total_param_fraction": round(1 - tp_params / sum(
                p.numel() for p in model.parameters()), 4),
            "embedding_cosine": per_row_cosine(reference, embedding),
        }
        print(f"[prune_structured] minilm torch_pruning: {rows[f'torch_pruning_{int(fraction * 100)}']}", flush=True)
    return {"model": "all-MiniLM-L6-v2", "batch": f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}",
            "calibration": describe("kjv", "calibration") + " (sentences)",
            "evaluation": describe("kjv", "evaluation") + " (sentences)", "block_linear_params": block_params,
            "fp32_onnx_bytes": base_bytes, "rows": rows}


def environment() -> dict:
    import onnxruntime
    import transformers

    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}}


def targets(result: dict) -> dict:
    out = {}
    smol = result["smollm2"]["rows"]
    if "flap_20" in smol:
        out["flap_beats_magnitude_at_20pct"] = smol["flap_20"]["ppl"] < smol["magnitude_20"]["ppl"]
        out["smollm2_flap_20_faster_in_ort"] = smol["flap_20"]["speedup"] > 1.0
    mini = result["minilm"]["rows"]
    if "flap_30" in mini:
        out["minilm_30pct_speedup_at_least_1.3x"] = mini["flap_30"]["speedup"] >= 1.3
    return out


def _timing(row: dict) -> str:
    if "ort_ms" not in row:
        return "same shapes as flap | |"
    return f"{row['onnx_bytes'] / 1e6:.1f} | {row['ort_ms']:.1f} ({row['ort_ms_base']:.1f}) | {row['speedup']:.2f}"


def markdown(result: dict) -> str:
    smol, mini = result["smollm2"], result["minilm"]
    lines = [f"# Structured pruning{' (quick)' if result['quick'] else ''}", "",
             f"Machine: {result['machine']}. Latency: ORT, {THREADS} threads, "
             f"medians of {result['repeats']} alternating runs.", "",
             f"## {smol['model']}: MLP channels, magnitude vs FLAP", "",
             f"Calibration: {smol['calibration']}. Evaluation: {smol['evaluation']}. Latency on "
             f"{smol['latency_input']}. Fractions are of the block linear parameters "
             f"({smol['block_linear_params'] / 1e6:.1f} M); 'of all' counts the embeddings too.", "",
             "| setting | channels removed / block | of block linears | of all params | ppl | ONNX MB | "
             "ORT ms (unpruned) | speedup |", "|---|---|---|---|---|---|---|---|"]
    fp32 = smol["rows"]["fp32"]
    lines.append(f"| fp32 | 0 | 0 | 0 | {fp32['ppl']:.2f} | {fp32['onnx_bytes'] / 1e6:.1f} | | 1.00 |")
    for name, row in smol["rows"].items():
        if name != "fp32":
            lines.append(f"| {name} | {row['channels_removed_per_block']} / {row['of_channels']} | "
                         f"{row['block_linear_fraction']:.3f} | {row['total_param_fraction']:.3f} | {row['ppl']:.2f} | "
                         f"{_timing(row)} |")
    lines += ["", f"## {mini['model']}, batch {mini['batch']}: heads + MLP channels", "",
              f"Calibration: {mini['calibration']}. Evaluation: {mini['evaluation']}. Cosine to the fp32 torch "
              f"embedding, mean over sentences (flap: the ORT output; magnitude: the rarefy graph; Torch-Pruning: "
              f"its torch model). fp32 ONNX: {mini['fp32_onnx_bytes'] / 1e6:.1f} MB.", "",
              "| setting | heads / channels removed per block | of block linears | of all params | embedding cosine | "
              "ONNX MB | ORT ms (unpruned) | speedup |", "|---|---|---|---|---|---|---|---|"]
    for name, row in mini["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | | |")
            continue
        lines.append(f"| {name} | {row['heads_removed_per_block']}/{row['of_heads']}, "
                     f"{row['channels_removed_per_block']}/{row['of_channels']} | {row.get('block_linear_fraction', '')} | "
                     f"{row['total_param_fraction']:.3f} | {row['embedding_cosine']:.4f} | {_timing(row)} |")
    lines += ["", "## Targets", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def run_structured(quick: bool, repeats: int = 5) -> dict:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result = {"quick": quick, "repeats": repeats, **environment(),
                  "smollm2": smollm2(quick, repeats, workdir), "minilm": minilm(quick, repeats, workdir)}
    result["targets"] = targets(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: one batch, fewer settings")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = run_structured(args.quick, args.repeats)
    stem = "prune_structured_quick" if args.quick else "prune_structured"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
