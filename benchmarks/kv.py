"""KV-cache compression on SmolLM2-135M: bytes, perplexity, greedy agreement, decode speed.

One decode step is captured with ``rf.capture_decoder`` (static cache of CONTEXT = 1024
slots) and compressed with ``CompressKV``: KIVI int4 (group 64, no fp window: the pass's
defaults, 0.156x) and int2 (group 16, a 128-token fp16 window), H2O / SnapKV / StreamingLLM
eviction at budgets of 50% and 25% of the context, and eviction + int4 together.
``--part quality`` (no timings):

* cache bytes per token, summed over the state buffers a step really returns (every layer,
  K and V, codes, scales, zeros, rings, slot positions, scores), vs the fp32 cache, with the
  per-buffer breakdown;
* teacher-forced perplexity of a KJV evaluation window of CONTEXT tokens, fed through the
  step CHUNK tokens at a time (each chunk reads the compressed cache of everything before
  it, and itself causally in full precision);
* greedy agreement: the share of 128 tokens generated after the window's first
  CONTEXT - 128 tokens that equal those generated with the fp32 cache.

``--part speed`` (timed; run under ``flock /tmp/rarefy-bench.lock``): decode tokens/s at
CONTEXT tokens of context (the static cache holds CONTEXT slots; the timed steps are its
last ones) on torch (reference ops) and ONNX Runtime (exported step, graph optimisations
on, 2 threads) for every config. Each config's steps alternate with the fp32 cache's on
the same backend, so the "vs fp32" ratio is measured in the same window of machine load.
Next to them the tool a user would otherwise pick: Hugging Face's own decoding loop with
its default dynamic fp32 cache. (transformers' ``QuantizedCache`` needs optimum-quanto or
HQQ, and kvpress is not installed; none of them is on this machine.) Nothing is calibrated.
Timings come from a shared 2-core machine (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import rarefy as rf  # noqa: E402
from rarefy.eval import data  # noqa: E402
from rarefy.ir.decoder import initial_state, teacher_forced_logits  # noqa: E402
from rarefy.models import load_smollm2  # noqa: E402
from rarefy.passes import CompressKV  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("RAREFY_BENCH_THREADS", "2"))  # 1: one pinned core per benchmark
GENERATED = 128
log = logging.getLogger("benchmarks.kv")


def configs(context: int) -> list[tuple[str, list]]:
    half, quarter = context // 2, context // 4
    out = [("fp32 cache", []),
           ("KIVI int4 (G64, R0)", [CompressKV("quantize", bits=4, group_size=64, residual=0)]),
           ("KIVI int2 (G16, R128)", [CompressKV("quantize", bits=2, group_size=16, residual=128)])]
    for budget, label in [(half, "50%"), (quarter, "25%")]:
        for method in ("h2o", "snapkv", "streaming"):
            out.append((f"{method} {label} ({budget} tokens)", [CompressKV(method, token_budget=budget)]))
    for method in ("h2o", "streaming"):  # quantize + evict in one pass
        out.append((f"{method} 50% + int4 (G32)", [CompressKV(method, token_budget=half, bits=4, group_size=32)]))
    return out


QUICK_CONFIGS = (0, 1, 3, -1)  # fp32, KIVI int4, h2o 50%, streaming 50% + int4


def state_bytes(graph, context: int) -> tuple[float, dict]:
    """Bytes per token of the state buffers one step really returns, total and per buffer kind."""
    out = graph(torch.zeros(1, 1, dtype=torch.long), torch.arange(1), *initial_state(graph, 1))
    names = [spec["name"] for spec in graph.meta["decoder"]["state"]]
    kinds: dict = {}
    for name, tensor in zip(names, out[1:]):
        kind = name.rsplit("_", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + tensor.numel() * tensor.element_size() / context
    return sum(kinds.values()), kinds


def perplexity(step, graph, ids: torch.Tensor, chunk: int) -> float:
    logits = teacher_forced_logits(step, ids, graph=graph, chunk=chunk)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))


class _Decoder:
    """A prefilled sequence on one compiled step: ``next()`` times one greedy decode step."""

    def __init__(self, step, graph, prompt: torch.Tensor):
        self.step, self.position, self.times = step, prompt.shape[1], []
        self.out = step(prompt, torch.arange(prompt.shape[1]), *initial_state(graph, prompt.shape[0]))

    def next(self) -> None:
        token = self.out[0][:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        self.out = self.step(token, torch.tensor([self.position]), *self.out[1:])
        self.times.append(time.perf_counter() - start)
        self.position += 1


def interleaved(runs: list[_Decoder], steps: int) -> list[float]:
    """Median seconds per decode step of each run, their steps alternating (same machine load)."""
    for _ in range(steps):
        for run in runs:
            run.next()
    return [statistics.median(run.times) for run in runs]


def hf_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Hugging Face greedy decoding with its default dynamic cache; median seconds per step."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token, tokens, times = out.past_key_values, out.logits[:, -1].argmax(-1), [], []
        tokens.append(token)
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(token[:, None], past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - start)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1), statistics.median(times)


def quality(quick: bool, only: list[str] | None = None) -> dict:
    """Bytes, perplexity and greedy agreement of every config (no timings: needs no lock)."""
    torch.set_num_threads(THREADS)
    context, chunk = (256, 16) if quick else (1024, 16)
    model, tokenizer = load_smollm2()
    ids = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=1, seq_len=context)[0]["input_ids"]
    prompt = ids[:, : context - GENERATED]
    step = rf.capture_decoder(model, max_cache_len=context)
    fp32_bytes = step.cache_bytes()
    hf_tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GENERATED,
                               do_sample=False)[:, prompt.shape[1]:]
    chosen = configs(context)
    if quick:
        chosen = [chosen[i] for i in QUICK_CONFIGS]
    reference = rf.generate(step, prompt, GENERATED)[:, prompt.shape[1]:]  # the fp32 cache's tokens
    rows = []
    for name, passes in chosen:
        if only and not name.startswith(tuple(only)):
            continue
        start = time.perf_counter()
        graph = rf.optimize(step, passes, progress=False, verify=False) if passes else step
        ppl = perplexity(graph, graph, ids, chunk)
        tokens = rf.generate(graph, prompt, GENERATED)[:, prompt.shape[1]:]
        per_token, kinds = state_bytes(graph, context)
        if per_token != graph.cache_bytes() / context:
            raise AssertionError(f"{name}: the step returns {per_token} bytes/token, its spec says "
                                 f"{graph.cache_bytes() / context}")
        row = {"config": name, "passes": [p.spec() for p in passes],
               "cache_bytes_per_token": per_token, "cache_bytes_per_token_by_buffer": kinds,
               "cache_bytes_vs_fp32": per_token / (fp32_bytes / context),
               "perplexity": ppl, "greedy_agreement": float((tokens == reference).float().mean()),
               "seconds": time.perf_counter() - start}
        log.info("%s", row)
        rows.append(row)
    return {"context": context, "chunk": chunk, "generated_tokens": GENERATED,
            "fp32_cache_bytes_per_token": fp32_bytes / context,
            "evaluation_text": f"{data.describe('kjv', 'evaluation')}: 1 window of {context} tokens (the prompt for "
                               f"generation is its first {context - GENERATED} tokens)",
            "hf_generate_agrees_with_rarefy_fp32_step": float((hf_tokens == reference).float().mean()),
            "rows": rows}


def speed(quick: bool, only: list[str] | None = None) -> dict:
    """Decode tokens/s at CONTEXT tokens of context: torch and ONNX Runtime, and HF generate."""
    torch.set_num_threads(THREADS)
    context = 256 if quick else 1024
    steps = 6 if quick else 12  # timed decode steps per config and backend (+ as many fp32 steps)
    model, tokenizer = load_smollm2()
    ids = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=1, seq_len=context)[0]["input_ids"]
    prompt = ids[:, : context - steps - 1]  # the last timed step fills the cache's last slot
    step = rf.capture_decoder(model, max_cache_len=context)
    _, hf_seconds = hf_decode(model, prompt, steps + 1)
    compiled = {"torch": step, "onnxruntime": rf.compile(step, "onnxruntime", optimize=True, threads=THREADS)}
    chosen = configs(context)
    if quick:
        chosen = [chosen[i] for i in QUICK_CONFIGS]
    if only:  # the fp32 cache is always timed: every row is relative to it
        chosen = chosen[:1] + [c for c in chosen[1:] if c[0].startswith(tuple(only))]
    rows, fp32_times = [], {backend: [] for backend in compiled}
    for name, passes in chosen[1:]:
        graph = rf.optimize(step, passes, progress=False, verify=False)
        row = {"config": name}
        for backend, baseline in compiled.items():
            fn = graph if backend == "torch" else rf.compile(graph, "onnxruntime", optimize=True, threads=THREADS)
            runs = [_Decoder(fn, graph, prompt), _Decoder(baseline, step, prompt)]
            seconds, fp32_seconds = interleaved(runs, steps)
            fp32_times[backend] += runs[1].times
            key = "torch" if backend == "torch" else "ort"
            row.update({f"{key}_decode_tokens_per_s": 1 / seconds, f"{key}_vs_fp32": fp32_seconds / seconds})
            del fn, runs
        rows.append(row)
        log.info("%s", row)
    fp32 = {"config": chosen[0][0]}
    for backend, key in (("torch", "torch"), ("onnxruntime", "ort")):
        fp32.update({f"{key}_decode_tokens_per_s": 1 / statistics.median(fp32_times[backend]), f"{key}_vs_fp32": 1.0})
    return {"context": context, "decode_steps_timed": steps, "threads": THREADS,
            "baseline": {"tool": "transformers generate loop, default DynamicCache (fp32)",
                         "decode_tokens_per_s": 1 / hf_seconds},
            "rows": [fp32] + rows}


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def targets(result: dict) -> dict:
    rows = [r for r in result.get("quality", {}).get("rows", []) if r.get("perplexity_increase") is not None]
    by = {r["config"]: r for r in rows}
    out = {}
    kivi4 = next((r for n, r in by.items() if n.startswith("KIVI int4")), None)
    kivi2 = next((r for n, r in by.items() if n.startswith("KIVI int2")), None)
    if kivi4:
        out["kivi4_ppl_increase_le_2pct"] = kivi4["perplexity_increase"] <= 0.02
        out["kivi4_bytes_le_0.16x"] = kivi4["cache_bytes_vs_fp32"] <= 0.16
    if kivi2:
        out["kivi2_ppl_increase_le_10pct"] = kivi2["perplexity_increase"] <= 0.10
    half = [r for r in rows if "50%" in r["config"] and "+" not in r["config"]]
    if half:
        best = min(half, key=lambda r: r["perplexity_increase"])
        out["best_eviction_at_50pct"] = best["config"]
        out["best_eviction_50pct_ppl_increase_le_5pct"] = best["perplexity_increase"] <= 0.05
    speed_rows = {r["config"]: r for r in (result.get("speed") or {}).get("rows", [])}
    int4 = next((r for n, r in speed_rows.items() if n.startswith("KIVI int4")), None)
    if int4 and "ort_vs_fp32" in int4:  # measured interleaved with the fp32 cache's steps
        out["kivi4_ort_decode_not_slower_than_fp32"] = int4["ort_vs_fp32"] >= 1.0
    return out


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def markdown(result: dict) -> str:
    q = result.get("quality")
    if q is None:
        return "# KV cache: quality part not run yet\n"
    lines = [f"# KV cache: {result['model']}", "",
             f"Evaluation: {q['evaluation_text']}; calibration: {result['calibration_text']}. Perplexity "
             f"teacher-forced through the step in chunks of {q['chunk']} tokens; greedy agreement over "
             f"{q['generated_tokens']} generated tokens vs the fp32 cache. {result['machine']}.", "",
             "| cache | bytes/token | vs fp32 | perplexity | Δ ppl | greedy agreement |", "|---|---|---|---|---|---|"]
    for r in q["rows"]:
        lines.append(f"| {r['config']} | {r['cache_bytes_per_token']:.0f} | {r['cache_bytes_vs_fp32']:.3f}x | "
                     f"{r['perplexity']:.3f} | {_percent(r['perplexity_increase'])} | {r['greedy_agreement']:.3f} |")
    hf = q.get("hf_generate_agrees_with_rarefy_fp32_step")
    if hf is not None:
        lines += ["", f"HF generate (default cache) agrees with rarefy's fp32 step on {hf:.3f} of greedy tokens.", ""]
    missing = [name for name, _ in configs(q["context"]) if name not in {r["config"] for r in q["rows"]}]
    if missing:
        lines += ["", "Not measured in this run: " + ", ".join(missing) + ".", ""]
    sp = result.get("speed")
    if sp:
        lines += [f"Decode speed at {sp['context']} tokens of context ({sp['threads']} threads, median of "
                  f"{sp['decode_steps_timed']} steps per config, alternating with as many fp32-cache steps on the "
                  f"same backend; \"vs fp32\" is the speed ratio within that window):", "",
                  "| cache | torch tok/s | vs fp32 | ORT tok/s | vs fp32 |", "|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['torch_decode_tokens_per_s']:.1f} | {r.get('torch_vs_fp32', 1):.2f}x | "
                  f"{r['ort_decode_tokens_per_s']:.1f} | {r.get('ort_vs_fp32', 1):.2f}x |" for r in sp["rows"]]
        lines += ["", f"Baseline: {sp['baseline']['tool']}: {sp['baseline']['decode_tokens_per_s']:.1f} tok/s.", ""]
    else:
        lines += ["Decode speed: not measured in this run (`--part speed`).", ""]
    lines += ["Targets: " + ", ".join(f"{k}: {v}" for k, v in result["targets"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256-token context, 4 configs (smoke run)")
    parser.add_argument("--part", choices=("quality", "speed", "all"), default="all",
                        help="quality (no timings) / speed (timed: run under flock) / both")
    parser.add_argument("--only", help="comma-separated config-name prefixes (the quality rows are merged into "
                                       "the results file, so runs can split the configs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("kv_quick.json" if args.quick else "kv.json")
    parts = {}
    if args.part in ("quality", "all"):
        parts["quality"] = quality(args.quick, args.only.split(",") if args.only else None)
    if args.part in ("speed", "all"):
        parts["speed"] = speed(args.quick, args.only.split(",") if args.only else None)
    with open("/tmp/rarefy-kv-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent --only runs merge their rows one at a time
        _merge_and_write(path, parts, args.quick)


def _merge_rows(earlier: dict, part: dict) -> None:
    """``part``'s rows plus the configs only ``earlier`` has (split ``--only`` runs), in config order."""
    done = {r["config"]: r for r in earlier["rows"]}
    done.update({r["config"]: r for r in part["rows"]})
    order = [name for name, _ in configs(part["context"])]
    part["rows"] = sorted(done.values(), key=lambda r: order.index(r["config"]))


def _merge_and_write(path: Path, parts: dict, quick: bool) -> None:
    result = json.loads(path.read_text()) if path.exists() else {}  # keep the other part of an earlier run
    if "quality" in parts and "quality" in result:
        _merge_rows(result["quality"], parts["quality"])
    if "speed" in parts and "speed" in result and result["speed"]["context"] == parts["speed"]["context"]:
        # each row's "vs fp32" was timed against the fp32 steps of its own run; the fp32 row is the latest run's
        _merge_rows(result["speed"], parts["speed"])
    if "quality" in parts:
        rows = parts["quality"]["rows"]
        base = next((r["perplexity"] for r in rows if r["config"].startswith("fp32")), None)
        for row in rows:
            row["perplexity_increase"] = row["perplexity"] / base - 1 if base else None
    result.update(parts)
    result.update({
        "benchmark": "kv", "quick": quick, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, a shared 2-core machine (other engineers' jobs ran "
                   f"concurrently; timed runs serialised with flock /tmp/rarefy-bench.lock)",
        "versions": {"torch": torch.__version__, "rarefy": rf.__version__, "onnxruntime": _version("onnxruntime"),
                     "transformers": _version("transformers"), "python": platform.python_version()},
        "calibration_text": "none (KIVI and the eviction scores are calibration-free)",
    })
    result["targets"] = targets(result)
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result))
    log.info("%s", markdown(result))


if __name__ == "__main__":
    main()
