"""The pruned-model folder: FFN layers of their own widths, saved with ``save_pretrained`` and rebuilt on load.

A model pruned by :mod:`skillkern.prune` has FFN projections narrower than its config says, and different in
each layer, so ``from_pretrained`` alone cannot rebuild it. The pruning record in ``config.json``
(``config.skillkern_pruning``) says what changed:

- ``modules``: path from the model root -> ``{"kind": "linear" | "conv1d", "shape": [out, in], "bias": bool}``
  for exactly the modules pruning replaced (shape in ``nn.Linear`` layout whatever the kind);
- ``auto_class``: the transformers auto class that builds the saved class (``"AutoModel"``,
  ``"AutoModelForMaskedLM"``, ``"AutoModelForCausalLM"``: the row's :attr:`~skillkern.models.FFNSpec.heads`), or
  None for a class no row names (it is then rebuilt from ``config.architectures``);
- ``widths`` (FFN width of every layer), ``kept`` (layer -> kept neuron indices) and provenance keys.

:func:`load_pruned` builds the model from its config, re-creates the recorded modules at their recorded shapes,
and loads the weights, checking exactly the recorded paths: a missing or unexpected weight of one of them is an
error naming it (as is any other missing weight that is not tied to a loaded one). :func:`save_pruned` also
writes ``skillkern_pruned.py``, the same re-creation for transformers alone (``trust_remote_code=True``).

This module knows no architecture: the record carries everything. It sits below :mod:`skillkern.models`
(whose ``load_model`` loads pruned folders through it) and imports nothing from the package but ``files``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_KEY", "LOADER_FILE", "is_pruned_folder", "load_pruned", "module_record", "record_pruning",
           "save_pruned"]

#: the key of the pruning record in ``config.json``
CONFIG_KEY = "skillkern_pruning"
#: the transformers-only loader written next to the weights
LOADER_FILE = "skillkern_pruned.py"


def _reshape(model, modules):
    """Replace each module at a recorded path by a fresh one of the recorded kind, shape and bias (random
    weights: the saved ones are loaded next). Shared word for word with the transformers-only loader."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for path, spec in modules.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name)
        out_features, in_features = spec["shape"]
        if spec["kind"] == "conv1d":
            new = Conv1D(out_features, in_features)
            if not spec["bias"]:
                new.bias = None
        else:
            new = nn.Linear(in_features, out_features, bias=spec["bias"])
        setattr(parent, name, new.to(device=old.weight.device, dtype=old.weight.dtype))


_LOADER = '''"""Loader for a model pruned by skillkern: FFN projections of per-layer widths.

Written by skillkern.pruned_format.save_pruned. The modules listed in config.skillkern_pruning["modules"] are
re-created at their recorded shapes after the base class builds the model, so the saved weights load strictly.
"""

from transformers import {base} as _Base


{reshape}

class {name}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _reshape(self, config.skillkern_pruning["modules"])
'''


def module_record(module: nn.Module) -> dict[str, Any]:
    """``{"kind", "shape", "bias"}`` of a projection as the record stores it: ``kind`` is ``"conv1d"`` for a
    transformers ``Conv1D`` (weight stored (in, out)), else ``"linear"``; ``shape`` is (out, in) either way."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} has no 2-D weight: not a projection the record can describe")
    conv1d = type(module).__name__ == "Conv1D"
    shape = list(weight.t().shape) if conv1d else list(weight.shape)
    return {"kind": "conv1d" if conv1d else "linear", "shape": [int(n) for n in shape],
            "bias": getattr(module, "bias", None) is not None}


def record_pruning(model: nn.Module, changed: Iterable[nn.Module], *, widths: Sequence[int],
                   kept: dict[int, Sequence[int]], auto_class: str | None, info: dict | None = None) -> dict:
    """Set (or extend, when the model was pruned before) ``model.config.skillkern_pruning``.

    Args:
        changed: the modules pruning has just replaced (found in ``model`` by identity); the paths of an earlier
            record stay, with their current shapes.
        widths: (layers,) FFN width of every layer after pruning.
        kept: layer index -> kept neuron indices, merged into the earlier record's.
        auto_class: the transformers auto class that builds ``type(model)``, or None.
        info: provenance keys (task, source run, ...).

    Returns:
        the record.
    """
    names = {id(mod): name for name, mod in model.named_modules()}
    record = dict(getattr(model.config, CONFIG_KEY, None) or {})
    paths = set(record.get("modules", {}))
    for mod in changed:
        if id(mod) not in names:
            raise ValueError(f"a changed {type(mod).__name__} is not a module of this model")
        paths.add(names[id(mod)])
    merged_kept = dict(record.get("kept", {}))
    merged_kept.update({str(int(i)): sorted({int(j) for j in idx}) for i, idx in kept.items()})
    record.update(info or {})
    record.update({"widths": [int(w) for w in widths], "kept": merged_kept, "auto_class": auto_class,
                   "modules": {p: module_record(model.get_submodule(p)) for p in sorted(paths)}})
    setattr(model.config, CONFIG_KEY, record)
    return record


def save_pruned(model: nn.Module, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` of a pruned model (its record goes into config.json) and of its tokenizer.

    Beside the weights it writes ``skillkern_pruned.py``, a loader for transformers alone, registered in
    ``config.json``'s ``auto_map`` under the record's ``auto_class``: e.g.
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the per-layer widths.
    ``skillkern.load_model(path)`` (or :func:`load_pruned`) needs no remote code.

    Args:
        tokenizer: saved too when not None.
    """
    record = getattr(model.config, CONFIG_KEY, None)
    if not record:
        raise ValueError(f"this model was not pruned by skillkern (config has no {CONFIG_KEY})")
    import transformers

    path = Path(path)
    base = type(model).__name__
    auto_class = record.get("auto_class")
    remote = bool(auto_class) and hasattr(transformers, base) and "modules" in record
    before = getattr(model.config, "auto_map", None)
    if remote:  # loadable with plain transformers: <auto_class>.from_pretrained(path, trust_remote_code=True)
        name = f"SkillkernPruned{base}"
        model.config.auto_map = {auto_class: f"{LOADER_FILE[:-3]}.{name}"}
    else:
        logger.warning("%s: no transformers loader written (class %s is not built by a transformers auto class "
                       "of its table row); load it with skillkern.load_model", path, base)
    kwargs = {}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # weights under the module names they have in memory, not renamed back to an older checkpoint layout
        # (GPT-NeoX's lm_head -> embed_out): the loaders rebuild a class transformers does not rename for
        kwargs["save_original_format"] = False
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        if remote:
            model.config.auto_map = before
            if before is None:
                del model.config.auto_map
    if remote:
        loader = _LOADER.format(base=base, name=name, reshape="{reshape}")
        (path / LOADER_FILE).write_text(loader.replace("{reshape}", inspect.getsource(_reshape)))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def is_pruned_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose ``config.json`` carries a pruning record."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get(CONFIG_KEY))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _model_class(config, record: dict, path: Path):
    """The class to build: the record's auto class, else the saved class by name."""
    import transformers

    name = record.get("auto_class")
    if name:
        cls = getattr(transformers, name, None)
        if cls is None or not name.startswith("AutoModel"):
            raise ValueError(f"{path}: the pruning record names auto class {name!r}, which transformers does not have")
        return cls.from_config
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{path}: the pruning record names no auto class and config.architectures={arch!r} is not "
                         "a transformers class; prune the model again")
    return cls._from_config


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor], modules: dict, path: Path) -> None:
    """Load ``state`` into ``model``: every weight of a recorded module exactly, every other weight present
    unless tied to a loaded one (a head's decoder sharing the input embeddings is not saved twice)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a size mismatch
        raise ValueError(f"{path}: the weights do not match the shapes of the pruning record: "
                         f"{' '.join(str(err).split())[:1500]}") from None
    own = model.state_dict(keep_vars=True)
    loaded = {own[k].data_ptr() for k in state if k in own}

    def recorded(key: str) -> bool:
        return key.rpartition(".")[0] in modules

    missing = [k for k in missing if recorded(k) or own[k].data_ptr() not in loaded]
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", list(unexpected))):
            pruned = sorted(k for k in keys if recorded(k))
            other = sorted(k for k in keys if not recorded(k))
            if pruned:
                parts.append(f"{what} weights of pruned modules: {', '.join(pruned)}")
            if other:
                parts.append(f"{what} weights: {', '.join(other[:6])}" + (" ..." if len(other) > 6 else ""))
        raise ValueError(f"{path}: the weights do not match the pruning record ({'; '.join(parts)}); prune the "
                         "model again")


def load_pruned(path: str | Path, *, dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned`: recorded modules first, then the weights.

    Prefer ``skillkern.load_model(path)``, which calls this for pruned folders and also returns the tokenizer.

    Args:
        dtype: e.g. ``torch.bfloat16``; None keeps transformers' default.
        device: where to put the model; None leaves it on the CPU.

    Returns:
        the model in eval mode, with the saved class (e.g. ``BertForMaskedLM``) and per-layer FFN widths.

    Raises:
        ValueError: no pruning record, a recorded path the model lacks, or weights that do not match the record
            (naming the paths).
    """
    from transformers import AutoConfig

    from .files import load_safetensors

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(f"{path} is not a pruned skillkern model (config.json has no {CONFIG_KEY})")
    modules = record.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{path}: its pruning record lists no modules (written by an older skillkern); prune the "
                         "model again")
    if getattr(config, "auto_map", None):  # the transformers loader's entry; this path needs no remote code
        del config.auto_map
    model = _model_class(config, record, path)(config, **({"dtype": dtype} if dtype is not None else {}))
    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the pruning record names module {name!r}, which {type(model).__name__} "
                             "does not have; prune the model again") from None
    _reshape(model, modules)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_safetensors(f, what="pruned model weights", hint="prune again (with --overwrite)")[0])
    _check_weights(model, state, modules, path)
    model.eval()
    if device is not None:
        model.to(device)
    return model
