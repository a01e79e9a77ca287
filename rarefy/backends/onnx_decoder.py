"""``rf.export_decoder``: a causal LM graph as a folder ONNX Runtime GenAI runs unchanged.

The folder holds ``model.onnx`` (the decoder-with-past contract of ``rf.capture_causal_lm``,
inputs and outputs under the names GenAI and Optimum use; weights in ``model.onnx.data``
beside it when the file would pass ``EXTERNAL_DATA_BYTES``), ``genai_config.json``,
``config.json``, ``generation_config.json``, the tokenizer's files, and ``recipe.json`` /
``report.json``. Every file is written into a temporary folder beside the target and the
folder is moved into place whole, so a failed export leaves nothing behind and never a
mix of old and new files.

``genai_config.json`` follows GenAI's schema (``src/config.h``): the model type, token ids,
context length, the decoder's geometry and the input / output names; search options
default to greedy. GenAI needs the model type to be one it knows for decoder-only models
(``GENAI_MODEL_TYPES``); another type is refused with the type named.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from ..ir.causal_lm import CausalLM, without_unread_caches
from ..ir.errors import RarefyError, UnsupportedError
from ..ir.graph import check_graph

# decoder-only model types ONNX Runtime GenAI 0.18 runs with a plain decoder-with-past model
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "granite", "olmo",
                     "smollm3", "nemotron", "ernie4_5", "gpt_oss", "chatglm")
EXTERNAL_DATA_BYTES = 1 << 30  # past this, weights go to model.onnx.data (protobuf stops at 2 GB)
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def decoder_proto(graph: CausalLM) -> onnx.ModelProto:
    """The ONNX model of ``graph`` with the contract's input and output names."""
    from .onnx_lowering import to_onnx_model

    graph = without_unread_caches(graph)
    proto = to_onnx_model(graph)
    names = graph.signature.names
    outputs = graph.meta["causal_lm"]["outputs"]
    if len(proto.graph.input) != len(names) or len(proto.graph.output) != len(outputs):
        raise UnsupportedError(f"rf.export_decoder: the exported graph has {len(proto.graph.input)} inputs and "
                               f"{len(proto.graph.output)} outputs, the contract {len(names)} and {len(outputs)}")
    renames = {old.name: new for old, new in zip(list(proto.graph.input) + list(proto.graph.output),
                                                 names + outputs)}
    _rename_values(proto.graph, renames)
    return proto


def _rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attr in node.attribute:  # subgraphs (If / Loop bodies) may read outer values
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_values(sub, renames)


def genai_config(graph: CausalLM, generation: dict | None = None, context_length: int | None = None) -> dict:
    """ONNX Runtime GenAI's ``genai_config.json`` for ``graph``."""
    config = graph.meta.get("config") or {}
    geo = graph.meta["causal_lm"]
    model_type = config.get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        raise UnsupportedError(f"rf.export_decoder: ONNX Runtime GenAI has no decoder-only model type "
                               f"{model_type!r} (it runs {', '.join(GENAI_MODEL_TYPES)}); the genai_config.json "
                               f"cannot describe this model")
    if geo.get("kv_heads_per_layer"):
        raise UnsupportedError(f"rf.export_decoder: the layers keep different numbers of KV heads "
                               f"({geo['kv_heads_per_layer']}); GenAI's config takes one num_key_value_heads "
                               f"for every layer (prune the same fraction in every block)")
    generation = generation or {}
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    missing = [name for name, value in (("eos_token_id", eos), ("num_hidden_layers", geo.get("num_layers")))
               if value is None]
    if missing:
        raise UnsupportedError(f"rf.export_decoder: the {model_type} config names no {', '.join(missing)}; "
                               f"GenAI needs it")
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = context_length or geo.get("max_positions") or 2048
    return {
        "model": {
            "type": model_type,
            "bos_token_id": bos if bos is not None else first_eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else first_eos,
            "vocab_size": geo["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": geo["head_dim"],
                "hidden_size": config.get("hidden_size", geo["head_dim"] * geo["num_heads"]),
                "num_attention_heads": geo["num_heads"],
                "num_key_value_heads": geo["num_kv_heads"],
                "num_hidden_layers": geo["num_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def export_decoder(graph: CausalLM, out_dir, tokenizer: Any = None, generation_config: Any = None,
                   external_data_bytes: int = EXTERNAL_DATA_BYTES, check: bool = True) -> Path:
    """Write ``graph`` (from ``rf.capture_causal_lm``, optimized or not) as a GenAI folder.

    ``tokenizer`` (a Hugging Face tokenizer, saved with ``save_pretrained``) is needed for
    GenAI to run the folder; ``generation_config`` (a ``GenerationConfig`` or a dict) gives
    the token ids when the model config lacks them. The folder is replaced whole.
    """
    check_graph(graph, "rf.export_decoder")
    if not isinstance(graph, CausalLM):
        raise UnsupportedError("rf.export_decoder needs a causal LM graph: capture the model with "
                               "rf.capture_causal_lm(model)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RarefyError(f"rf.export_decoder: {out_dir} exists and is not a directory")
    generation = _as_dict(generation_config if generation_config is not None
                          else graph.meta.get("generation_config"))
    genai_config(graph, generation)  # before the export: a model GenAI cannot run fails fast
    graph = without_unread_caches(graph)  # a layer DropLayers bypassed has no cache
    config_json = genai_config(graph, generation)
    proto = decoder_proto(graph)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the folder gets ordinary permissions
    try:
        _save_model(proto, tmp, external_data_bytes)
        if check:
            onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: works past 2 GB
        _write_json(tmp / "genai_config.json", config_json)
        _write_json(tmp / "config.json", graph.meta.get("config") or {})
        _write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / "recipe.json", {"source": graph.meta.get("source"), "passes": graph.recipe})
        if graph.report is not None:
            graph.report.save(tmp / "report.json")
        _replace_dir(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RarefyError(f"rf.export_decoder: cannot write {out_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_model(proto: onnx.ModelProto, folder: Path, external_data_bytes: int) -> None:
    external = proto.ByteSize() > external_data_bytes if proto.ByteSize() < (1 << 31) - 1 else True
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _as_dict(generation_config) -> dict:
    if generation_config is None:
        return {}
    if isinstance(generation_config, dict):
        return dict(generation_config)
    return generation_config.to_dict()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is swapped out and removed after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
