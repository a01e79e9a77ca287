"""Evaluation: real calibration / evaluation text and the metrics reports use."""

from rarefy.eval.data import (
    SPLITS,
    describe,
    load_text,
    sentence_batches,
    split_bounds,
    split_sentences,
    split_text,
    split_token_ids,
    text_source_names,
    token_batches,
)
from rarefy.eval.metrics import (
    cosine,
    max_abs_error,
    per_row_cosine,
    perplexity,
    sqnr_db,
    token_nll,
    top1_agreement,
)

__all__ = [
    "SPLITS",
    "cosine",
    "describe",
    "load_text",
    "max_abs_error",
    "per_row_cosine",
    "perplexity",
    "sentence_batches",
    "split_bounds",
    "split_sentences",
    "split_text",
    "split_token_ids",
    "sqnr_db",
    "text_source_names",
    "token_batches",
    "token_nll",
    "top1_agreement",
]
