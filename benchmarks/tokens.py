"""Token pruning and merging: speed and quality on real models, against the usual tools.

all-MiniLM-L6-v2, batch 32 x 128 real tokens (KJV evaluation windows): ONNX Runtime latency
(graph optimisations on, 2 threads, median of several interleaved rounds) and sentence-embedding cosine
(mean pooling over the attention mask, L2-normalised) against fp32 torch, for
PruneTokens at keep 0.5 / 0.3 after layers 1, 2, 3 (attention-received scores; EViT's [CLS]
scores too at keep 0.5 after layers 2 and 3) and MergeTokens, each alone and composed with
rarefy's W8A8 (``QuantizeActivations(granularity="tensor")``: ONNX Runtime's fused
``DynamicQuantizeMatMul``), and for fp32 and keep 0.5 after layer 2 with ONNX Runtime's own
``quantize_dynamic`` (per-channel, MatMul) applied to the exported graph — the tool a user
would otherwise pick.

SmolLM2-135M prefill (FastV-style PruneTokens) on 512-token KJV evaluation prompts:
next-token top-1 agreement with the unpruned model, continuation perplexity (negative
log-likelihood of the next ``CONTINUATION`` tokens, each predicted from the pruned prefill of
everything before it), and ONNX Runtime prefill latency (batch 1 x 512).

Calibration text: pydoc calibration split (only used by calibrated passes). Evaluation text:
KJV evaluation split. Run under ``flock /tmp/rarefy-bench.lock python benchmarks/tokens.py``
(``--quick`` for a smoke run); the load average at the start and end is recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import rarefy as rf  # noqa: E402
from rarefy.eval import data  # noqa: E402
from rarefy.models import load_minilm, load_smollm2, mean_pool_embedding  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # 1 for quality-only runs side by side
CONTINUATION = 4
log = logging.getLogger("benchmarks.tokens")


def w8a8_pass():
    """rarefy's W8A8 with one activation scale per tensor (the fused ONNX Runtime operator)."""
    return "W8A8 (QuantizeActivations granularity=tensor)", \
        lambda: rf.passes.QuantizeActivations(granularity="tensor")


def interleaved_ms(fns: list, inputs: dict, runs: int) -> list[float]:
    """Median milliseconds of each of ``fns`` on ``inputs``: one warm-up each, then ``runs``
    rounds that call every fn once, so load from other jobs hits them alike."""
    for fn in fns:
        fn(**inputs)
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn(**inputs)
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def ort_dynamic(graph, threads: int):
    """ONNX Runtime's quantize_dynamic (per-channel int8, MatMul) on the exported graph."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        rf.export_onnx(graph, src)
        quantize_dynamic(str(src), str(dst), per_channel=True, op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(**inputs):
        return [torch.from_numpy(o) for o in session.run(None, {n: inputs[n].numpy() for n in names})]

    return run


def minilm(quick: bool) -> list[dict]:
    model, tokenizer = load_minilm(attn_implementation="sdpa")
    batch = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=32, seq_len=128, seed=0)[0]
    graph = rf.capture(model, batch)
    with torch.no_grad():
        reference = mean_pool_embedding(model(**batch).last_hidden_state, batch["attention_mask"])
    runs = 3 if quick else 7
    quant_name, quant = w8a8_pass()

    def build(name, passes, compose):
        g = rf.optimize(graph, passes, verify=False, progress=False) if passes else graph
        if compose == "ort_dynamic":
            fn = ort_dynamic(g, THREADS)
            first = lambda **kw: fn(**kw)[0]  # noqa: E731
        else:
            session = rf.compile(g, "onnxruntime", threads=THREADS)
            first = lambda **kw: session(**kw)[0]  # noqa: E731
        emb = mean_pool_embedding(first(**batch), batch["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        row = {"model": "all-MiniLM-L6-v2", "config": name, "quantization": compose,
               "cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4)}
        log.info("%s", row)
        return row, first

    token_configs = [("fp32", [])]
    settings = [(0.5, 2)] if quick else [(k, a) for k in (0.5, 0.3) for a in (1, 2, 3)]
    token_configs += [(f"PruneTokens keep={k} after_layer={a}", [rf.passes.PruneTokens(keep=k, after_layer=a)])
                      for k, a in settings]
    token_configs += [(f"PruneTokens keep=0.5 after_layer={a} score=cls",
                       [rf.passes.PruneTokens(keep=0.5, after_layer=a, score="cls")]) for a in ((2,) if quick else (2, 3))]
    token_configs += [(f"PruneTokens keep=0.5 after_layer=2 score={s} lookahead",
                       [rf.passes.PruneTokens(keep=0.5, after_layer=2, score=s, lookahead=True)])
                      for s in (("cls",) if quick else ("attention", "cls"))]
    token_configs += [(f"MergeTokens r={r}", [rf.passes.MergeTokens(r=r)]) for r in ((16,) if quick else (8, 16))]
    rows, runners = [], []
    for name, passes in token_configs:
        composes = [([], "none"), ([quant()], quant_name)]
        if name in ("fp32", "PruneTokens keep=0.5 after_layer=2"):
            composes.append(([], "ort_dynamic"))
        for extra, compose in composes:
            try:
                row, first = build(name, passes + extra, compose)
                rows.append(row)
                runners.append((row, first))
            except Exception as exc:  # recorded, not hidden: the table shows which setting failed and why
                log.exception("%s / %s failed", name, compose)
                rows.append({"model": "all-MiniLM-L6-v2", "config": name, "quantization": compose,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    for (row, _), ms in zip(runners, interleaved_ms([first for _, first in runners], batch, runs)):
        row["latency_ms"] = round(ms, 1)
    base = rows[0]["latency_ms"]
    for row in rows:
        if "latency_ms" in row:
            row["speedup_vs_fp32_ort"] = round(base / row["latency_ms"], 2)
    return rows


def untimed_quality(quick: bool) -> dict:
    """Quality only (no timing, so no lock needed): MergeTokens cosine on MiniLM in torch, SmolLM2 quality."""
    model, tokenizer = load_minilm(attn_implementation="sdpa")
    batch = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=32, seq_len=128, seed=0)[0]
    graph = rf.capture(model, batch)
    reference = mean_pool_embedding(graph(**batch)[0], batch["attention_mask"])
    rows = []
    for r in (8, 16):
        g = rf.optimize(graph, [rf.passes.MergeTokens(r=r)], verify=False, progress=False)
        cos = torch.nn.functional.cosine_similarity(mean_pool_embedding(g(**batch)[0], batch["attention_mask"]),
                                                    reference, dim=-1)
        rows.append({"model": "all-MiniLM-L6-v2", "config": f"MergeTokens r={r}", "quantization": "none",
                     "runtime": "torch (untimed)", "cosine_mean": round(float(cos.mean()), 4),
                     "cosine_min": round(float(cos.min()), 4)})
        log.info("%s", rows[-1])
    return {"minilm_merge_quality": rows, "smollm2_quality": smollm2(quick, timed_latency=False)}


def smollm2(quick: bool, timed_latency: bool = True) -> list[dict]:
    model, tokenizer = load_smollm2(attn_implementation="sdpa")
    n_prompts = 4 if quick else 8
    windows = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=n_prompts,
                                 seq_len=512 + CONTINUATION, seed=0)[0]
    ids = windows["input_ids"]
    example = {"input_ids": ids[:1, :512], "attention_mask": torch.ones(1, 512, dtype=torch.int64)}
    graph = rf.capture(model, example)
    configs = [("unpruned", [])] + [(f"PruneTokens keep={k} after_layer={a}", [rf.passes.PruneTokens(keep=k, after_layer=a)])
                                    for k, a in ([(0.5, 2)] if quick else [(0.5, 2), (0.3, 2), (0.5, 8)])]
    reference_top1, rows, sessions = None, [], []
    for name, passes in configs:
        g = rf.optimize(graph, passes, verify=False, progress=False) if passes else graph
        top1, nll = [], []
        for step in range(CONTINUATION):
            length = 512 + step
            inputs = {"input_ids": ids[:, :length], "attention_mask": torch.ones(n_prompts, length, dtype=torch.int64)}
            logits = torch.utils._pytree.tree_leaves(g(**inputs))[0]
            last = logits[:, -1].float()
            top1.append(last.argmax(-1))
            nll.append(torch.nn.functional.cross_entropy(last, ids[:, length], reduction="none"))
        top1, nll = torch.stack(top1), torch.stack(nll)
        reference_top1 = top1 if reference_top1 is None else reference_top1
        row = {"model": "SmolLM2-135M", "config": name, "prompts": n_prompts, "prompt_tokens": 512,
               "top1_agreement": round(float((top1 == reference_top1).float().mean()), 4),
               "continuation_ppl": round(float(nll.mean().exp()), 3)}
        if timed_latency:
            sessions.append(rf.compile(g, "onnxruntime", threads=THREADS))
        log.info("%s", row)
        rows.append(row)
    if timed_latency:
        for row, ms in zip(rows, interleaved_ms(sessions, example, 3 if quick else 7)):
            row["prefill_latency_ms"] = round(ms, 1)
        for row in rows:
            row["speedup_vs_unpruned_ort"] = round(rows[0]["prefill_latency_ms"] / row["prefill_latency_ms"], 2)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Tokens benchmark", "", f"Machine: {result['machine']}. {result['note']}", "",
             f"Calibration text: {result['calibration_text']}. Evaluation text: {result['evaluation_text']}.", "",
             "## all-MiniLM-L6-v2, batch 32 x 128, ONNX Runtime", "",
             "| config | quantization | latency ms | speedup | cosine mean | cosine min |", "|---|---|---|---|---|---|"]
    for r in result["minilm"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['quantization']} | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['config']} | {r['quantization']} | {r['latency_ms']} | {r['speedup_vs_fp32_ort']}x | "
                     f"{r['cosine_mean']} | {r['cosine_min']} |")
    lines += ["", "## SmolLM2-135M prefill, 512-token prompts", "",
              "| config | top-1 agreement | continuation ppl | prefill ms (ORT, 1 x 512) | speedup |", "|---|---|---|---|---|"]
    for r in result["smollm2"]:
        lines.append(f"| {r['config']} | {r['top1_agreement']} | {r['continuation_ppl']} | {r['prefill_latency_ms']} | "
                     f"{r['speedup_vs_unpruned_ort']}x |")
    if result.get("smollm2_note"):
        lines += ["", result["smollm2_note"] + "."]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    out = []
    for quant, speed, cos in (("none", 1.6, 0.95), (None, 3.0, 0.94)):
        match = [r for r in rows if r["config"].startswith("PruneTokens keep=0.5 after_layer=2")
                 and (r["quantization"] == quant if quant else r["quantization"] not in ("none", "ort_dynamic"))]
        for r in match:
            if "error" in r:
                continue
            met = r["speedup_vs_fp32_ort"] >= speed and r["cosine_mean"] >= cos
            out.append(f"{r['config']}, {r['quantization']}: {r['speedup_vs_fp32_ort']}x at cosine "
                       f"{r['cosine_mean']} (target >= {speed}x at >= {cos}): {'met' if met else 'NOT met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: fewer configs and runs")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--only-smollm2", action="store_true",
                        help="run only the SmolLM2 prefill section; its rows replace those in the saved results")
    parser.add_argument("--quality-only", action="store_true",
                        help="untimed: MergeTokens cosine (torch) and SmolLM2 quality -> results/tokens_quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(THREADS)
    if args.quality_only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "tokens_quality.json").write_text(json.dumps(untimed_quality(args.quick), indent=2))
        return
    import onnxruntime
    import transformers

    name = "tokens_quick" if args.quick else "tokens"
    if args.only_smollm2:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        result["smollm2"] = smollm2(args.quick)
        result["smollm2_note"] = (f"SmolLM2 section run separately ({THREADS} thread(s), sessions timed in "
                                  f"interleaved rounds); load average at its end {os.getloadavg()[0]:.1f}")
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{name}.md").write_text(markdown(result))
        return
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "note": f"Load average (1 min) at the start: {os.getloadavg()[0]:.1f}.",
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "threads": THREADS, "quick": args.quick,
        "calibration_text": data.describe("pydoc", "calibration"),
        "evaluation_text": data.describe("kjv", "evaluation"),
        "quantization_used": w8a8_pass()[0],
        "minilm": minilm(args.quick),
    }
    saved = RESULTS / f"{name}.json"
    if args.skip_smollm2:  # the SmolLM2 rows of the last run stay
        earlier = json.loads(saved.read_text()) if saved.exists() else {}
        result["smollm2"] = earlier.get("smollm2", [])
        if earlier.get("smollm2_note"):
            result["smollm2_note"] = earlier["smollm2_note"]
    else:
        result["smollm2"] = smollm2(args.quick)
    result["targets"] = targets(result["minilm"])
    result["note"] += f" At the end: {os.getloadavg()[0]:.1f}."
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
