"""Benchmark: rarefy's Triton kernels on a CUDA GPU, against what a user would otherwise run.

Each kernel is first checked against its pure-torch reference at the benchmarked shapes (the
unit tests check them under the interpreter at small shapes only), then timed with
``triton.testing.do_bench_cudagraph`` (median GPU time of CUDA-graph replays, as a graphed
decode loop runs them; Python's per-call launch cost is left out) beside the baseline on the
same GPU in the same run:

* weight-only ``matmul_nbits`` (packed 2/3/4/8-bit, fp16 activations) against cuBLAS fp16
  ``x @ W.T`` on the dense weight, and against dequantising to fp16 first and then cuBLAS
  (what a graph without a fused kernel does at every call);
* W8A8 ``w8a8_linear`` (per-token quantisation kernel + int8 GEMM) against cuBLAS fp16 and
  against ``torch._int_mm`` on the same int8 operands (the GEMM alone: rarefy's int8 GEMM
  against cuBLASLt's);
* 2:4 ``sparse24_matmul`` (fp16 and int4 values) against cuBLAS fp16 dense and, where the
  GPU supports it, PyTorch's semi-structured sparse (cuSPARSELt / CUTLASS);
* KIVI ``decode_attention`` over the packed 2/4-bit cache against PyTorch SDPA on an fp16
  cache (the cache a user keeps without KIVI) and against rarefy's own kernel on that fp16
  cache.

Shapes: SmolLM2-135M's (d 576, MLP 1536, 9 query / 3 KV heads of 64) and Llama-2/3-7B/8B's
(d 4096, MLP 11008 / 14336, 32 query / 8 KV heads of 128). Weight-only rows report the
weight-read bandwidth at M = 1 (the decode case those kernels are for).

Run on a CUDA machine: ``python benchmarks/kernels_gpu.py`` (``--quick`` for fewer shapes).
Writes ``benchmarks/results/kernels_gpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real kernels: this benchmark needs a GPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rarefy.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from rarefy.kernels.int8_gemm import (  # noqa: E402
    int8_matmul,
    quantize_per_token,
    quantize_per_token_reference,
    w8a8_linear,
    w8a8_linear_reference,
)
from rarefy.kernels.kivi import quantize_keys, quantize_values  # noqa: E402
from rarefy.kernels.matmul_nbits import dequantize_nbits, matmul_nbits, matmul_nbits_reference, pack_bits  # noqa: E402
from rarefy.kernels.sparse24 import compress_24, sparse24_matmul, sparse24_matmul_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEV = "cuda"
LINEARS = {  # name: (N, K) of y = x @ W.T
    "SmolLM2 up_proj": (1536, 576),
    "SmolLM2 down_proj": (576, 1536),
    "Llama-7B q_proj": (4096, 4096),
    "Llama-7B up_proj": (11008, 4096),
    "Llama-7B down_proj": (4096, 11008),
}
QUICK_LINEARS = ("SmolLM2 up_proj", "Llama-7B up_proj")


def bench(fn) -> float:
    """Median GPU microseconds of ``fn`` replayed from a CUDA graph (Python launch cost excluded)."""
    fn()  # autotune and compile outside the graph
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def random_nbits(N: int, K: int, bits: int, block: int, asym: bool, gen: torch.Generator):
    n_blocks = -(-K // block)
    codes = torch.randint(0, 1 << bits, (N, n_blocks * block), generator=gen, device=DEV)
    qweight = pack_bits(codes, bits).reshape(N, n_blocks, block * bits // 8)
    scales = ((0.5 + torch.rand(N, n_blocks, generator=gen, device=DEV)) / ((1 << (bits - 1)) * K**0.5)).half()
    zp = pack_bits(torch.randint(0, 1 << bits, (N, n_blocks), generator=gen, device=DEV), bits) if asym else None
    return qweight, scales, zp


def weight_only(linears: dict, ms: tuple) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    formats = [("int4 g128 sym", 4, 128, False), ("int4 g64 asym", 4, 64, True), ("int3 g64", 3, 64, True),
               ("int2 g64", 2, 64, True), ("int8 per-channel", 8, None, False)]
    for name, (N, K) in linears.items():
        w16 = torch.randn(N, K, device=DEV, generator=gen, dtype=torch.float16) / K**0.5
        for fmt, bits, block, asym in formats:
            block = block or triton.next_power_of_2(K)
            qw, sc, zp = random_nbits(N, K, bits, block, asym, gen)
            weight_bytes = qw.numel() + sc.numel() * 2 + (zp.numel() if zp is not None else 0)
            for M in ms:
                x = torch.randn(M, K, device=DEV, generator=gen, dtype=torch.float16)
                y = matmul_nbits(x, qw, sc, zp, None, K, N, bits, block)
                ref = matmul_nbits_reference(x.float(), qw, sc.float(), zp, None, K, N, bits, block)
                t_rarefy = bench(lambda: matmul_nbits(x, qw, sc, zp, None, K, N, bits, block))
                t_fp16 = bench(lambda: x @ w16.T)
                t_deq = bench(lambda: x @ dequantize_nbits(qw, sc, zp, K, N, bits, block).to(torch.float16).T)
                rows.append({
                    "linear": name, "N": N, "K": K, "format": fmt, "M": M, "rel_err_vs_reference": rel_err(y, ref),
                    "rarefy_us": t_rarefy, "cublas_fp16_us": t_fp16, "dequant_then_cublas_us": t_deq,
                    "speedup_vs_fp16": t_fp16 / t_rarefy, "speedup_vs_dequant": t_deq / t_rarefy,
                    "weight_MB": weight_bytes / 1e6, "fp16_weight_MB": N * K * 2 / 1e6,
                    "weight_GBps": weight_bytes / (t_rarefy * 1e-6) / 1e9,
                })
                print(fmt_row(rows[-1]), flush=True)
    return rows


def w8a8(linears: dict, ms: tuple) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(1)
    for name, (N, K) in linears.items():
        w = torch.randn(N, K, device=DEV, generator=gen) / K**0.5
        w_q, w_scale = quantize_per_token_reference(w)
        w16 = w.half()
        for M in ms:
            x = torch.randn(M, K, device=DEV, generator=gen, dtype=torch.float16)
            y = w8a8_linear(x, w_q, w_scale)
            ref = w8a8_linear_reference(x.float(), w_q, w_scale)
            x_q, x_scale = quantize_per_token(x)
            row = {"linear": name, "N": N, "K": K, "M": M, "rel_err_vs_reference": rel_err(y, ref),
                   "rarefy_w8a8_us": bench(lambda: w8a8_linear(x, w_q, w_scale)),
                   "rarefy_int8_gemm_us": bench(lambda: int8_matmul(x_q, x_scale, w_q, w_scale)),
                   "cublas_fp16_us": bench(lambda: x @ w16.T)}
            if M > 16 and M % 8 == 0:  # torch._int_mm's constraints
                row["torch_int_mm_us"] = bench(lambda: torch._int_mm(x_q, w_q.T))  # w_q.T: column-major [K, N]
            row["speedup_vs_fp16"] = row["cublas_fp16_us"] / row["rarefy_w8a8_us"]
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def random_24(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(N, K, device=DEV, generator=gen) / (K / 2) ** 0.5
    groups = w.reshape(N, K // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(N, K)


def sparse24(linears: dict, ms: tuple) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(2)
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        to_sparse_semi_structured = None
    for name, (N, K) in linears.items():
        dense = random_24(N, K, gen)
        w16 = dense.half()
        values, indices = compress_24(w16)
        semi = None
        if to_sparse_semi_structured is not None:
            try:
                semi = to_sparse_semi_structured(w16)
            except Exception as exc:  # noqa: BLE001 - record why the baseline is missing
                semi = repr(exc)[:120]
        for M in ms:
            x = torch.randn(M, K, device=DEV, generator=gen, dtype=torch.float16)
            y = sparse24_matmul(x, values, indices, None, K)
            ref = sparse24_matmul_reference(x.float(), values.float(), indices, None, K)
            row = {"linear": name, "N": N, "K": K, "M": M, "rel_err_vs_reference": rel_err(y, ref),
                   "rarefy_24_fp16_us": bench(lambda: sparse24_matmul(x, values, indices, None, K)),
                   "cublas_fp16_dense_us": bench(lambda: x @ w16.T)}
            if isinstance(semi, str):
                row["torch_semi_structured"] = semi
            elif semi is not None and M >= 32:
                try:
                    row["torch_semi_structured_us"] = bench(lambda: F.linear(x, semi))
                except Exception as exc:  # noqa: BLE001
                    row["torch_semi_structured"] = repr(exc)[:120]
            row["speedup_vs_dense"] = row["cublas_fp16_dense_us"] / row["rarefy_24_fp16_us"]
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def decode(quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(3)
    models = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
    contexts = (1024, 8192) if quick else (1024, 4096, 16384, 65536)
    for model, (H_q, H_kv, Dh) in models.items():
        for B in (1, 8):
            for T in contexts:
                if B * H_kv * T * Dh * 2 * 2 > 8e9:
                    continue
                R, G = 128, 32  # KIVI's defaults: a 128-token fp16 window, groups of 32
                q = torch.randn(B, H_q, Dh, device=DEV, generator=gen, dtype=torch.float16)
                k, v = torch.randn(2, B, H_kv, T, Dh, device=DEV, generator=gen, dtype=torch.float16)
                scale = 1 / math.sqrt(Dh)
                t_sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True))
                t_dense = bench(lambda: decode_attention(q, k, None, None, v, None, None, None, None,
                                                         bits=None, group_size=1, scale=scale))
                row = {"model": model, "B": B, "context": T, "sdpa_fp16_us": t_sdpa, "rarefy_fp16_cache_us": t_dense,
                       "fp16_cache_MB": 2 * k.numel() * 2 / 1e6}
                for bits in (4, 2):
                    kc, ks, kz = quantize_keys(k[:, :, : T - R], bits, G)
                    vc, vs, vz = quantize_values(v[:, :, : T - R], bits, G)
                    args = (q, kc, ks, kz, vc, vs, vz, k[:, :, T - R:].contiguous(), v[:, :, T - R:].contiguous())
                    kw = dict(bits=bits, group_size=G, scale=scale)
                    out = decode_attention(*args, **kw)
                    ref = decode_attention_reference(*args, **kw)
                    row[f"int{bits}_rel_err_vs_reference"] = rel_err(out, ref)
                    row[f"int{bits}_us"] = bench(lambda: decode_attention(*args, **kw))
                    row[f"int{bits}_cache_MB"] = sum(t.numel() * t.element_size() for t in args[1:]) / 1e6
                    row[f"int{bits}_speedup_vs_sdpa"] = t_sdpa / row[f"int{bits}_us"]
                rows.append(row)
                print(fmt_row(row), flush=True)
                del k, v
    return rows


def fmt_row(row: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) and "err" in c else f"{v:.1f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(result: dict) -> str:
    lines = [
        "# rarefy Triton kernels on a GPU",
        "",
        f"{result['gpu']}, torch {result['versions']['torch']}, Triton {result['versions']['triton']}. "
        "Median GPU microseconds of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), every "
        "baseline in the same run; `rel_err` is max |kernel - reference| / max |reference| at that shape "
        "(the reference computes in fp32, the kernel in fp16 with fp32 accumulation).",
        "",
        "## Weight-only dequant-matmul (`matmul_nbits`, fp16 activations)",
        "",
    ]
    lines += table(result["weight_only"], ["linear", "format", "M", "rarefy_us", "cublas_fp16_us",
                                           "dequant_then_cublas_us", "speedup_vs_fp16", "weight_GBps",
                                           "rel_err_vs_reference"])
    lines += ["", "## W8A8 (`w8a8_linear`: per-token quantisation + int8 GEMM)", ""]
    lines += table(result["w8a8"], ["linear", "M", "rarefy_w8a8_us", "rarefy_int8_gemm_us", "torch_int_mm_us",
                                    "cublas_fp16_us", "speedup_vs_fp16", "rel_err_vs_reference"])
    lines += ["", "## 2:4 sparse matmul (`sparse24_matmul`, fp16 values)", ""]
    lines += table(result["sparse24"], ["linear", "M", "rarefy_24_fp16_us", "torch_semi_structured_us",
                                        "cublas_fp16_dense_us", "speedup_vs_dense", "rel_err_vs_reference"])
    lines += ["", "## KIVI decode attention (`decode_attention`, packed cache, 128-token fp16 window, groups of 32)", ""]
    lines += table(result["decode_attention"], ["model", "B", "context", "sdpa_fp16_us", "rarefy_fp16_cache_us",
                                                "int4_us", "int2_us", "int4_speedup_vs_sdpa", "int2_speedup_vs_sdpa",
                                                "fp16_cache_MB", "int4_cache_MB", "int4_rel_err_vs_reference"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two linears, fewer M and contexts")
    parser.add_argument("--only", help="comma-separated sections: weight_only,w8a8,sparse24,decode_attention")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernels_gpu.json / .md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py needs a CUDA GPU (the kernels' CPU path is the Triton interpreter)")
    linears = {k: v for k, v in LINEARS.items() if not args.quick or k in QUICK_LINEARS}
    ms = (1, 16, 256) if args.quick else (1, 16, 128, 2048)
    sections = {"weight_only": lambda: weight_only(linears, ms), "w8a8": lambda: w8a8(linears, ms + (8192,)),
                "sparse24": lambda: sparse24(linears, ms), "decode_attention": lambda: decode(args.quick)}
    chosen = args.only.split(",") if args.only else list(sections)
    result = {"benchmark": "kernels_gpu", "quick": args.quick, "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_gpu_quick" if args.quick else "kernels_gpu"
    for name in chosen:
        print(f"== {name}", flush=True)
        result[name] = sections[name]()
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))  # each section as it ends
    if all(s in result for s in sections):
        (args.out / f"{stem}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
