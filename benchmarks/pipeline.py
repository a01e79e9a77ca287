"""Pipeline cost: capture, optimize (empty and int8) and export, time and peak memory.

For all-MiniLM-L6-v2 and SmolLM2-135M, each run is a fresh Python process that loads the
model and text once, then times each stage in turn:

* ``capture``        rf.capture(model, example batch)
* ``optimize_empty`` rf.optimize(graph, []) -- the pipeline's own cost: copy + verification runs
* ``optimize_int8``  rf.optimize(graph, [QuantizeWeights(bits=8)]) -- per-channel RTN, packed
* ``export``         rf.export_onnx(int8 graph) -- re-export and MatMulNBits lowering, file written

and, side by side in the same process, what a user would otherwise run to get an int8 ONNX
file: ``torch.onnx.export(model, dynamo=True)`` of the fp32 model, then ONNX Runtime's
``quantize_dynamic`` (int8 weights, per channel) on that file.

Peak memory is the resident-set high-water mark (VmHWM, the kernel's ``ru_maxrss``) of the
process *during the stage*: it is reset before each stage by writing 5 to
``/proc/self/clear_refs``, so it includes what was already resident (the model, the text)
and everything the stage allocated, torch tensors included; tracemalloc would miss those.
Medians of several runs (processes). Timings come from a shared 2-core machine on which
other engineers run jobs too; run it as
``flock /tmp/rarefy-bench.lock python benchmarks/pipeline.py`` so timed runs do not overlap.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = ("minilm", "smollm2")
STAGES = ("capture", "optimize_empty", "optimize_int8", "export", "baseline_torch_onnx_export",
          "baseline_ort_quantize_dynamic")
LABELS = {
    "capture": "rarefy capture", "optimize_empty": "rarefy optimize, no passes",
    "optimize_int8": "rarefy optimize, QuantizeWeights(bits=8)", "export": "rarefy export_onnx (int8)",
    "baseline_torch_onnx_export": "torch.onnx.export(dynamo=True), fp32",
    "baseline_ort_quantize_dynamic": "ORT quantize_dynamic int8 per-channel",
}


# -- one run, in a child process ------------------------------------------------------------------
def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _measure(fn):
    gc.collect()
    start_rss = _rss_mb("VmRSS")
    reset = _peak_rss_reset()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    return value, {"seconds": seconds, "peak_rss_mb": _rss_mb("VmHWM"), "rss_at_start_mb": start_rss,
                   "peak_reset": reset}


def run_once(model_name: str, batches: int, batch_size: int, seq_len: int) -> dict:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import rarefy as rf
    from rarefy.eval.data import describe, token_batches
    from rarefy.models import load_bundled

    torch.manual_seed(0)
    model, tokenizer = load_bundled(model_name)
    calibration = rf.Calibration(token_batches(tokenizer, "pydoc", "calibration", batches, batch_size, seq_len),
                                 describe("pydoc", "calibration"))
    evaluation = rf.Calibration(token_batches(tokenizer, "kjv", "evaluation", batches, batch_size, seq_len),
                                describe("kjv", "evaluation"))
    example = calibration.batches[0]
    out: dict = {}
    graph, out["capture"] = _measure(lambda: rf.capture(model, example))
    _, out["optimize_empty"] = _measure(
        lambda: rf.optimize(graph, [], calibration=calibration, evaluation=evaluation, progress=False))
    q, out["optimize_int8"] = _measure(lambda: rf.optimize(graph, [rf.passes.QuantizeWeights(bits=8)],
                                                            calibration=calibration, evaluation=evaluation,
                                                            progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, out["export"] = _measure(lambda: rf.export_onnx(q, tmp / "rarefy" / "model.onnx"))
        out["export"]["file_mb"] = (tmp / "rarefy" / "model.onnx").stat().st_size / 1e6
        out["optimize_int8"]["sqnr_db"] = q.report.row("QuantizeWeights").sqnr_db
        q = None  # free the int8 graph before the baselines run
        _, out["baseline_torch_onnx_export"] = _measure(lambda: _torch_onnx_export(model, example, tmp / "fp32.onnx"))
        out["baseline_torch_onnx_export"]["file_mb"] = _onnx_bytes(tmp / "fp32.onnx") / 1e6
        _, out["baseline_ort_quantize_dynamic"] = _measure(lambda: quantize_dynamic(
            tmp / "fp32.onnx", tmp / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True))
        out["baseline_ort_quantize_dynamic"]["file_mb"] = _onnx_bytes(tmp / "int8.onnx") / 1e6
    return out


def _torch_onnx_export(model, example: dict, path: Path) -> None:
    import contextlib
    import io

    import torch
    from torch.export import Dim

    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # as rf.capture does: a DynamicCache output does not export
    dims = {name: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for name in example}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (), str(path), kwargs=dict(example), dynamo=True, dynamic_shapes=dims,
                          external_data=False)


def _onnx_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


# -- the driver ------------------------------------------------------------------------------------
def _child(model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", model, "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child for {model} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    summary = {}
    for stage in STAGES:
        rows = [r[stage] for r in runs]
        summary[stage] = {
            "label": LABELS[stage],
            "seconds_median": statistics.median(r["seconds"] for r in rows),
            "seconds_runs": [round(r["seconds"], 3) for r in rows],
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rows),
            "rss_at_start_mb_median": statistics.median(r["rss_at_start_mb"] for r in rows),
        }
        for extra in ("file_mb", "sqnr_db"):
            if extra in rows[0]:
                summary[stage][extra] = statistics.median(r[extra] for r in rows)
    totals = {"rarefy": ("capture", "optimize_int8", "export"),
              "torch.onnx.export + ORT quantize_dynamic": ("baseline_torch_onnx_export", "baseline_ort_quantize_dynamic")}
    summary["int8_onnx_total_seconds_median"] = {
        name: statistics.median(sum(r[s]["seconds"] for s in stages) for r in runs) for name, stages in totals.items()
    }
    return summary


def _environment() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    from rarefy.eval.data import describe

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    commit += " (+ uncommitted changes in the working tree)" if dirty else ""
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB, "
                   f"{platform.platform()}; load average {os.getloadavg()[0]:.1f} at the start; "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, CPU affinity "
                   f"{sorted(os.sched_getaffinity(0))}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
                     "rarefy_commit": commit},
        "calibration_text": describe("pydoc", "calibration"),
        "evaluation_text": describe("kjv", "evaluation"),
    }


def _markdown(result: dict) -> str:
    lines = [
        "# Pipeline cost (benchmarks/pipeline.py)", "",
        f"Machine: {result['machine']}. "
        f"Medians of up to {result['runs']} runs (per model below), each a fresh process; batches of "
        f"{result['settings']['batch_size']} x {result['settings']['seq_len']} tokens, "
        f"{result['settings']['batches']} calibration (pydoc) and {result['settings']['batches']} evaluation (kjv).",
        f"Peak memory: {result['memory_method']}", "",
    ]
    for model, summary in result["models"].items():
        lines += [f"## {model} ({summary['runs']} runs)", "", "| stage | time s (median) | runs | peak RSS MB | RSS at start MB | notes |",
                  "|---|---|---|---|---|---|"]
        for stage in STAGES:
            s = summary[stage]
            notes = []
            if "file_mb" in s:
                notes.append(f"file {s['file_mb']:.1f} MB")
            if "sqnr_db" in s:
                notes.append(f"SQNR {s['sqnr_db']:.1f} dB vs fp32 (kjv)")
            lines.append(f"| {s['label']} | {s['seconds_median']:.2f} | {', '.join(map(str, s['seconds_runs']))} | "
                         f"{s['peak_rss_mb_median']:.0f} | {s['rss_at_start_mb_median']:.0f} | {'; '.join(notes)} |")
        totals = summary["int8_onnx_total_seconds_median"]
        lines += ["", "int8 ONNX file from the fp32 model, total: " +
                  "; ".join(f"{name} {sec:.1f} s" for name, sec in totals.items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: MiniLM only, one run, tiny batches")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child, args.batches, args.batch_size, args.seq_len)))
        return
    if args.quick:
        args.runs, args.models, args.batches, args.batch_size, args.seq_len = 1, ["minilm"], 2, 2, 32
    result = {**_environment(), "runs": args.runs,
              "settings": {"batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len},
              "memory_method": "VmHWM (resident-set high-water, = ru_maxrss) of the benchmark process during "
                               "each stage, reset before it via /proc/self/clear_refs; includes the resident "
                               "model and data", "models": {}}
    name = "pipeline_quick" if args.quick else "pipeline"
    for model in args.models:
        runs = []
        for i in range(args.runs):
            print(f"{model}: run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
            runs.append(_child(model, args))
            if not all(r[s]["peak_reset"] for r in runs for s in STAGES):
                result["memory_method"] += " (WARNING: the reset failed; peaks are since process start)"
            result["models"][model] = {"runs": len(runs), **_summary(runs)}
            _write(result, name)  # after every run, so an interrupted benchmark keeps what it measured
    print(_markdown(result))


def _write(result: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(result))


if __name__ == "__main__":
    main()
