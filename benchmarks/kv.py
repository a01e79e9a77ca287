"""KV-cache compression on SmolLM2-135M: bytes, perplexity, greedy agreement, decode speed.

One decode step is captured with ``rf.capture_decoder`` (static cache of CONTEXT = 1024
slots) and compressed with ``CompressKV``: KIVI int4 / int2 (group 32, 32-token fp16
window), H2O / SnapKV / StreamingLLM eviction at budgets of 50% and 25% of the context,
and eviction + int4 together. ``--part quality`` (no timings, one thread):

* cache bytes per token (every layer, K and V, every state tensor) vs the fp32 cache;
* teacher-forced perplexity of a KJV evaluation window of CONTEXT tokens, fed through the
  step CHUNK tokens at a time (each chunk reads the compressed cache of everything before
  it, and itself causally in full precision);
* greedy agreement: the share of 128 tokens generated after the window's first
  CONTEXT - 128 tokens that equal those generated with the fp32 cache.

``--part speed`` (timed; run under ``flock /tmp/rarefy-bench.lock``): decode tokens/s at
CONTEXT tokens of context on torch (reference ops) and ONNX Runtime (exported step, graph
optimisations on, 2 threads) for the fp32 cache, KIVI int4 and StreamingLLM 50%, next to
the tool a user would otherwise pick: Hugging Face's own decoding loop with its default
dynamic fp32 cache. (transformers' ``QuantizedCache`` needs optimum-quanto or HQQ, and
kvpress is not installed; none of them is on this machine.) Nothing is calibrated. Timings
come from a shared 2-core machine (``--quick`` for a smoke run).
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
THREADS = 2
GENERATED = 128
log = logging.getLogger("benchmarks.kv")


def configs(context: int) -> list[tuple[str, list]]:
    half, quarter = context // 2, context // 4
    out = [("fp32 cache", []),
           ("KIVI int4 (G32, R32)", [CompressKV("quantize", bits=4, group_size=32, residual=32)]),
           ("KIVI int2 (G32, R32)", [CompressKV("quantize", bits=2, group_size=32, residual=32)])]
    for budget, label in [(half, "50%"), (quarter, "25%")]:
        for method in ("h2o", "snapkv", "streaming"):
            out.append((f"{method} {label} ({budget} tokens)", [CompressKV(method, budget=budget)]))
    for method in ("h2o", "streaming"):  # quantize + evict in one pass
        out.append((f"{method} 50% + int4 (G32)", [CompressKV(method, budget=half, bits=4, group_size=32)]))
    return out


def perplexity(step, graph, ids: torch.Tensor, chunk: int) -> float:
    logits = teacher_forced_logits(step, ids, graph=graph, chunk=chunk)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def timed_generate(step, graph, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the median seconds per decode step (prefill excluded)."""
    state = initial_state(graph, prompt.shape[0])
    out = step(prompt, torch.arange(prompt.shape[1]), *state)
    tokens, times = [out[0][:, -1].argmax(-1)], []
    for i in range(new_tokens - 1):
        start = time.perf_counter()
        out = step(tokens[-1][:, None], torch.tensor([prompt.shape[1] + i]), *out[1:])
        times.append(time.perf_counter() - start)
        tokens.append(out[0][:, -1].argmax(-1))
    return torch.stack(tokens, dim=1), statistics.median(times)


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
    torch.set_num_threads(1)  # one thread: the machine is shared, oversubscribed threads crawl
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
        chosen = [chosen[i] for i in (0, 1, 3, -1)]
    reference = rf.generate(step, prompt, GENERATED)[:, prompt.shape[1]:]  # the fp32 cache's tokens
    rows = []
    for name, passes in chosen:
        if only and not name.startswith(tuple(only)):
            continue
        start = time.perf_counter()
        graph = rf.optimize(step, passes, progress=False, verify=False) if passes else step
        ppl = perplexity(graph, graph, ids, chunk)
        tokens = rf.generate(graph, prompt, GENERATED)[:, prompt.shape[1]:]
        row = {"config": name, "passes": [p.spec() for p in passes],
               "cache_bytes_per_token": graph.cache_bytes() / context,
               "cache_bytes_vs_fp32": graph.cache_bytes() / fp32_bytes,
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


def speed(quick: bool) -> dict:
    """Decode tokens/s at CONTEXT tokens of context: torch and ONNX Runtime, and HF generate."""
    torch.set_num_threads(THREADS)
    context = 256 if quick else 1024
    new_tokens = 8 if quick else 32
    model, tokenizer = load_smollm2()
    ids = data.token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=1, seq_len=context)[0]["input_ids"]
    prompt = ids[:, : context - new_tokens]
    step = rf.capture_decoder(model, max_cache_len=context)
    _, hf_seconds = hf_decode(model, prompt, new_tokens)
    rows = []
    for name, passes in [c for c in configs(context) if c[0].startswith(("fp32", "KIVI int4", "streaming 50%"))]:
        graph = rf.optimize(step, passes, progress=False, verify=False) if passes else step
        _, torch_seconds = timed_generate(graph, graph, prompt, new_tokens)
        ort = rf.compile(graph, "onnxruntime", optimize=True, threads=THREADS)
        _, ort_seconds = timed_generate(ort, graph, prompt, new_tokens)
        rows.append({"config": name, "torch_decode_tokens_per_s": 1 / torch_seconds,
                     "ort_decode_tokens_per_s": 1 / ort_seconds})
        log.info("%s", rows[-1])
    return {"context": context, "decode_steps_timed": new_tokens - 1, "threads": THREADS,
            "baseline": {"tool": "transformers generate loop, default DynamicCache (fp32)",
                         "decode_tokens_per_s": 1 / hf_seconds},
            "rows": rows}


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
    fp32 = next((r for n, r in speed_rows.items() if n.startswith("fp32")), None)
    int4 = next((r for n, r in speed_rows.items() if n.startswith("KIVI int4")), None)
    if fp32 and int4:
        out["kivi4_ort_decode_not_slower_than_fp32"] = int4["ort_decode_tokens_per_s"] >= fp32["ort_decode_tokens_per_s"]
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
                  f"{sp['decode_steps_timed']} steps):", "", "| cache | torch tok/s | ORT tok/s |", "|---|---|---|"]
        lines += [f"| {r['config']} | {r['torch_decode_tokens_per_s']:.1f} | {r['ort_decode_tokens_per_s']:.1f} |"
                  for r in sp["rows"]]
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
    parser.add_argument("--only", help="comma-separated config-name prefixes for the quality part (the rows "
                                       "are merged into the results file, so runs can split the configs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("kv_quick.json" if args.quick else "kv.json")
    parts = {}
    if args.part in ("quality", "all"):
        parts["quality"] = quality(args.quick, args.only.split(",") if args.only else None)
    if args.part in ("speed", "all"):
        parts["speed"] = speed(args.quick)
    with open("/tmp/rarefy-kv-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent --only runs merge their rows one at a time
        _merge_and_write(path, parts, args.quick)


def _merge_and_write(path: Path, parts: dict, quick: bool) -> None:
    result = json.loads(path.read_text()) if path.exists() else {}  # keep the other part of an earlier run
    if "quality" in parts and "quality" in result:
        done = {r["config"]: r for r in result["quality"]["rows"]}
        done.update({r["config"]: r for r in parts["quality"]["rows"]})
        order = [name for name, _ in configs(parts["quality"]["context"])]
        parts["quality"]["rows"] = sorted(done.values(), key=lambda r: order.index(r["config"]))
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
