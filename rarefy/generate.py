"""``rf.generate``: greedy decoding over a step captured by ``rf.capture_decoder``.

The prompt is prefilled through the step in one call (T = prompt length), then each new
token is one call with T = 1; the KV state (whatever layout ``CompressKV`` gave it) is
threaded from the step's outputs back into its inputs. The same loop runs on every backend:
``torch`` (the reference ops), ``onnxruntime`` (the exported step, caches as explicit
inputs and outputs) and ``triton`` (decode attention through the Triton kernels).
"""
from __future__ import annotations

import torch

from .backends import compile_graph
from .ir.decoder import initial_state
from .ir.errors import InputMismatchError, UnsupportedError
from .ir.graph import Graph, check_graph


def generate(graph: Graph, input_ids: torch.Tensor, max_new_tokens: int, backend: str = "torch",
             attention_mask: torch.Tensor | None = None, step=None, **options) -> torch.Tensor:
    """Greedy decoding: returns ``[B, T + max_new_tokens]`` ids (prompt first).

    ``step`` reuses an already compiled step (``rf.compile(graph, backend)``), so repeated
    calls do not export again. ``attention_mask`` may be given but must be all ones: every
    row of a batch shares its positions (no padding).
    """
    check_graph(graph, "rf.generate")
    decoder = graph.meta.get("decoder")
    if decoder is None:
        raise UnsupportedError("rf.generate needs a decode step: capture the model with rf.capture_decoder(model, "
                               "max_cache_len=...)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InputMismatchError(f"rf.generate: input_ids must be a [B, T] tensor with T >= 1, got "
                                 f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputMismatchError(f"rf.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise UnsupportedError("rf.generate: padded batches are not supported; every row must share its positions "
                               "(pass prompts of equal length, attention_mask all ones)")
    prompt = input_ids.shape[1]
    needed = prompt + max_new_tokens - 1
    limit = decoder.get("max_tokens")  # positions a position-indexed cache can hold (None: evicting)
    if limit is not None and needed > limit:
        raise UnsupportedError(f"rf.generate: {prompt} prompt + {max_new_tokens} new tokens need {needed} cache slots, "
                               f"the step was captured with max_cache_len={limit}")
    if max_new_tokens == 0:
        return input_ids.clone()
    step = step or compile_graph(graph, backend, **options)
    state = initial_state(graph, input_ids.shape[0])
    ids = input_ids.to(torch.int64)
    out = step(ids, torch.arange(prompt), *state)
    tokens = [out[0][:, -1].argmax(-1)]
    for i in range(max_new_tokens - 1):
        out = step(tokens[-1][:, None], torch.tensor([prompt + i]), *out[1:])
        tokens.append(out[0][:, -1].argmax(-1))
    new = torch.stack(tokens, dim=1).to(device=input_ids.device, dtype=input_ids.dtype)  # a GPU step's are on the GPU
    return torch.cat([input_ids, new], dim=1)
