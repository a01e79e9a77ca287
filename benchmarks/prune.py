"""Pruning on SmolLM2-135M: weight sparsity (Sparsify) and layer dropping (DropLayers).

* Sparsity grid: 50% unstructured and 2:4, for magnitude, Wanda and SparseGPT, next to what
  a user would otherwise run: ``torch.nn.utils.prune.l1_unstructured`` (per-layer magnitude,
  weights stay dense with a mask) on the same linears. Held-out perplexity and the bytes of
  the exported ONNX artifact (rarefy stores values + 2-bit positions or a 1-bit mask).
* Layer dropping: 25% of the units (7 of 30) as whole blocks, attention sublayers only and
  MLP sublayers only, scored by Block Influence (cosine) or by the loss increase (ppl).
  Perplexity, and ONNX Runtime latency (median of 5 runs) next to the dense model.

Calibration: the KJV calibration split (Genesis to Psalm 62); evaluation: the KJV evaluation
split (Psalm 62 to Revelation) -- disjoint text, as in benchmarks/quantize.py, whose fp32
perplexity this one shares. Run it as ``flock /tmp/rarefy-bench.lock python benchmarks/prune.py``
(``--quick`` for a smoke run); the load average is recorded.
Results: ``benchmarks/results/prune.json`` and ``prune.md`` (``prune_quick.*`` with --quick).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rarefy as rf  # noqa: E402
from rarefy.eval import describe, perplexity, token_batches  # noqa: E402
from rarefy.models import load_smollm2  # noqa: E402
from rarefy.ir.calibration import Calibration  # noqa: E402
from rarefy.passes import DropLayers, Sparsify  # noqa: E402
from rarefy.passes.manager import PassContext  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOCK = "/tmp/rarefy-bench.lock"
PARTS = ("sparsity", "layers", "dense")
METHODS = ("magnitude", "wanda", "sparsegpt")  # --methods: a subset
LATENCY = True  # --no-latency: perplexity only (ORT latency waits for the shared lock)
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # 1 for quality-only runs side by side
TARGETS = {  # the targets: perplexity ratios to the dense model
    "magnitude unstructured (reference x8.5)": 8.5, "magnitude 2:4 (reference x24)": 24.0,
    "wanda/sparsegpt unstructured <=": 1.60, "wanda/sparsegpt 2:4 <=": 2.50,
    "7 blocks by cosine (reference x2.5)": 2.5, "7 attention by cosine (reference x1.57)": 1.57,
    "25% attention <=": 1.40,
}
log = logging.getLogger("benchmarks.prune")


def environment() -> dict:
    import onnxruntime
    import transformers

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; load average "
                   f"{os.getloadavg()[0]:.1f} at the start",
        "threads": THREADS,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
    }


def ort_latency_ms(graph, batch, repeats: int) -> float:
    """Median ORT latency, timed while holding /tmp/rarefy-bench.lock (no overlapping timed runs)."""
    import fcntl

    session = rf.compile(graph, "onnxruntime", threads=THREADS)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        session(**batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session(**batch)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def onnx_bytes(graph, workdir: Path, name: str) -> int:
    path = rf.export_onnx(graph, workdir / name / "model.onnx")
    return path.stat().st_size


def torch_prune_baseline(model, calibration_sites: list[str], evaluation) -> dict:
    """torch.nn.utils.prune.l1_unstructured at 50% on the same block linears."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    for name in calibration_sites:
        prune.l1_unstructured(pruned.get_submodule(name), "weight", amount=0.5)
    ppl = perplexity(pruned, evaluation)
    state_bytes = sum(t.numel() * t.element_size() for t in pruned.state_dict().values())
    return {"perplexity": ppl, "state_dict_bytes": state_bytes,
            "note": "weights stay dense and a dense mask is added (weight_orig + weight_mask)"}


def sparsity_grid(graph, model, calibration, evaluation, dense_ppl, workdir, quick, save_partial) -> dict:
    rows = []
    block_linears = [n for b in graph.sites("block") for n in b.info["linears"]]
    if "magnitude" in METHODS:
        base = torch_prune_baseline(model, block_linears, evaluation)
        rows.append({"method": "torch.nn.utils.prune.l1_unstructured", "pattern": "unstructured",
                     "perplexity": base["perplexity"], "ratio": base["perplexity"] / dense_ppl,
                     "bytes": base["state_dict_bytes"], "bytes_kind": "state_dict", "note": base["note"]})
        log.info("torch prune baseline: %s", rows[-1])
    ctx = PassContext(calibration=Calibration(calibration), progress=False)
    for method in METHODS:
        for pattern in ("unstructured", "2:4"):
            start = time.perf_counter()
            # the pass on one copy (what rf.optimize(verify=False) does, without its second copy: memory)
            row = Sparsify(0.5, pattern=pattern, method=method)(graph.copy(), ctx)
            out = row.graph
            seconds = time.perf_counter() - start
            ppl = perplexity(out, evaluation)
            entry = {"method": method, "pattern": pattern, "perplexity": ppl, "ratio": ppl / dense_ppl,
                     "pass_seconds": seconds, "sparse_linears": row.stats["sparse_linear"],
                     "achieved_sparsity": row.details["total"]["sparsity"],
                     "weight_bytes_stored": row.details["total"]["stored_bytes"],
                     "weight_bytes_dense": row.details["total"]["dense_bytes"], "notes": row.notes[-2:]}
            entry["parameter_bytes"] = out.parameter_bytes()
            if method == "wanda" and pattern == "2:4" and not quick and LATENCY:
                entry["bytes"] = onnx_bytes(out, workdir, "wanda-2of4")
                entry["bytes_kind"] = "onnx file"
            rows.append(entry)
            log.info("sparsity %s", entry)
            save_partial({"rows": rows})
    return {"rows": rows}


LAYER_ROWS = (  # (metric, unit, iterative): the cheap one-shot cosine rows first, so the unit comparison lands early
    *(("cosine", u, False) for u in ("block", "attention", "mlp")),
    *(("ppl", u, False) for u in ("block", "attention", "mlp")),
    ("ppl", "attention", True), ("ppl", "block", True), ("cosine", "attention", True),
)


def layer_grid(graph, calibration, evaluation, dense_ppl, latency_batch, repeats, quick, save_partial) -> dict:
    rows = []
    result = {"rows": rows}
    if not quick and LATENCY:  # in this run, beside the dropped models' latencies
        result["dense_ort_latency_ms"] = ort_latency_ms(graph, latency_batch, repeats)
    timed_units = set()
    for metric, unit, iterative in LAYER_ROWS:
        start = time.perf_counter()
        # ppl bypasses each of the 30 units in turn: two calibration sequences keep it affordable
        batches = calibration if metric == "cosine" else calibration[:2]
        out = rf.optimize(graph, [DropLayers(fraction=0.25, unit=unit, metric=metric, iterative=iterative)],
                          calibration=batches, verify=False, progress=False)
        seconds = time.perf_counter() - start
        row = out.report.rows[-1]
        ppl = perplexity(out, evaluation)
        dropped = [name for name, d in row.details.items() if isinstance(d, dict) and d.get("dropped")]
        entry = {"unit": unit, "metric": metric, "iterative": iterative, "dropped": dropped, "perplexity": ppl,
                 "ratio": ppl / dense_ppl, "pass_seconds": seconds, "params_bytes": out.parameter_bytes(),
                 "scores": {n: d["score"] for n, d in row.details.items() if isinstance(d, dict)}}
        entry["calibration_tokens"] = sum(b["input_ids"].numel() for b in batches)
        # every row of a unit kind removes as many units of the same shape: one latency per kind
        if unit not in timed_units and not quick and LATENCY:
            entry["ort_latency_ms"] = ort_latency_ms(out, latency_batch, repeats)
            timed_units.add(unit)
        rows.append(entry)
        log.info("layers %s", {k: v for k, v in entry.items() if k != "scores"})
        save_partial(result)
    return result


def structured(quick: bool) -> dict:
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from prune_structured import run_structured
    except ImportError as exc:
        return {"skipped": f"benchmarks/prune_structured.py not importable: {exc}"}
    try:
        return run_structured(quick)
    except Exception as exc:  # another engineer's benchmark: record, do not fail ours
        return {"skipped": f"run_structured failed: {type(exc).__name__}: {exc}"}


def run(quick: bool, part: str) -> dict:
    """One part of the benchmark ("sparsity", "layers" or "dense"), saved on its own."""
    torch.set_num_threads(THREADS)
    model, tok = load_smollm2()
    n_cal, n_eval, seq = (2, 1, 64) if quick else (16, 8, 512)
    calibration = token_batches(tok, "kjv", "calibration", n_batches=n_cal, batch_size=1, seq_len=seq)
    evaluation = token_batches(tok, "kjv", "evaluation", n_batches=n_eval, batch_size=1, seq_len=seq)
    latency_batch = token_batches(tok, "kjv", "evaluation", n_batches=1, batch_size=1, seq_len=seq, seed=1)[0]
    repeats = 2 if quick else 5
    graph = rf.capture(model, calibration[0])
    dense_ppl = perplexity(graph, evaluation)
    result = {"quick": quick, **environment(), "model": "SmolLM2-135M-Instruct (fp32 from the bundled GGUF)",
              "calibration": f"{describe('kjv', 'calibration')}: {n_cal} x {seq} tokens (layer dropping's ppl "
                             f"metric: the first 2)",
              "evaluation": f"{describe('kjv', 'evaluation')}: {n_eval} x {seq} tokens",
              "latency_input": f"1 x {seq} tokens, ONNX Runtime graph optimisations on, {THREADS} threads, "
                               f"median of {repeats}",
              "targets": TARGETS, "dense": {"perplexity": dense_ppl}}
    stem = f"prune_{part}" + ("_quick" if quick else "") + ("" if LATENCY or part != "layers" else "_ppl") \
        + ("" if part != "sparsity" or METHODS == ("magnitude", "wanda", "sparsegpt") else "_" + "_".join(METHODS))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if part == "sparsity":
            result["sparsity"] = sparsity_grid(graph, model, calibration, evaluation, dense_ppl, workdir, quick,
                                               lambda rows: save_json({**result, "sparsity": rows}, stem))
        elif part == "layers":
            result["layers"] = layer_grid(graph, calibration, evaluation, dense_ppl, latency_batch, repeats, quick,
                                          lambda rows: save_json({**result, "layers": rows}, stem))
        elif not quick:
            result["dense"]["bytes"] = onnx_bytes(graph, workdir, "dense")
            result["dense"]["ort_latency_ms"] = ort_latency_ms(graph, latency_batch, repeats)
    log.info("%s done", part)
    save_json(result, stem)
    return result


def merge(quick: bool, with_structured: bool) -> dict:
    """prune.json / prune.md from the saved parts (run as separate processes)."""
    suffix = "_quick" if quick else ""
    parts = {}
    for part in PARTS:
        for stem in (f"prune_{part}{suffix}", f"prune_{part}{suffix}_ppl"):  # _ppl: run with --no-latency
            if part not in parts and (RESULTS / f"{stem}.json").exists():
                parts[part] = json.loads((RESULTS / f"{stem}.json").read_text())
    result = dict(parts.get("dense") or next(iter(parts.values())))
    if "layers" in parts:
        result["layers"] = parts["layers"]["layers"]
    # sparsity may come from several runs (--methods subsets): concatenate their rows
    runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"prune_sparsity{suffix}*.json"))
            if quick == f.stem.startswith("prune_sparsity_quick")]
    if runs:
        result["sparsity"] = {"rows": [row for run in runs for row in run["sparsity"]["rows"]]}
    if with_structured:
        result["structured"] = structured(quick)
    (RESULTS / f"prune{suffix}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"prune{suffix}.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    dense = result["dense"]
    lines = [f"# Pruning SmolLM2-135M ({'quick' if result['quick'] else 'full'} run)", "",
             f"Calibration: {result['calibration']}. Evaluation: {result['evaluation']}.",
             f"Machine: {result['machine']}. Latency: {result['latency_input']}.", "",
             f"Dense perplexity {dense['perplexity']:.2f}"
             + (f", ONNX file {dense['bytes'] / 1e6:.1f} MB, ORT {dense['ort_latency_ms']:.0f} ms" if "bytes" in dense
                else ""), "",
             "## Sparsity (50% of every block linear)", "",
             "| method | pattern | perplexity | x dense | block-linear weights stored | artifact |",
             "|---|---|---|---|---|---|"]
    for r in result.get("sparsity", {}).get("rows", []):
        stored = (f"{r['weight_bytes_stored'] / 1e6:.1f} MB of {r['weight_bytes_dense'] / 1e6:.1f} MB"
                  if "weight_bytes_stored" in r else "dense + mask")
        artifact = f"{r['bytes'] / 1e6:.1f} MB ({r['bytes_kind']})" if "bytes" in r else ""
        lines.append(f"| {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {r['ratio']:.2f} | {stored} | {artifact} |")
    lines += ["", "No speedup is expected on ONNX Runtime: it has no sparse GEMM on CPU, so the file stores the "
              "compressed weights and the graph expands them to dense.", "",
              "## Layer dropping (25% of the units: 7 of 30)", "",
              "| unit | metric | schedule | perplexity | x dense | parameters | ORT latency | dropped |",
              "|---|---|---|---|---|---|---|---|"]
    layers = result.get("layers", {})
    dense_ms = layers.get("dense_ort_latency_ms")
    for r in layers.get("rows", []):
        latency = f"{r['ort_latency_ms']:.0f} ms" if "ort_latency_ms" in r else ""
        if latency and dense_ms:
            latency += f" ({dense_ms / r['ort_latency_ms']:.2f}x)"
        dropped = ", ".join(n.split(".")[2] for n in r["dropped"])
        schedule = "iterative" if r.get("iterative") else "one-shot"
        lines.append(f"| {r['unit']} | {r['metric']} | {schedule} | {r['perplexity']:.2f} | {r['ratio']:.2f} | "
                     f"{r['params_bytes'] / 1e6:.0f} MB | {latency} | layers {dropped} |")
    if dense_ms:
        lines += ["", f"ORT latency of the dense model in the same run: {dense_ms:.0f} ms (speedups in brackets). "
                      f"Latency is measured once per unit kind: every row of a kind removes 7 units of the same shape."]
    if "structured" in result:
        lines += ["", f"Structured pruning (benchmarks/prune_structured.py): "
                      f"{result['structured'].get('skipped', 'see prune.json, key structured')}"]
    return "\n".join(lines) + "\n"


def save_json(result: dict, stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny calibration/evaluation, no ONNX files")
    parser.add_argument("--part", choices=PARTS + ("all",), default="all",
                        help="run one part (parts can run as parallel processes), then --part merge... or all")
    parser.add_argument("--merge", action="store_true", help="only merge the saved parts into prune.json / .md")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="sparsity methods to run")
    parser.add_argument("--no-latency", action="store_true", help="skip ONNX Runtime latency and ONNX files (memory, time)")
    parser.add_argument("--no-structured", action="store_true", help="skip benchmarks/prune_structured.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    global LATENCY, METHODS
    LATENCY = not args.no_latency
    METHODS = tuple(args.methods.split(","))
    if not args.merge:
        for part in PARTS if args.part == "all" else (args.part,):
            run(args.quick, part)
    if args.merge or args.part == "all":
        merge(args.quick, not args.no_structured)


if __name__ == "__main__":
    main()
