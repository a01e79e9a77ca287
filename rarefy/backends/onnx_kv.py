"""ONNX lowering of the KV-cache ops: their branch-free torch references, traced.

``rarefy::cache_*``, ``kivi_*`` and ``evict_*`` (``rarefy/ir/ops.py``) have no single ONNX
Runtime contrib operator; their references in ``rarefy/kernels/kv_cache.py`` are written
without data-dependent control flow or shapes, so at export they are traced into standard
ONNX operators (Gather, ScatterElements, Where, TopK, MatMul, Softmax, ...). The reference is
the one source of truth: torch, ONNX Runtime and the Triton fallback run the same math. The
packed KIVI codes enter the attention's products without being dequantized to a cache-sized
tensor, and a KIVI write quantizes only the step's own tokens and the key groups they may
complete, and copies them into the state with one scatter or gather per state tensor.
"""
from __future__ import annotations

import torch

from ..kernels import kv_cache
from .onnx_lowering import onnx_decomposition

onnx_decomposition(torch.ops.rarefy.cache_attention.default, kv_cache.cache_attention)
onnx_decomposition(torch.ops.rarefy.cache_write.default, kv_cache.cache_write)
onnx_decomposition(torch.ops.rarefy.kivi_attention.default, kv_cache.kivi_attention)
onnx_decomposition(torch.ops.rarefy.kivi_write.default, kv_cache.kivi_write)
onnx_decomposition(torch.ops.rarefy.evict_attention.default, kv_cache.evict_attention)
onnx_decomposition(torch.ops.rarefy.evict_write.default, kv_cache.evict_write)
onnx_decomposition(torch.ops.rarefy.evict_quant_attention.default, kv_cache.evict_quant_attention)
onnx_decomposition(torch.ops.rarefy.evict_quant_write.default, kv_cache.evict_quant_write)
