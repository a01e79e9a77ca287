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


def assert_exports_and_runs_in_ort(graph, reference: torch.Tensor, batch: dict, path) -> None:
    """The third assertion of STYLE.md: ``graph`` exports, the file passes onnx.checker, and ONNX
    Runtime (graph optimisations off) matches ``reference`` within 1e-4 on ``batch``."""
    import onnx

    import rarefy as rf

    onnx.checker.check_model(onnx.load(str(rf.export_onnx(graph, path))))
    ort_out = first_output(rf.compile(graph, "onnxruntime", optimize=False)(**batch))
    torch.testing.assert_close(ort_out, reference, atol=1e-4, rtol=0)


def minilm_pydoc_kjv():
    """all-MiniLM-L6-v2 captured, with 2 x 2 x 64 tokens of Python docs to calibrate on and
    2 x 64 tokens of the Bible to evaluate on (different texts): ``(graph, calibration, evaluation)``."""
    import rarefy as rf
    from rarefy.eval.data import token_batches
    from rarefy.models import load_minilm

    model, tokenizer = load_minilm(attn_implementation="sdpa")
    calibration = token_batches(tokenizer, "pydoc", "calibration", n_batches=2, batch_size=2, seq_len=64)
    evaluation = token_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=2, seq_len=64)
    return rf.capture(model, evaluation[0]), calibration, evaluation
