"""Helpers shared by the W8A8 / SmoothQuant tests, over tests/tiny_models.py: Llama (GQA),
BERT (post-LayerNorm: every norm output also feeds a residual) and OPT (pre-LN, ReLU MLP),
with random biases."""
import torch
from tiny_models import VOCAB, build


def tiny(arch: str) -> torch.nn.Module:
    model, _ = build(arch)
    with torch.no_grad():  # HF initialises biases to zero, which would hide every bias-handling bug
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def batches(n: int = 3, seq: int = 16):
    return [{"input_ids": torch.randint(0, VOCAB, (2, seq))} for _ in range(n)]


def first_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # an ONNX-dialect graph returns its outputs as tensors
        return out
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
