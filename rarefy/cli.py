"""The ``rarefy`` command.

    rarefy optimize MODEL [--recipe FILE | --pass SPEC ...] [--decoder] -o DIR
    rarefy generate DIR --prompt TEXT [--max-new-tokens N]
    rarefy report DIR
    rarefy passes [NAME]

``MODEL`` is an ONNX file, a local Hugging Face model folder (``config.json`` beside the
weights) or a bundled name (``minilm``, ``smollm2``). Calibration and evaluation batches are
real text from ``rarefy.eval.data`` (by default: calibrate on the pydoc calibration split,
verify on the kjv evaluation split), tokenized by the model's own tokenizer; a model
without one (an ONNX file or a folder with no tokenizer) gets random inputs that fit its
signature, and the report says so. ``optimize`` writes ``DIR/model.onnx``,
``DIR/recipe.json`` and ``DIR/report.json`` all together or not at all. With ``--decoder`` a
causal LM is captured as the decoder-with-past graph (``rf.capture_causal_lm``) and DIR
becomes a folder ONNX Runtime GenAI runs (``rf.export_decoder``: model, genai_config.json,
configs, tokenizer); ``generate`` streams greedy text from such a folder. An output directory
that cannot be written is reported before any model is loaded. rarefy's own errors print
one line, ``rarefy: error: ...``, and exit with status 2; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import rarefy as rf

from . import recipes
from .ir.errors import CalibrationError, LoadError, RarefyError
from .passes.base import registered_passes
from .recipe import Recipe, parse_pass_spec

log = logging.getLogger("rarefy.cli")

BUNDLED = ("minilm", "smollm2")
ARTIFACTS = ("model.onnx", "recipe.json", "report.json")
EXIT_ERROR = 2


# -- optimize ----------------------------------------------------------------------------------
def cmd_optimize(args) -> int:
    recipe = _recipe_from_args(args)
    out_dir, created = _prepare_output_dir(Path(args.output))
    try:
        graph, tokenizer, vocab = _load_model(args.model, decoder=args.decoder)
        sections = {kind: _section(getattr(recipe, kind), kind, args) for kind in ("calibration", "evaluation")}
        calibration, evaluation = (_data(graph, tokenizer, vocab, sections[kind]) for kind in sections)
        log.info("optimizing with %s", ", ".join(repr(p) for p in recipe.passes) or "no passes")
        result = rf.optimize(graph, recipe, calibration=calibration, evaluation=evaluation,
                             verify=not args.no_verify, progress=not args.quiet)
        applied = Recipe(result.recipe, sections["calibration"], sections["evaluation"], graph.meta.get("source"))
        written = (_write_decoder(result, applied, tokenizer, out_dir) if args.decoder
                   else _write_artifacts(result, applied, out_dir))
    except BaseException:
        for path in reversed(created):  # directories this run made and left empty
            _remove_if_empty(path)
        raise
    sys.stdout.write(result.report.table() + "\n\n")
    sys.stdout.write("wrote " + ", ".join(str(out_dir / name) for name in written) + "\n")
    return 0


def _recipe_from_args(args) -> Recipe:
    if args.recipe:
        return Recipe.load(args.recipe)
    default = Recipe.load(recipes.path("default"))
    if args.passes:
        return Recipe([parse_pass_spec(s) for s in args.passes], default.calibration, default.evaluation)
    return default


def _prepare_output_dir(out_dir: Path) -> tuple[Path, list[Path]]:
    """Create ``out_dir`` and prove it writable, before any expensive work."""
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()][::-1]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        for path in reversed(created):
            _remove_if_empty(path)
        raise RarefyError(f"cannot write to output directory {out_dir}: {exc.strerror or exc}") from exc
    return out_dir, created


def _write_artifacts(graph, recipe: Recipe, out_dir: Path) -> tuple[str, ...]:
    """Export into a staging folder inside ``out_dir``, then move the three files into place."""
    staging = Path(tempfile.mkdtemp(prefix=".rarefy-staging-", dir=out_dir))
    try:
        log.info("exporting ONNX")
        rf.export_onnx(graph, staging / "model.onnx")
        recipe.save(staging / "recipe.json")
        graph.report.save(staging / "report.json")
        for name in ARTIFACTS:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ARTIFACTS


def _write_decoder(graph, recipe: Recipe, tokenizer, out_dir: Path) -> list[str]:
    """The GenAI folder, exported whole into a staging folder, then moved into ``out_dir``."""
    staging = Path(tempfile.mkdtemp(prefix=".rarefy-staging-", dir=out_dir))
    try:
        log.info("exporting the decoder for ONNX Runtime GenAI")
        folder = rf.export_decoder(graph, staging / "decoder", tokenizer=tokenizer,
                                   generation_config=graph.meta.get("generation_config"))
        recipe.save(folder / "recipe.json")
        names = sorted(p.name for p in folder.iterdir())
        for name in names:
            os.replace(folder / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# -- models --------------------------------------------------------------------------------------
def _load_model(name: str, decoder: bool = False):
    """``(graph, tokenizer or None, vocab size or None)`` for an ONNX file, HF folder or bundled name."""
    path = Path(name)
    capture = _capture_decoder if decoder else _capture
    if name in BUNDLED and not path.exists():
        from .models import load_bundled

        log.info("loading bundled model %s", name)
        try:
            model, tokenizer = load_bundled(name, **({"attn_implementation": None} if decoder else {}))
        except ImportError as exc:
            raise LoadError(f"bundled model {name}: {exc}") from exc
        return capture(model, tokenizer, model.config.vocab_size), tokenizer, model.config.vocab_size
    if path.is_file():
        if decoder:
            raise LoadError(f"--decoder captures a Hugging Face causal LM (a folder or a bundled name); {path} is "
                            f"a file")
        log.info("loading ONNX file %s", path)
        return rf.load(path), _tokenizer_beside(path.parent), None
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_hf_folder(path)
        return capture(model, tokenizer, model.config.vocab_size), tokenizer, model.config.vocab_size
    raise LoadError(
        f"{name} is not an ONNX file, a Hugging Face model folder (with config.json) or a bundled model "
        f"({', '.join(BUNDLED)})"
    )


def _load_hf_folder(path: Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    log.info("loading Hugging Face model from %s", path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                     attn_implementation="eager")
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for bad folders
        raise LoadError(f"cannot load a Hugging Face model from {path}: {type(exc).__name__}: {exc}") from exc
    return model.eval(), _tokenizer_beside(path)


def _tokenizer_beside(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a folder whose tokenizer files do not load: fall back to random ids
        log.warning("ignoring the tokenizer in %s: %s", folder, exc)
        return None


def _capture_decoder(model, tokenizer, vocab: int):
    from .backends.onnx_decoder import genai_config

    if tokenizer is None:
        raise LoadError(f"--decoder: {type(model).__name__} has no tokenizer beside it; the decoder folder needs "
                        f"one (ONNX Runtime GenAI reads tokenizer.json)")
    log.info("capturing %s with its KV cache", type(model).__name__)
    graph = rf.capture_causal_lm(model)
    genai_config(graph)  # a model GenAI cannot describe fails here, before any calibration
    return graph


def _capture(model, tokenizer, vocab: int):
    example = _token_batches(tokenizer, vocab, {"source": "pydoc", "split": "calibration", "batches": 1,
                                                "batch_size": 2, "seq_len": 16}, None)
    log.info("capturing %s", type(model).__name__)
    return rf.capture(model, example.batches[0])


# -- data ------------------------------------------------------------------------------------------
def _section(section: dict | None, kind: str, args) -> dict:
    """The recipe's data section with the command-line overrides applied."""
    defaults = {"source": "pydoc" if kind == "calibration" else "kjv", "split": kind, "batches": 2,
                "batch_size": 4, "seq_len": 128}
    merged = {**defaults, **(section or {})}
    for key in ("source", "split", "batches"):
        value = getattr(args, f"{kind}_{key}", None)
        if value is not None:
            merged[key] = value
    for key in ("batch_size", "seq_len"):
        if getattr(args, key, None) is not None:
            merged[key] = getattr(args, key)
    return merged


def _data(graph, tokenizer, vocab, section: dict) -> rf.Calibration:
    if graph.dialect == "onnx" and tokenizer is None:
        return _random_batches(graph, section)
    causal_lm = "causal_lm" in graph.meta  # takes {input_ids, attention_mask}; fills in positions and past
    return _token_batches(tokenizer, vocab, section, None if causal_lm else graph.signature.names)


def _token_batches(tokenizer, vocab, section: dict, names: list[str] | None) -> rf.Calibration:
    from .eval.data import describe, token_batches

    n, size, length = section["batches"], section["batch_size"], section["seq_len"]
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, vocab, (size, length), generator=gen),
                    "attention_mask": torch.ones(size, length, dtype=torch.long)} for _ in range(n)]
        return rf.Calibration([_fit(b, names) for b in batches], "random token ids (the model has no tokenizer)")
    try:
        batches = token_batches(tokenizer, section["source"], section["split"], n, size, length)
        text = describe(section["source"], section["split"])
    except ValueError as exc:
        raise CalibrationError(f"cannot build {n} batches of {size} x {length} tokens: {exc}") from exc
    return rf.Calibration([_fit(b, names) for b in batches], f"{text}, {n} x {size} x {length} tokens")


def _fit(batch: dict, names: list[str] | None) -> dict:
    """Keep the inputs the graph takes (all when ``names`` is None); zeros for missing token types."""
    if names is None:
        return batch
    ids = batch["input_ids"]
    return {name: batch[name] if name in batch else torch.zeros_like(ids) for name in names}


def _random_batches(graph, section: dict) -> rf.Calibration:
    """Inputs that fit an ONNX signature: ids below the embedding size, masks of ones."""
    gen = torch.Generator().manual_seed(0)
    bounds = _gather_bounds(graph)
    batches = []
    for _ in range(section["batches"]):
        batch = {}
        for name, dtype, shape in zip(graph.signature.names, graph.signature.dtypes, graph.signature.shapes):
            dims = [d if d is not None else (section["batch_size"] if axis == 0 else section["seq_len"])
                    for axis, d in enumerate(shape)]
            if dtype.is_floating_point:
                batch[name] = torch.randn(dims, generator=gen, dtype=dtype)
            elif "mask" in name:
                batch[name] = torch.ones(dims, dtype=dtype)
            else:
                batch[name] = torch.randint(0, bounds.get(name, 2), dims, generator=gen, dtype=dtype)
        batches.append(batch)
    return rf.Calibration(batches, "random inputs fitted to the ONNX signature (no tokenizer beside the file)")


def _gather_bounds(graph) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (a Gather over an initializer)."""
    bounds = {}
    for node in graph.onnx.graph.all_nodes():
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[0] is not None:
            table, index = node.inputs
            if table.const_value is not None and index is not None and index.name in graph.signature.names:
                rows = table.const_value.shape[0]
                bounds[index.name] = min(bounds.get(index.name, rows), rows)
    return bounds


# -- generate --------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .deploy import generate_text

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate_text(args.dir, args.prompt, args.max_new_tokens, on_text=stream, threads=args.threads)
    sys.stdout.write("\n")
    sys.stderr.write(f"rarefy: prompt {result.prompt_tokens} tokens, prefill {result.prefill_s * 1e3:.1f} ms; "
                     f"{len(result.tokens)} new tokens, decode {result.decode_tokens_per_s:.1f} tokens/s\n")
    return 0


# -- report and passes -----------------------------------------------------------------------------
def cmd_report(args) -> int:
    path = Path(args.dir)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise RarefyError(f"no report at {path}: give a directory written by `rarefy optimize` or a report.json")
    try:
        report = rf.Report.load(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise RarefyError(f"{path} is not a rarefy report: {exc}") from exc
    sys.stdout.write(report.table() + "\n")
    return 0


def cmd_passes(args) -> int:
    passes = {name: cls for name, cls in registered_passes().items() if not name.startswith("_")}  # no base classes
    if args.name:
        if args.name not in passes:
            raise RarefyError(f"unknown pass {args.name!r}; available passes: {', '.join(passes)}")
        sys.stdout.write(describe_pass(passes[args.name]) + "\n")
        return 0
    width = max(len(name) for name in passes)
    for name, cls in passes.items():
        sys.stdout.write(f"{name.ljust(width)}  {_first_paragraph(inspect.getdoc(cls) or '')}\n")
    return 0


def describe_pass(cls) -> str:
    """The constructor signature, the class docstring and its module's docstring."""
    params = [p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str) else p
              for p in list(inspect.signature(cls.__init__).parameters.values())[1:]]
    signature = inspect.Signature(params)
    module = sys.modules[cls.__module__]
    parts = [f"{cls.__name__}{signature}", inspect.getdoc(cls) or "", f"From {cls.__module__}:",
             inspect.getdoc(module) or ""]
    return "\n\n".join(p for p in parts if p)


class _Annotation:
    """A postponed (string) annotation that prints without quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


# -- entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rarefy", description="Compress a neural network with verified passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="capture or load MODEL, run a recipe, write an ONNX artifact")
    opt.add_argument("model", help="an .onnx file, a Hugging Face model folder, or a bundled name: minilm, smollm2")
    which = opt.add_mutually_exclusive_group()
    which.add_argument("--recipe", help="a recipe file (.yaml, .yml or .json); default: rarefy/recipes/default.yaml")
    which.add_argument("--pass", dest="passes", action="append", metavar="SPEC",
                       help="a pass as NAME:key=value,... (repeatable, runs in the order given)")
    opt.add_argument("-o", "--output", required=True, help="directory for model.onnx, recipe.json, report.json")
    for kind in ("calibration", "evaluation"):
        opt.add_argument(f"--{kind}-source", help=f"text for {kind}: pydoc or kjv")
        opt.add_argument(f"--{kind}-split", choices=("calibration", "evaluation"), help=f"split of the {kind} text")
        opt.add_argument(f"--{kind}-batches", type=int, help=f"number of {kind} batches")
    opt.add_argument("--batch-size", type=int, help="rows per batch")
    opt.add_argument("--seq-len", type=int, help="tokens per row")
    opt.add_argument("--no-verify", action="store_true", help="skip measuring each pass against the original")
    opt.add_argument("--decoder", action="store_true",
                     help="a causal LM with its KV cache: write a folder ONNX Runtime GenAI runs")
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    opt.set_defaults(func=cmd_optimize)

    gen = sub.add_parser("generate", help="greedy text from a decoder folder, in ONNX Runtime GenAI")
    gen.add_argument("dir", help="a folder written by `rarefy optimize --decoder`")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    gen.set_defaults(func=cmd_generate, quiet=False)

    rep = sub.add_parser("report", help="print the report saved by `rarefy optimize`")
    rep.add_argument("dir", help="an output directory or a report.json")
    rep.set_defaults(func=cmd_report)

    lst = sub.add_parser("passes", help="list every pass, or document one")
    lst.add_argument("name", nargs="?", help="a pass name: print its signature and full documentation")
    lst.set_defaults(func=cmd_passes)
    return parser


def _configure_logging(quiet: bool) -> None:
    """rarefy's progress on stderr; libraries only when something goes wrong."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rarefy: %(message)s"))
    logging.basicConfig(level=logging.ERROR, handlers=[handler])
    logging.getLogger("rarefy").setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:  # transformers' own bars (loading weights, writing shards) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except RarefyError as exc:
        sys.stderr.write(f"rarefy: error: {' '.join(str(exc).split())}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("rarefy: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
