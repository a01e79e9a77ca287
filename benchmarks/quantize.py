"""SmolLM2-135M weight quantization: perplexity, ONNX Runtime size and latency, GPTQ cost.

Calibration: the King James Bible's calibration split (Genesis to Psalm 62); evaluation: its
evaluation split (Psalm 62 to Revelation) -- disjoint text of the same register, as GPT-style
papers calibrate on one web corpus and evaluate on another; both are named in the results.
(Calibrating on Python's documentation instead, a different register, overfits GPTQ's
Hessian to that register: the ``gptq_int4_sym_g64_pydoc`` row measures it.) For each setting:

* perplexity on the evaluation text through the rarefy graph (torch reference backend);
* bytes of the quantized linears' packed tensors versus their fp32 weights, and of all
  parameters; the wall time and peak resident memory (sampled every 20 ms) of ``rf.optimize``;
* for one setting per grid (the RTN one: the artifact's operators, sizes and speed depend on
  the grid, not on how the codes were chosen) and the ONNX Runtime baselines: the artifact's
  file bytes and forward latency (median of ``--repeats`` runs, 1 x seq tokens, graph
  optimizations on). ``--no-onnx`` skips them.

Settings: fp32; RTN / GPTQ / AWQ at int4 symmetric group 64, int4 asymmetric group 64, int3
asymmetric group 64, int8 per-channel; MixedPrecision (GPTQ, asymmetric group 64) at 4.0 / 3.5
/ 3.0 average bits versus uniform GPTQ and versus a sensitivity-blind allocation (int3 and
int4 on alternating layers, 3.5 bits), with the default candidates (2, 3, 4, 8) and with
(3, 4) at 3.5 bits / (3, 4, 8) at 4.0 bits; W8A8 (``QuantizeActivations``, per-tensor and
per-token) with and without ``SplitOutliers`` before it; and ONNX Runtime's own MatMulNBits
quantizer (RTN, int4, block 64) on the fp32 ONNX file, the tool a user would otherwise pick.
``lm_head`` (tied to the embedding, whose fp32 table stays in the file anyway) is left in fp32
by every method, ORT's included.

Run ``flock /tmp/rarefy-bench.lock python benchmarks/quantize.py`` so timed runs do not
overlap; every row records the load average when it finished. Results merge into ``benchmarks/results/quantize.json`` by setting name, so
``--settings a,b`` re-runs a subset. ``--quick`` is a smoke test on tiny data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

import rarefy as rf
from rarefy.eval.data import describe, token_batches
from rarefy.eval.metrics import perplexity
from rarefy.models import load_smollm2

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # torch and ONNX Runtime threads
IGNORE = ["lm_head"]
UNIFORM = {  # name -> (bits, group_size, symmetric)
    "int4_sym_g64": (4, 64, True), "int4_asym_g64": (4, 64, False),
    "int3_asym_g64": (3, 64, False), "int8_channel": (8, None, True),
}


def settings() -> dict:
    """Setting name -> a function returning the pass list (None: the fp32 graph itself)."""
    table = {"fp32": None}
    for grid, (bits, group, sym) in UNIFORM.items():
        for method in ("rtn", "gptq", "awq"):
            table[f"{method}_{grid}"] = (lambda m=method, b=bits, g=group, s=sym: [
                rf.passes.QuantizeWeights(bits=b, group_size=g, symmetric=s, method=m, ignore=IGNORE)])
    for quantizer in ("gptq", "rtn"):
        for avg in (4.0, 3.5, 3.0):
            table[f"mixed_{quantizer}_{avg}"] = (lambda a=avg, q=quantizer: [rf.passes.MixedPrecision(
                avg_bits=a, group_size=64, symmetric=False, quantizer=q, ignore=IGNORE)])
        table[f"alternating_3_4_{quantizer}"] = lambda q=quantizer: [  # sensitivity-blind: even layers int3, odd int4
            rf.passes.QuantizeWeights(bits=3, group_size=64, symmetric=False, method=q,
                                      targets=[r"re:layers\.\d*[02468]\."], ignore=IGNORE),
            rf.passes.QuantizeWeights(bits=4, group_size=64, symmetric=False, method=q,
                                      targets=[r"re:layers\.\d*[13579]\."], ignore=IGNORE)]
    for name, avg, candidates in (("mixed_gptq_3.5_c34", 3.5, (3, 4)), ("mixed_gptq_4.0_c348", 4.0, (3, 4, 8))):
        table[name] = (lambda a=avg, c=candidates: [rf.passes.MixedPrecision(
            avg_bits=a, candidates=c, group_size=64, symmetric=False, quantizer="gptq", ignore=IGNORE)])
    table["gptq_int4_sym_g64_pydoc"] = table["gptq_int4_sym_g64"]  # calibrated on another register
    for granularity in ("tensor", "token"):  # W8A8, and with the MLPs' outlier units kept in fp32
        table[f"w8a8_{granularity}"] = (lambda g=granularity: [
            rf.passes.QuantizeActivations(granularity=g, ignore=IGNORE)])
        table[f"split_outliers_w8a8_{granularity}"] = (lambda g=granularity: [
            rf.passes.SplitOutliers(ignore=IGNORE), rf.passes.QuantizeActivations(granularity=g, ignore=IGNORE)])
    table["ort_rtn_int4_sym_b64"] = "ort"
    table["ort_rtn_int4_asym_b64"] = "ort"
    return table


# the settings whose ONNX artifact is built and timed: one per grid
ONNX_SETTINGS = ("fp32", "rtn_int4_sym_g64", "rtn_int4_asym_g64", "rtn_int3_asym_g64", "rtn_int8_channel",
                 "ort_rtn_int4_sym_b64", "ort_rtn_int4_asym_b64")


class PeakRss:
    """Sample this process's resident set every 20 ms while the block runs."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def quantized_linear_bytes(graph) -> dict:
    """Packed bytes of every matmul_nbits (codes + scales + zero points) vs its fp32 weight."""
    gm, packed, fp32 = graph.fx, 0, 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.rarefy.matmul_nbits.default:
            for arg in node.args[1:4]:
                if isinstance(arg, torch.fx.Node):
                    t = getattr(gm, arg.target)
                    packed += t.numel() * t.element_size()
            fp32 += node.args[5] * node.args[6] * 4
    return {"packed_bytes": packed, "fp32_bytes": fp32, "ratio": packed / fp32 if fp32 else None}


def ort_numbers(run, evaluation, example, repeats: int) -> dict:
    """ORT perplexity and forward latency, median of ``repeats``."""
    times = []
    run(**example)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        run(**example)
        times.append(time.perf_counter() - start)
    return {"ppl_ort": perplexity(run, evaluation), "latency_ms_median": 1000 * statistics.median(times),
            "latency_ms_all": [1000 * t for t in times]}


def run_rarefy(name, make, graph, calibration, evaluation, example, repeats, workdir, onnx: bool) -> dict:
    row: dict = {"setting": name}
    if make is None:
        q = graph
    else:
        passes = make()
        row["passes"] = [p.spec() for p in passes]
        with PeakRss() as mem:
            start = time.perf_counter()
            q = rf.optimize(graph, passes, calibration=calibration, verify=False, progress=False)
            seconds = time.perf_counter() - start
        row["peak_rss_mb"], row["rss_before_mb"] = mem.peak / 2**20, mem.start / 2**20
        row["optimize_s"] = seconds
        row.update(quantized_linear_bytes(q))
        row["notes"] = [n for rec in q.report.rows[1:] for n in rec.notes][:400]
        details = [rec.details for rec in q.report.rows[1:] if rec.details]
        if details:
            row["details"] = details
    row["param_bytes"] = q.parameter_bytes()
    row["ppl"] = perplexity(lambda **b: q(**b), evaluation)
    if not onnx:
        return row
    try:
        path = rf.export_onnx(q, workdir / f"{name}.onnx")
        row["onnx_bytes"] = path.stat().st_size
        row.update(ort_numbers(ort_runner(path), evaluation, example, repeats))
    except rf.RarefyError as exc:
        row["onnx_error"] = str(exc)[:300]
    return row


def ort_runner(path: Path):
    """An ONNX Runtime session (default graph optimizations, as deployed) called like the model; logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(**batch):
        return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0])

    return run


def run_ort_baseline(name, fp32_path: Path, evaluation, example, repeats, workdir) -> dict:
    import onnx
    import onnxruntime as ort  # noqa: F401  (version in the row)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_path))
    heads = [n.name for n in model.graph.node if n.op_type == "MatMul"
             and any(i.name == n.input[1] and 49152 in i.dims for i in model.graph.initializer)]
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=64, is_symmetric="_sym_" in name,
                                     nodes_to_exclude=heads)
    quantizer.process()
    seconds = time.perf_counter() - start
    path = workdir / f"{name}.onnx"
    onnx.save_model(quantizer.model.model, str(path))
    run = ort_runner(path)
    return {"setting": name, "tool": f"onnxruntime {ort.__version__} MatMulNBitsQuantizer (RTN)",
            "excluded": heads, "onnx_bytes": path.stat().st_size,
            "optimize_s": seconds, **ort_numbers(run, evaluation, example, repeats)}


def environment() -> dict:
    import onnxruntime
    import transformers

    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "load_average_at_start": os.getloadavg(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                         "rarefy": rf.__version__},
            "threads": THREADS}


def markdown(result: dict) -> str:
    fp32 = result["rows"].get("fp32", {}).get("ppl")
    lines = [f"# SmolLM2-135M weight quantization{' (quick)' if result['quick'] else ''}", "",
             f"Calibration: {result['calibration']}. Evaluation: {result['evaluation']}.",
             f"Machine: {result['machine']}; {result.get('latency', '')}; load average (1 min) when each row "
             "finished, and the torch / ONNX Runtime threads it ran with (- : not recorded), in the last columns.",
             "ppl: perplexity through the rarefy graph (torch reference); ORT ppl: through the ONNX Runtime "
             "artifact. The artifact is built and timed once per grid (its RTN row): the operators, bytes and "
             "speed depend on the grid, not on how the codes were chosen. lm_head (tied to the fp32 "
             "embedding) stays fp32 in every setting.", "",
             "| setting | ppl | vs fp32 | ORT ppl | params MB | ONNX MB | linears packed/fp32 | ORT latency ms | "
             "optimize s | peak RSS MB | load | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for name, row in result["rows"].items():
        ppl = row.get("ppl", row.get("ppl_ort"))
        delta = f"{100 * (ppl / fp32 - 1):+.1f}%" if fp32 and ppl else "-"
        mb = row["onnx_bytes"] / 1e6 if "onnx_bytes" in row else None
        params = row["param_bytes"] / 1e6 if "param_bytes" in row else None
        lines.append(f"| {name} | {fmt(row.get('ppl'), '.2f')} | {delta} | {fmt(row.get('ppl_ort'), '.2f')} | "
                     f"{fmt(params, '.1f')} | {fmt(mb, '.1f')} | {fmt(row.get('ratio'), '.3f')} | "
                     f"{fmt(row.get('latency_ms_median'), '.0f')} | {fmt(row.get('optimize_s'), '.0f')} | "
                     f"{fmt(row.get('peak_rss_mb'), '.0f')} | {fmt(row.get('load_average'), '.1f')} | "
                     f"{fmt(row.get('threads'), 'd')} |")
    lines += ["", "| target | met | numbers |", "|---|---|---|"]
    for name, t in result.get("targets", {}).items():
        met = t.get("met", t.get("met_counting_growth_only"))
        numbers = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items()
                            if not k.startswith("met"))
        lines.append(f"| {name} | {'yes' if met else 'NO'} | {numbers} |")
    return "\n".join(lines) + "\n"


def targets(result: dict) -> dict:
    """The issue's targets, each with the measured numbers and whether it was met."""
    rows, out = result["rows"], {}
    fp32 = rows.get("fp32", {}).get("ppl")

    def rise(name):
        return rows[name]["ppl"] / fp32 - 1 if fp32 and name in rows else None

    for name, limit in [("gptq_int4_sym_g64", .10), ("gptq_int4_asym_g64", .10), ("awq_int4_sym_g64", .10),
                        ("awq_int4_asym_g64", .10), ("gptq_int3_asym_g64", .60), ("awq_int3_asym_g64", .60)]:
        if rise(name) is not None:
            out[f"{name} ppl rise <= {limit:.0%}"] = {"rise": rise(name), "met": rise(name) <= limit}
    pairs = [(f"mixed_{q}_3.5", f"alternating_3_4_{q}", "<") for q in ("gptq", "rtn")] + \
            [("mixed_gptq_3.5_c34", "alternating_3_4_gptq", "<"), ("mixed_gptq_4.0_c348", "gptq_int4_asym_g64", "<=")] + \
            [(f"mixed_{q}_4.0", f"{q}_int4_asym_g64", "<=") for q in ("gptq", "rtn")] + \
            [(f"mixed_{q}_3.0", f"{q}_int3_asym_g64", "<=") for q in ("gptq", "rtn")]
    for a, b, op in pairs:
        if a in rows and b in rows:
            pa, pb = rows[a]["ppl"], rows[b]["ppl"]
            out[f"{a} ppl {op} {b}"] = {"ppl": [pa, pb], "met": pa < pb if op == "<" else pa <= pb}
    for name, row in rows.items():
        if "int4" in name and row.get("ratio") is not None:
            out[f"{name} packed linears <= 0.16 x fp32"] = {"ratio": row["ratio"], "met": row["ratio"] <= 0.16}
    gptq = rows.get("gptq_int4_sym_g64")
    if gptq and "peak_rss_mb" in gptq:
        seconds = gptq["optimize_s"]
        out["GPTQ int4 g64 on SmolLM2 under 10 minutes"] = {"seconds": seconds, "met": seconds < 600}
        model_mb = result["fp32_model_bytes"] / 2**20
        out["GPTQ peak memory under 2x the fp32 model"] = {
            "peak_rss_mb": gptq["peak_rss_mb"], "rss_before_mb": gptq["rss_before_mb"], "fp32_model_mb": model_mb,
            "peak_minus_before_mb": gptq["peak_rss_mb"] - gptq["rss_before_mb"],
            "met_counting_growth_only": gptq["peak_rss_mb"] - gptq["rss_before_mb"] < 2 * model_mb,
            "met_counting_whole_process": gptq["peak_rss_mb"] < 2 * model_mb}
    return out


def merge(stem: str, parts: list[str]) -> None:
    """Fold the rows of parallel runs (same machine, texts and sizes) into one results file."""
    out = RESULTS / f"{stem}.json"
    result = json.loads(out.read_text())
    for part in parts:
        other = json.loads((RESULTS / f"{part}.json").read_text())
        if (other["calibration"], other["evaluation"]) != (result["calibration"], result["evaluation"]):
            raise SystemExit(f"{part}: different calibration or evaluation text; not merged")
        for name, row in other["rows"].items():
            if "error" not in row or name not in result["rows"]:  # a measured row replaces the old one
                result["rows"].setdefault(name, {}).update(row)
    result["targets"] = targets(result)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny calibration and evaluation")
    parser.add_argument("--settings", default="", help="comma-separated subset of settings (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default="quantize", help="results file stem under benchmarks/results/")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX artifacts (size, ORT ppl, latency)")
    parser.add_argument("--merge", default="", help="comma-separated result stems whose rows merge into --results "
                                                    "(parallel runs of disjoint settings), then exit")
    args = parser.parse_args()
    if args.merge:
        return merge(args.results, args.merge.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    table = settings()
    chosen = [s for s in args.settings.split(",") if s] or list(table)
    unknown = set(chosen) - set(table)
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}; known: {list(table)}")
    n_cal, n_eval, seq = (2, 1, 128) if args.quick else (32, 8, 512)
    model, tok = load_smollm2(attn_implementation="sdpa")  # fused attention: no batch x heads x seq^2 tensors in calibration
    calibration = token_batches(tok, "kjv", "calibration", n_batches=n_cal, batch_size=1, seq_len=seq)
    pydoc_calibration = token_batches(tok, "pydoc", "calibration", n_batches=n_cal, batch_size=1, seq_len=seq)
    evaluation = token_batches(tok, "kjv", "evaluation", n_batches=n_eval, batch_size=1, seq_len=seq)
    example = {"input_ids": evaluation[0]["input_ids"], "attention_mask": evaluation[0]["attention_mask"]}
    graph = rf.capture(model, calibration[0])
    del model
    out = RESULTS / (f"{args.results}_quick.json" if args.quick else f"{args.results}.json")
    result = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    result.update({"quick": args.quick, **environment(),
                   "calibration": f"{describe('kjv', 'calibration')}: {n_cal} x {seq} tokens "
                                  f"(the _pydoc row: {describe('pydoc', 'calibration')}, as many tokens)",
                   "evaluation": f"{describe('kjv', 'evaluation')}: {n_eval} x {seq} tokens",
                   "latency": f"ONNX Runtime latency: optimizations on, 1 x {seq} tokens, median of {args.repeats}",
                   "fp32_model_bytes": graph.parameter_bytes()})
    mine: dict = {}  # the rows this run measured
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fp32_path = workdir / "fp32.onnx"
        for name in chosen:
            make = table[name]
            print(f"[quantize] {name} ...", flush=True)
            try:
                if make == "ort":
                    if not fp32_path.exists():
                        rf.export_onnx(graph, fp32_path)
                    row = run_ort_baseline(name, fp32_path, evaluation, example, args.repeats, workdir)
                else:
                    calib = pydoc_calibration if name.endswith("_pydoc") else calibration
                    row = run_rarefy(name, make, graph, calib, evaluation, example, args.repeats, workdir,
                                     onnx=name in ONNX_SETTINGS and not args.no_onnx)
            except Exception as exc:  # one broken setting must not lose the others' numbers
                row = {"setting": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
            row["load_average"] = os.getloadavg()[0]
            row["threads"] = THREADS
            mine[name] = row
            if out.exists():  # another run may have written rows meanwhile: re-read, then add this run's
                result["rows"] = json.loads(out.read_text())["rows"]
            for done, values in mine.items():
                result["rows"].setdefault(done, {}).update(values)
            print(f"[quantize] {name}: {json.dumps({k: v for k, v in row.items() if k not in ('notes', 'details')})[:600]}",
                  flush=True)
            RESULTS.mkdir(exist_ok=True)
            result["targets"] = targets(result)
            out.write_text(json.dumps(result, indent=1))
            out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
