"""Soft prompts on a frozen backbone (METHOD.md section 2), and BitFit as the prompt-free comparison.

Input layout (encoders): ``[slot 0 ; p_1 .. p_{P-1} ; <s> text </s>]``. Slot 0 holds the tokenizer's mask-token
embedding and is frozen; the P-1 prompt vectors are trained (init ``randn / 30``). The prediction is read at
slot 0 by one of three heads:

- ``mlm``: the masked-LM logits restricted to verbalizer tokens (the paper's head; needs a masked-LM head);
- ``verbalizer``: ``logits_c = s * cos(h_slot0, E[verbalizer_c])``, the cosine of slot 0's last hidden state with
  the frozen input embedding of each class word, times one trained scalar temperature ``s``. For a model without a
  masked-LM head (the embedded all-MiniLM-L6-v2) this is the closest analogue of the paper's head: nothing but the
  prompt (and one scalar) learns, so only the prompt can put the skill into the model;
- ``linear``: a linear head on slot 0's last hidden state, trained with the prompt (a documented deviation: it can
  read the label from features the frozen model computes anyway, so the prompt need carry little skill).

Causal decoders cannot read slot 0 (it sees only itself), so their heads read the last real token.

The backbone's weights never get gradients (``requires_grad=False``); backpropagation runs through the
activations only, as far as the prompt needs.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .models import ffn_layers, is_causal, max_positions

logger = logging.getLogger(__name__)

#: verbalizer words by number of classes (code defaults of the released code)
DEFAULT_VERBALIZERS = {2: ["negative", "positive"], 3: ["negative", "neutral", "positive"]}


class PromptTooLongError(ValueError):
    """The prompt plus the text would need more positions than the model has."""


def check_prompt_fits(model: nn.Module, prompt_len: int, max_length: int) -> None:
    """Raise :class:`PromptTooLongError` if ``prompt_len + max_length`` exceeds the model's positions
    (:func:`skillkern.models.max_positions`: the config's limit less the row's position offset)."""
    limit = max_positions(model)
    if limit is not None and prompt_len + max_length > limit:
        raise PromptTooLongError(
            f"prompt of {prompt_len} slots + max_length {max_length} tokens = {prompt_len + max_length} positions, "
            f"but {model.config.model_type} model has {limit}; lower --max-length to at most {limit - prompt_len} "
            f"or use a shorter prompt")


def _last_hidden(out) -> torch.Tensor:
    """(B, T, H) last hidden state of a base model's output, or of a head model's (``output_hidden_states``)."""
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out.hidden_states[-1]


@torch.no_grad()
def _output_width(backbone: nn.Module, embeddings: torch.Tensor) -> int:
    """Width of the last hidden state, the linear head's input, measured on one position: it need not be the
    embedding width (ELECTRA's ``embedding_size``, OPT's ``word_embed_proj_dim``) nor ``config.hidden_size``."""
    x = embeddings[:1].detach()[None]                                                   # (1, 1, E)
    mask = torch.ones(1, 1, dtype=torch.long, device=x.device)
    out = backbone(inputs_embeds=x, attention_mask=mask,
                   output_hidden_states=backbone.get_output_embeddings() is not None)
    return int(_last_hidden(out).shape[-1])


def verbalizer_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """One vocabulary id per class word (the word's first token, with a leading space for BPE vocabularies)."""
    ids = []
    for w in words:
        pieces = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        direct = tokenizer(w, add_special_tokens=False)["input_ids"]
        # WordPiece ignores the space; BPE vocabularies (RoBERTa, GPT-2) want it for a word-initial token.
        cand = direct if len(direct) == 1 else pieces
        if not cand:
            raise ValueError(f"verbalizer word {w!r} maps to no token")
        if len(cand) > 1:
            logger.warning("verbalizer word %r is %d tokens; using its first", w, len(cand))
        ids.append(cand[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbalizer words {list(words)} map to repeated token ids {ids}")
    return ids


HEADS = ("auto", "mlm", "verbalizer", "linear")


class VerbalizerHead(nn.Module):
    """``logits = exp(log_scale) * cos(h, E[ids])``: frozen class-word embeddings, one trained temperature.

    Args:
        anchors: (C, H) input embeddings of the class words (copied, frozen).
        scale: initial temperature ``s`` (trained as ``log s`` so it stays positive).
    """

    def __init__(self, anchors: torch.Tensor, scale: float = 10.0):
        super().__init__()
        self.register_buffer("anchors", nn.functional.normalize(anchors.detach().float(), dim=-1).to(anchors.dtype))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(scale), device=anchors.device, dtype=anchors.dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states -> (B, C) logits."""
        h = nn.functional.normalize(hidden, dim=-1)
        return self.log_scale.exp() * (h @ self.anchors.to(h.dtype).T)


class PromptModel(nn.Module):
    """A frozen backbone with a trainable soft prompt (and, without a masked-LM head, a linear head).

    Args:
        backbone: a model from :func:`skillkern.load_model` (with ``masked_lm=True`` to use an MLM head).
        tokenizer: its tokenizer.
        num_classes: number of classes.
        prompt_len: P, the number of prompt slots including the frozen slot 0; 0 means no prompt (BitFit).
        head: ``auto`` (masked-LM verbalizer if the model has an MLM head, else linear), ``mlm``, ``verbalizer``
            (frozen class-word embeddings and a trained temperature; see the module docstring) or ``linear``.
        verbalizer: class words for the mlm and verbalizer heads (default: negative/positive,
            negative/neutral/positive).
        seed: seeds the prompt init (``randn / 30``) and the linear head init.
        prompt_init: optional (P-1, H) tensor to start from instead of ``randn / 30``.
    """

    def __init__(self, backbone: nn.Module, tokenizer, num_classes: int, prompt_len: int = 16, head: str = "auto",
                 verbalizer: Optional[Sequence[str]] = None, seed: int = 0,
                 prompt_init: Optional[torch.Tensor] = None):
        super().__init__()
        if prompt_len < 0 or prompt_len == 1:
            raise ValueError(f"prompt_len must be 0 (no prompt) or >= 2 (slot 0 + trained slots), got {prompt_len}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        ffn_layers(backbone)  # unknown architecture: fail here
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.prompt_len = prompt_len
        self.causal = is_causal(backbone)  # the table row: decoders read the last real token
        emb = backbone.get_input_embeddings()
        hidden = emb.weight.shape[1]
        device, dtype = emb.weight.device, emb.weight.dtype
        gen = torch.Generator().manual_seed(int(seed))

        has_mlm = backbone.get_output_embeddings() is not None
        if head == "mlm" and not has_mlm:
            raise ValueError("head='mlm' but the model has no masked-LM head (load it with masked_lm=True, or use "
                             "head='linear')")
        if head == "verbalizer":
            self.head_kind = "verbalizer"
        else:
            self.head_kind = "mlm" if (head == "mlm" or (head == "auto" and has_mlm and not self.causal)) else "linear"
        if self.head_kind in ("mlm", "verbalizer"):
            words = list(verbalizer or DEFAULT_VERBALIZERS.get(num_classes, []))
            if len(words) != num_classes:
                raise ValueError(f"{num_classes} classes need {num_classes} verbalizer words, got {words}")
            self.verbalizer = words
            ids = verbalizer_ids(tokenizer, words)
            self.register_buffer("verbalizer_ids", torch.tensor(ids, device=device))
            self.head = None
            if self.head_kind == "verbalizer":
                width = _output_width(backbone, emb.weight)
                if width != hidden:
                    raise ValueError(f"head='verbalizer' compares the last hidden state ({width} wide) with input "
                                     f"embeddings ({hidden} wide); this model's differ: use head='linear'")
                self.head = VerbalizerHead(emb.weight[ids])
        else:
            self.verbalizer = None
            width = _output_width(backbone, emb.weight)
            self.head = nn.Linear(width, num_classes, device=device, dtype=dtype)
            with torch.no_grad():
                bound = 1 / math.sqrt(width)
                self.head.weight.copy_((torch.rand(num_classes, width, generator=gen) * 2 - 1) * bound)
                self.head.bias.zero_()

        if prompt_len:
            slot0_id = tokenizer.mask_token_id
            if slot0_id is None:
                slot0_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
                logger.info("tokenizer has no mask token; slot 0 holds token id %s instead", slot0_id)
            self.slot0_token_id = int(slot0_id)
            self.register_buffer("slot0", emb.weight[slot0_id].detach().clone())
            init = torch.randn(prompt_len - 1, hidden, generator=gen) / 30 if prompt_init is None else prompt_init
            if tuple(init.shape) != (prompt_len - 1, hidden):
                raise ValueError(f"prompt_init must have shape ({prompt_len - 1}, {hidden}), got {tuple(init.shape)}")
            self.prompt = nn.Parameter(init.to(device=device, dtype=dtype).clone())
        else:
            self.slot0_token_id = None
            self.prompt = None

    @property
    def slots(self) -> tuple[int, ...]:
        """Positions of the prompt slots in the model input (0..P-1)."""
        return tuple(range(self.prompt_len))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits.

        Args:
            input_ids, attention_mask, token_type_ids: (B, T) tokenized text, padded on the right.

        Returns:
            (B, C) logits.
        """
        B, T = input_ids.shape
        P = self.prompt_len
        check_prompt_fits(self.backbone, P, T)
        emb = self.backbone.get_input_embeddings()(input_ids)
        if P:
            pre = torch.cat([self.slot0[None], self.prompt], dim=0).unsqueeze(0).expand(B, -1, -1)
            emb = torch.cat([pre.to(emb.dtype), emb], dim=1)
            ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([torch.zeros_like(ones, dtype=token_type_ids.dtype), token_type_ids], 1)
        kwargs = {"inputs_embeds": emb, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.head_kind != "mlm" and self.backbone.get_output_embeddings() is not None:
            kwargs["output_hidden_states"] = True  # a model with an LM head returns logits, not the hidden state
        out = self.backbone(**kwargs)
        if self.head_kind == "mlm":
            return out.logits[:, 0, self.verbalizer_ids]
        hidden = _last_hidden(out)
        if self.causal:
            last = attention_mask.long().cumsum(1).argmax(1)  # last real token (right padding)
            return self.head(hidden[torch.arange(B, device=hidden.device), last])
        return self.head(hidden[:, 0])

    def use_bitfit(self) -> None:
        """Train the backbone's biases (and the head) instead of a prompt: BitFit (Ben Zaken et al. 2022)."""
        if self.prompt_len:
            raise ValueError("BitFit runs without a prompt: build the PromptModel with prompt_len=0")
        for name, p in self.backbone.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors a run saves: prompt, slot 0, head, and for BitFit the backbone biases."""
        state = {}
        if self.prompt is not None:
            state["prompt"] = self.prompt.detach().clone()
            state["slot0"] = self.slot0.detach().clone()
        if self.head is not None:
            for name, p in self.head.named_parameters():
                state["head." + name] = p.detach().clone()
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                state["backbone." + name] = p.detach().clone()
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trained_state`; shapes must match."""
        params = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key == "prompt":
                    target = self.prompt
                elif key == "slot0":
                    target = self.slot0
                elif key.startswith("head."):
                    target = dict(self.head.named_parameters()).get(key[5:]) if self.head is not None else None
                    if target is None:
                        raise ValueError(f"state has {key!r} but this model's head ({self.head_kind}) has no such "
                                         "tensor")
                elif key.startswith("backbone."):
                    target = params.get(key[9:])
                else:
                    target = None
                if target is None:
                    raise ValueError(f"unexpected tensor {key!r} in a prompt state")
                if target.shape != value.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's "
                                     f"{tuple(target.shape)}")
                target.copy_(value.to(target.device, target.dtype))


def describe_head(model: PromptModel) -> str:
    """One line for outputs: which head produced the predictions."""
    if model.head_kind == "mlm":
        return f"masked-LM logits at slot 0 restricted to verbalizer {model.verbalizer}"
    if model.head_kind == "verbalizer":
        where = "the last real token" if model.causal else "slot 0"
        return (f"frozen verbalizer head: a trained temperature times the cosine of {where}'s last hidden state with "
                f"the input embeddings of {model.verbalizer} (the closest analogue of the paper's masked-LM head "
                "for a model without one)")
    where = "the last real token" if model.causal else ("slot 0" if model.prompt_len else "the first token")
    return (f"linear head on {where} trained with the {'prompt' if model.prompt_len else 'biases'} "
            "(the model has no masked-LM head: a documented deviation from the paper)")
