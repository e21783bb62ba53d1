"""Rows to model inputs: the first N rows of a split, tokenisation, length bucketing and padding.

Every command and workflow that reads "the first N rows" of a split (``--max-baseline``, ``--max-train``,
``--max-test`` ...) goes through :func:`take`, and every batch a model sees comes from :func:`iter_batches`.

Padding rule (batch invariance): a transformer's activations for one sample change in the last float bits with
the length it is padded to. With ``pad_multiple > 0`` every sample is padded to its own length rounded up to
``pad_multiple`` tokens (at most ``max_length``), and the rows of a batch that share a padded length run
together, so a sample's activations do not depend on the batch size or on its neighbours. ``pad_multiple=0``
pads a batch to its longest sample (fewer groups, not batch-invariant). Padding is on the right.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def take(rows: Iterable, n: Optional[int]) -> list:
    """The first ``n`` rows in file order, as a list (all of them when ``n`` is None or larger than the split).

    The one "first N rows" rule of the package. ``n`` must be None or a non-negative integer.
    """
    if n is None:
        return list(rows)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"row limit must be a non-negative integer or None, got {n!r}")
    return list(itertools.islice(rows, n))


def check_positions(model: str, prompt_len: int, max_length: int) -> None:
    """Refuse, from the model's configuration alone (nothing is loaded), a prompt of ``prompt_len`` slots plus
    ``max_length`` tokens that is longer than the model's positions, naming the largest ``--max-length`` that
    fits. Call :func:`skillkern.models.check_model_source` first."""
    from .models import model_positions

    model_type, limit = model_positions(model)
    need = prompt_len + max_length
    if limit is None or need <= limit:
        return
    if prompt_len:
        raise ValueError(f"a prompt of {prompt_len} slots + --max-length {max_length} = {need} positions, but the "
                         f"{model_type} model {model} has {limit}; lower --max-length to at most "
                         f"{limit - prompt_len}, or use a shorter --prompt-len")
    raise ValueError(f"--max-length {max_length} is more than the {limit} positions of the {model_type} model "
                     f"{model}; lower --max-length to at most {limit}")


@dataclass
class Batch:
    """Model inputs of one group of samples padded to the same length, with their labels.

    Attributes:
        inputs: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them),
            each (B, T) int64.
        labels: (B,) int64 class of each sample.
        attention_mask: (B, T), the same tensor as ``inputs["attention_mask"]`` (1 = real token).
        index: (B,) int64 (on the CPU): each sample's position among the examples given to :func:`iter_batches`
            (length bucketing reorders the samples of a batch).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    attention_mask: torch.Tensor = field(repr=False, default=None)
    index: torch.Tensor = field(repr=False, default=None)


def _example_fields(ex) -> tuple[str, Optional[str], int]:
    if isinstance(ex, dict):
        return ex["text"], ex.get("text_pair"), int(ex["label"])
    return ex.text, getattr(ex, "text_pair", None), int(ex.label)


def padded_length(length: int, pad_multiple: int, max_length: int) -> int:
    """The length a sample of ``length`` tokens is padded to: ``min(ceil(length / pad_multiple) * pad_multiple,
    max_length)`` (``pad_multiple`` > 0; with 0 a batch is padded to its longest sample instead)."""
    return min(math.ceil(length / pad_multiple) * pad_multiple, max_length)


def iter_batches(tokenizer, examples: Iterable, batch_size: int, max_length: int, pad_multiple: int = 32,
                 device: torch.device | str = "cpu") -> Iterator[Batch]:
    """Tokenize and pad ``examples`` batch by batch (nothing is tokenized ahead of its batch).

    Pairs use the tokenizer's own pair encoding. Padding is on the right. With ``pad_multiple > 0`` each
    sample is padded to :func:`padded_length` and one batch yields one group per padded length, in increasing
    length order (see the module docstring).

    Args:
        examples: ``skillkern.data.Example`` rows or dicts with ``text``, ``label`` and optional ``text_pair``.

    Yields:
        :class:`Batch` with ``inputs`` (B, T) tensors and ``labels`` (B,), B <= ``batch_size``.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; load it with skillkern.load_model or set pad_token")
    chunk: list = []
    start = 0
    for ex in examples:
        chunk.append(_example_fields(ex))
        if len(chunk) == batch_size:
            yield from _encode_chunk(tokenizer, chunk, max_length, pad_multiple, pad_id, device, start)
            start += len(chunk)
            chunk = []
    if chunk:
        yield from _encode_chunk(tokenizer, chunk, max_length, pad_multiple, pad_id, device, start)


def _encode_chunk(tokenizer, chunk, max_length, pad_multiple, pad_id, device, start=0) -> Iterator[Batch]:
    texts = [c[0] for c in chunk]
    pairs = [c[1] for c in chunk]
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise ValueError("a batch mixes single texts and sentence pairs")
    enc = tokenizer(texts, pairs if all(has_pair) else None, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    lengths = [len(ids) for ids in enc["input_ids"]]
    if pad_multiple:
        padded = [padded_length(n, pad_multiple, max_length) for n in lengths]
    else:
        padded = [max(lengths)] * len(lengths)
    for target in sorted(set(padded)):
        rows = [i for i, p in enumerate(padded) if p == target]
        inputs = {}
        for key in keys:
            fill = pad_id if key == "input_ids" else getattr(tokenizer, "pad_token_type_id", 0) if key == "token_type_ids" else 0
            t = torch.full((len(rows), target), fill, dtype=torch.long)
            for j, i in enumerate(rows):
                seq = enc[key][i]
                t[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            inputs[key] = t.to(device)
        if "attention_mask" not in inputs:
            mask = torch.zeros((len(rows), target), dtype=torch.long)
            for j, i in enumerate(rows):
                mask[j, : lengths[i]] = 1
            inputs["attention_mask"] = mask.to(device)
        labels = torch.tensor([chunk[i][2] for i in rows], dtype=torch.long, device=device)
        yield Batch(inputs=inputs, labels=labels, attention_mask=inputs["attention_mask"],
                    index=torch.tensor(rows, dtype=torch.long) + start)


def rows_differ(tokenizer, examples: Sequence, max_length: int, chunk: int = 256) -> bool:
    """True when at least two of ``examples`` differ after tokenization and truncation to ``max_length`` tokens
    (stops at the first pair that differs, usually within the first chunk)."""
    first = None
    for start in range(0, len(examples), chunk):
        fields = [_example_fields(ex) for ex in examples[start: start + chunk]]
        pairs = [f[1] for f in fields]
        enc = tokenizer([f[0] for f in fields], pairs if all(p is not None for p in pairs) else None,
                        truncation=True, max_length=max_length)
        for ids in enc["input_ids"]:
            if first is None:
                first = list(ids)
            elif list(ids) != first:
                return True
    return False


def check_rows_differ(tokenizer, examples: Sequence, max_length: int, what: str, *, required: bool,
                      hint: str = "") -> None:
    """docs/errors.md: rows that are all identical after truncation give every neuron one value, so
    no neuron can tell the classes apart. An error (:class:`~skillkern.data.DegenerateDataError`) when
    ``required`` (the evaluation split), else a logged warning."""
    from .data import DegenerateDataError

    if len(examples) < 2 or rows_differ(tokenizer, examples, max_length):
        return
    msg = (f"all {len(examples)} rows of {what} are the same tokens after truncation to --max-length {max_length}, "
           "so no neuron can tell them apart")
    if required:
        raise DegenerateDataError(msg + f" (predictivity is undefined){'; ' + hint if hint else ''}")
    logger.warning("%s", msg)
