"""Running a decoder folder written by ``rf.export_decoder`` in ONNX Runtime GenAI.

``generate_text(folder, prompt, max_new_tokens)`` is what ``rarefy generate`` runs: greedy
decoding through ``onnxruntime_genai`` (the runtime the folder is for), streaming the
text piece by piece to a callback, timing the prefill (the prompt's one forward) apart from
the decode steps (prefill: the time to the first new token). Checks come first, with rarefy errors: the folder must hold
``genai_config.json``, a tokenizer and ``model.onnx``, and the prompt plus the new tokens
must fit the model's context.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .ir.errors import InputMismatchError, LoadError, UnsupportedError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def check_folder(folder) -> dict:
    """The folder's genai_config.json, after checking that GenAI can open the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder} is not a directory (give the folder `rarefy optimize --decoder` wrote)")
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        raise LoadError(f"{folder} has no genai_config.json: it is not a decoder folder (write one with "
                        f"`rarefy optimize MODEL --decoder -o DIR`)")
    try:
        config = json.loads(config_path.read_text())
        filename = config["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{config_path} is not a valid GenAI config: {exc}") from exc
    if not (folder / filename).is_file():
        raise LoadError(f"{folder} has no {filename} (named by genai_config.json)")
    if not (folder / "tokenizer.json").is_file():
        raise LoadError(f"{folder} has no tokenizer (tokenizer.json); ONNX Runtime GenAI needs the model's "
                        f"tokenizer files beside {filename}")
    return config


def _genai():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise UnsupportedError("running a decoder folder needs onnxruntime-genai: pip install "
                               "'rarefy[deploy]' (or onnxruntime-genai)") from exc
    return onnxruntime_genai


def generate_text(folder, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                  threads: int | None = None) -> Generation:
    """Greedy decoding of ``prompt`` through the folder's model in ONNX Runtime GenAI."""
    config = check_folder(folder)
    if not isinstance(prompt, str) or not prompt:
        raise InputMismatchError("the prompt must be a non-empty string")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputMismatchError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    og = _genai()
    og_config = og.Config(str(folder))
    if threads is not None:  # session options GenAI reads from the config, overlaid for this run
        og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    model = og.Model(og_config)
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(prompt))
    context = int(config["model"].get("context_length") or 0)
    if context and len(ids) + max_new_tokens > context:
        raise InputMismatchError(f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that is "
                                 f"{len(ids) + max_new_tokens}, past the model's context of {context}")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream()
    tokens: list[int] = []
    start = time.perf_counter()
    generator.append_tokens(ids)  # the prefill: one forward over the whole prompt
    prefill_done = None
    pieces = []
    while not generator.is_done():
        generator.generate_next_token()
        if prefill_done is None:
            prefill_done = time.perf_counter()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        piece = stream.decode(token)
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    end = time.perf_counter()
    prefill_done = prefill_done or end
    return Generation("".join(pieces), tokens, len(ids), prefill_done - start, end - prefill_done)

