"""Structured pruning with bias folding, by skill neurons or by the structured-pruning criteria, and pruned models
that save and reload (METHOD.md 7).

Which neurons stay (:data:`CRITERIA`; every criterion keeps the same number in each pruned layer):

* ``skill``: the top skill neurons by predictivity (the paper's; multi-class runs: the pn/neu union rule);
* ``flap`` (An et al. 2024): ``var(a_j) * ||W2[:, j]||^2``, the fluctuation of neuron j's activation over the
  positions times the squared norm of its output column; optionally with FLAP's adaptive per-layer widths
  (:func:`flap_adaptive_counts`);
* ``wanda`` (Sun et al. 2023, per neuron): ``||a_j||_2 * ||W2[:, j]||_2``;
* ``magnitude``: ``mean |a_j|``;
* ``random``: uniformly at random (seeded).

The moment criteria read :class:`~skillkern.stats.NeuronMoments` collected in one streaming pass over the run's
training rows (:func:`run_moments`, every real token position by default). In each pruned layer every other
neuron is frozen at its *fill value* and folded into the down-projection's bias:

    b2' = b2 + W2[:, P] @ fill[P]       (P = pruned neurons only; the released code adds W2 @ fill over all: a bug)

The fill value of a neuron is, as the paper has it, its threshold averaged over the prompt slots
(:func:`skillkern.runs.prompt_thresholds`), or its mean activation over every real token position (the moments'
``sum / n``: FLAP's bias compensation).

then W1, b1 (and W_gate) are sliced to the rows K and W2 to the columns K, so the layer really shrinks. Layers
may end up with different widths; :func:`prune_model` records the modules it replaced in the model's config, and
:mod:`skillkern.pruned_format` saves the folder and rebuilds those shapes before loading the weights
(``skillkern.load_model(folder)``), so a pruned folder comes back in one call with bit-identical outputs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .models import FFNLayer, auto_class_name, down_weight, ffn_layers
from .pruned_format import record_pruning, save_pruned
from .stats import NeuronMoments, select_counts

logger = logging.getLogger(__name__)


def parse_layers(spec: str, num_layers: Optional[int]) -> list[int]:
    """``top:0.75`` (the top 75% of layers, closest to the output, ``int(0.75 * L)`` of them), ``all``, or a
    comma-separated list of layer indices. ``num_layers=None`` checks the syntax only (returns [])."""
    spec = spec.strip()
    usage = f"--layers must be 'all', 'top:F' (F in (0, 1]) or a list of layer indices, got {spec!r}"
    if spec == "all":
        return list(range(num_layers or 0))
    if spec.startswith("top:"):
        try:
            frac = float(spec[4:])
        except ValueError:
            raise ValueError(usage) from None
        if not 0 < frac <= 1:
            raise ValueError(f"--layers top:F needs F in (0, 1], got {spec!r}")
        if num_layers is None:
            return []
        n = int(frac * num_layers + 1e-9)
        if n == 0:
            raise ValueError(f"--layers {spec} selects none of the {num_layers} layers; raise F to at least "
                             f"{1 / num_layers:.3g}")
        return list(range(num_layers - n, num_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(usage) from None
    if not layers:
        raise ValueError(usage)
    bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        raise ValueError(f"--layers: layer indices {bad} out of range"
                         + (f" for {num_layers} layers (0..{num_layers - 1})" if num_layers is not None else ""))
    return layers if num_layers is not None else []


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _resized(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], conv1d: bool) -> nn.Module:
    """A copy of a Linear / Conv1D module with new weight (in the module's own layout) and bias."""
    new = copy.copy(module)  # shallow: same class and attributes; parameters replaced below
    new._parameters = dict(module._parameters)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    new.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
    if conv1d:  # transformers Conv1D: weight (in, out), attribute nf = out
        new.nf = weight.shape[1]
        if hasattr(new, "nx"):
            new.nx = weight.shape[0]
    else:
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    return new


def _up_like(layer: FFNLayer, module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Keep output rows ``keep`` of an up/gate projection."""
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if layer.spec.conv1d:
        return _resized(module, w[:, keep], None if b is None else b[keep], True)
    return _resized(module, w[keep], None if b is None else b[keep], False)


def _folded_bias(layer: FFNLayer, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``b2 + W2[:, P] @ fill[P]`` over the pruned neurons P only, summed in float64 (hidden_out,)."""
    pruned = torch.ones(layer.width, dtype=torch.bool)
    pruned[keep] = False
    w2 = layer.down.weight.detach()
    w2_lin = down_weight(layer)                                            # (hidden_out, D)
    m = fill.to(torch.float64)
    fold = (w2_lin.double()[:, pruned.to(w2.device)] @ m[pruned.to(m.device)].to(w2.device)).to(w2.dtype)
    b2 = layer.down.bias.detach() if getattr(layer.down, "bias", None) is not None else torch.zeros_like(fold)
    return b2 + fold


def _checked_keep(layer: FFNLayer, keep, fill: torch.Tensor) -> torch.Tensor:
    """Sorted unique int64 indices on the CPU, after checking them and the fill values against the layer."""
    D = layer.width
    keep = torch.as_tensor(keep, dtype=torch.int64).unique(sorted=True).cpu()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= D):
        raise ValueError(f"layer {layer.index}: kept neuron indices must be in [0, {D})")
    if fill.shape != (D,):
        raise ValueError(f"layer {layer.index}: fill must have shape ({D},), got {tuple(fill.shape)}")
    return keep


@torch.no_grad()
def prune_layer(layer: FFNLayer, keep: torch.Tensor, fill: torch.Tensor) -> None:
    """Prune one FFN layer in place to the neurons ``keep``, folding the others at ``fill`` into the bias.

    Args:
        keep: (K,) int64 neuron indices to keep (any order; they are sorted).
        fill: (D,) fill values: the value each pruned neuron is frozen at.
    """
    keep = _checked_keep(layer, keep, fill)
    down = layer.down
    b2 = _folded_bias(layer, keep, fill)
    new_w2 = down.weight.detach()[keep] if layer.spec.conv1d else down.weight.detach()[:, keep]
    spec, block = layer.spec, layer.block
    _set_path(block, spec.down, _resized(down, new_w2, b2, layer.spec.conv1d))
    _set_path(block, spec.up, _up_like(layer, layer.up, keep))
    if layer.gate is not None:
        _set_path(block, spec.gate, _up_like(layer, layer.gate, keep))


class MaskedFFNModel:
    """What :func:`masked_ffn_model` yields: the patched model, and with several plans the rows' plan ids.

    Attributes:
        model: the patched model (call it directly when there is one plan).
        plans: how many pruning plans (tasks) it serves.
        task_ids: (batch,) int64 plan index of each batch row for the next forward; set by :meth:`__call__`.
    """

    def __init__(self, model: nn.Module, plans: int) -> None:
        self.model = model
        self.plans = plans
        self.task_ids: Optional[torch.Tensor] = None

    def __call__(self, *args, task_ids=None, **kwargs):
        """``model(*args, **kwargs)`` with batch row ``i`` run as plan ``task_ids[i]`` (a (batch,) int sequence or
        tensor; may be omitted with one plan)."""
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids, dtype=torch.int64).reshape(-1)
            if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.plans):
                raise ValueError(f"task_ids must be in [0, {self.plans}) for {self.plans} pruning plans, got "
                                 f"{task_ids.tolist()[:8]}")
        self.task_ids = task_ids
        try:
            return self.model(*args, **kwargs)
        finally:
            self.task_ids = None

    def row_sets(self, x: torch.Tensor) -> torch.Tensor:
        """x.shape[:-1] int64 plan ids of the FFN input ``x`` ((batch, seq, H), or (batch * seq, H) for blocks
        that flatten tokens)."""
        ids = self.task_ids
        if ids is None:
            raise ValueError(f"this model serves {self.plans} pruning plans: call the handle with task_ids=(batch,) "
                             "naming each row's plan")
        ids = ids.to(x.device)
        batch = ids.shape[0]
        if x.dim() >= 3 and x.shape[0] == batch:
            return ids.reshape(batch, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        if x.dim() == 2 and batch and x.shape[0] % batch == 0:
            return ids.repeat_interleave(x.shape[0] // batch)
        raise ValueError(f"task_ids has {batch} rows but the FFN input has shape {tuple(x.shape)}")


@contextlib.contextmanager
def masked_ffn_model(model: nn.Module, keep, fill, *, backend: str = "auto", schedule: str = "auto",
                     contiguous_w2: Optional[bool] = None) -> Iterator[MaskedFFNModel]:
    """Run ``model`` as the model :func:`prune_model` would make, from its dense weights, with ``masked_ffn``;
    or as several such models at once, one per batch row.

    Inside the block every layer in ``keep`` computes ``W2[:, K] @ act(W1[K] x + b1[K]) + b2'`` with the
    :func:`skillkern.ops.masked_ffn.masked_ffn` kernel (gated MLPs: the gated form), where ``b2'`` is the bias
    with the pruned neurons folded in at ``fill`` exactly as :func:`prune_layer` folds them. Nothing is sliced
    or copied except the folded biases (and, with ``contiguous_w2``, a transposed copy of W2 per layer), so
    one set of weights serves the dense model outside the block and the pruned one inside it. On a GPU this is
    the fast path for few rows; on a CPU, slicing (:func:`prune_model`) is faster.

    Several plans (e.g. several tasks' skill neurons): pass lists, and call the yielded handle with
    ``task_ids``; each layer then runs one ``masked_ffn`` call over a (plans, max kept) index table with a
    per-row plan, adding each row's own folded bias. A plan that leaves a layer whole keeps all its neurons there.

    Args:
        keep: layer index -> (K_l,) int64 kept neuron indices (layers not in the dict run unchanged), or a list
            of such dicts, one per plan.
        fill: (L, D) fill values (what the pruned neurons are frozen at), or a list of them, one per plan.
        backend, schedule: passed to ``masked_ffn`` (``backend="torch"`` is the index_select reference).
        contiguous_w2: keep a transposed contiguous copy of each W2, so the kept neurons' output weights are
            contiguous rows (see the masked_ffn module docstring); default: on CUDA only.

    Yields:
        a :class:`MaskedFFNModel`; the model is patched until the block exits (also on exceptions). Inference
        only.
    """
    from .models import fused_ffn_weights, replace_ffn_computation
    from .ops.masked_ffn import masked_ffn

    many = isinstance(keep, (list, tuple))
    plans = list(keep) if many else [keep]
    fills = list(fill) if isinstance(fill, (list, tuple)) else [fill]
    if len(fills) != len(plans):
        raise ValueError(f"{len(plans)} keep plans but {len(fills)} fill tensors: give one (L, D) fill per plan")
    if not plans:
        raise ValueError("masked_ffn_model needs at least one pruning plan")
    layers = ffn_layers(model)
    for values in fills:
        if values.dim() != 2 or values.shape[0] != len(layers):
            raise ValueError(f"fill must be (layers={len(layers)}, neurons), got {tuple(values.shape)}")
    for plan in plans:
        for index in plan:
            if not 0 <= index < len(layers):
                raise ValueError(f"layer {index} out of range for {len(layers)} layers")
    handle = MaskedFFNModel(model, len(plans))
    prepared = {}
    with torch.no_grad():
        for index in sorted({i for plan in plans for i in plan}):
            layer = layers[index]
            w = fused_ffn_weights(model, layer)
            w2 = layer.down.weight.detach()
            w2 = w2.t() if layer.spec.conv1d else w2                       # (hidden_out, D), maybe a view
            if contiguous_w2 if contiguous_w2 is not None else w2.is_cuda:
                w2 = w2.t().contiguous().t() if w2.stride(0) != 1 else w2
            sets, biases = [], []
            for plan, values in zip(plans, fills):
                k = _checked_keep(layer, plan[index], values[index]) if index in plan else torch.arange(layer.width)
                sets.append(k)
                biases.append(_folded_bias(layer, k, values[index]))
            if many:
                table = torch.full((len(sets), max(len(k) for k in sets)), -1, dtype=torch.int64)
                for g, k in enumerate(sets):
                    table[g, : len(k)] = k
                keep_t, b2 = table.to(w2.device), torch.stack(biases)           # (G, Kmax), (G, hidden_out)
            else:
                keep_t, b2 = sets[0].to(w2.device), biases[0]
            prepared[index] = dict(w1=w.w1.detach(), b1=None if w.b1 is None else w.b1.detach(), w2=w2, b2=b2,
                                   keep=keep_t, w_gate=None if w.w_gate is None else w.w_gate.detach(), act=w.act)

    def run(index: int, x: torch.Tensor) -> torch.Tensor:
        p = prepared[index]
        if not many:
            return masked_ffn(x, p["w1"], p["b1"], p["w2"], p["b2"], p["keep"], act=p["act"], w_gate=p["w_gate"],
                              backend=backend, schedule=schedule, check=False)
        rows = handle.row_sets(x)
        y = masked_ffn(x, p["w1"], p["b1"], p["w2"], None, p["keep"], act=p["act"], w_gate=p["w_gate"],
                       row_set=rows, backend=backend, schedule=schedule, check=False)
        return y + p["b2"][rows]  # each row's own folded bias

    with replace_ffn_computation(model, run, layers=sorted(prepared)):
        yield handle


def prune_model(model: nn.Module, keep: dict[int, torch.Tensor], fill: torch.Tensor,
                info: Optional[dict] = None) -> nn.Module:
    """Prune ``model`` in place.

    Args:
        keep: layer index -> (K_l,) kept neuron indices; layers not in the dict are left whole.
        fill: (L, D) fill values: what the pruned neurons are frozen at (folded into the down-projection bias).
        info: extra provenance recorded in ``config.skillkern_pruning``.

    Returns:
        the model, with its pruning record (:func:`skillkern.pruned_format.record_pruning`: the module paths
        replaced and their shapes, the auto class of its head, ``widths``, ``kept``) in
        ``config.skillkern_pruning``; save it with :func:`skillkern.pruned_format.save_pruned`.
    """
    layers = ffn_layers(model)
    if fill.dim() != 2 or fill.shape[0] != len(layers):
        raise ValueError(f"fill must be (layers={len(layers)}, neurons), got {tuple(fill.shape)}")
    for index, idx in keep.items():
        if not 0 <= index < len(layers):
            raise ValueError(f"layer {index} out of range for {len(layers)} layers")
        prune_layer(layers[index], idx, fill[index])
    layers = ffn_layers(model)
    changed = [mod for index in keep for mod in (layers[index].up, layers[index].down, layers[index].gate)
               if mod is not None]
    record_pruning(model, changed, widths=[layer.width for layer in layers],
                   kept={index: torch.as_tensor(idx).unique().tolist() for index, idx in keep.items()},
                   auto_class=auto_class_name(model), info=info)
    return model


# --------------------------------------------------------------------------------------------------------------
# Which neurons stay: the criteria
# --------------------------------------------------------------------------------------------------------------

#: the pruning criteria (the README's pruning section): which neurons of a pruned layer stay
CRITERIA = ("skill", "flap", "wanda", "magnitude", "random")
#: the criteria that rank neurons by their moments (:class:`skillkern.stats.NeuronMoments`)
MOMENT_CRITERIA = ("flap", "wanda", "magnitude")


def uses_moments(criterion: str, fill: str, keep_massive: bool = False) -> bool:
    """Whether a prune reads the moments: a moment criterion, the ``tokens`` fill (their mean) or ``keep_massive``
    (the massive neurons are found from them)."""
    return criterion in MOMENT_CRITERIA or fill == "tokens" or keep_massive


def criterion_scores(model: nn.Module, criterion: str, moments: NeuronMoments) -> torch.Tensor:
    """Per-neuron scores of a moments criterion (higher = kept first), from the activations' moments and W2.

    With ``a_j`` neuron j's activations over the n positions of the moments and ``w_j = W2[:, j]`` the column of
    the down-projection it writes through (:func:`skillkern.models.down_weight`):

    * ``flap`` (An et al. 2024, its fluctuation metric): ``var(a_j) * ||w_j||^2``, the sample variance
      (:meth:`NeuronMoments.variance`);
    * ``wanda`` (Sun et al. 2023, per neuron): ``||a_j||_2 * ||w_j||_2``, the activations' L2 norm over positions;
    * ``magnitude``: ``mean |a_j|``.

    Args:
        moments: (L, S, D) moments of ``model``'s neurons (any number of slots: they are pooled).

    Returns:
        (L, D) float64 scores on the CPU.
    """
    if criterion not in MOMENT_CRITERIA:
        raise ValueError(f"criterion {criterion!r} has no moment scores; choose one of {MOMENT_CRITERIA}")
    layers = ffn_layers(model)
    if (moments.num_layers, moments.width) != (len(layers), layers[0].width) or \
            any(layer.width != moments.width for layer in layers):
        raise ValueError(f"moments of {moments.num_layers} layers x {moments.width} neurons do not fit the model "
                         f"({len(layers)} layers of widths {sorted({layer.width for layer in layers})})")
    if criterion == "magnitude":
        return moments.mean_abs().cpu()
    norms = torch.stack([down_weight(layer).double().norm(dim=0).cpu() for layer in layers])   # (L, D)
    if criterion == "flap":
        return moments.variance().cpu() * norms.square()
    return moments.l2_norm().cpu() * norms


def flap_adaptive_counts(scores: torch.Tensor, counts: dict[int, int]) -> dict[int, int]:
    """FLAP's adaptive widths: the same total as ``counts``, spread over the layers by a global ranking.

    Each layer's scores are standardised over its neurons, ``z = (s - mean) / std`` (std 0: z = 0), and the
    ``sum(counts.values())`` best (layer, neuron) pairs of the layers in ``counts`` by ``z`` are kept (ties: lower
    layer, then lower neuron first). Each layer keeps at least its best neuron (a layer of width 0 is not a
    pruned layer but a removed one, which the pruned-model format does not hold).

    Args:
        scores: (L, D) criterion scores (:func:`criterion_scores`).
        counts: pruned layer -> kept count at uniform width.

    Returns:
        pruned layer -> kept count, summing to the same total.
    """
    chosen = sorted(counts)
    total = sum(counts.values())
    if total < len(chosen):
        raise ValueError(f"{total} kept neurons cannot give each of {len(chosen)} layers one")
    s = scores[chosen].to(torch.float64)
    std = s.std(dim=1, keepdim=True)
    z = torch.where(std > 0, (s - s.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0), 0.0)
    best = z.argmax(dim=1)
    z[torch.arange(len(chosen)), best] = float("inf")            # each layer's best first: one neuron each
    order = torch.sort(z.reshape(-1), descending=True, stable=True).indices[:total]
    kept = torch.bincount(order // s.shape[1], minlength=len(chosen))
    return {layer: int(k) for layer, k in zip(chosen, kept.tolist())}


def select_neurons(model: nn.Module, criterion: str, counts: dict[int, int], *,
                   moments: Optional[NeuronMoments] = None, skill: Optional[Sequence[torch.Tensor]] = None,
                   seed: int = 0, flap_adaptive: bool = False, keep_massive: bool = False,
                   outlier_factor: Optional[float] = None) -> dict[int, torch.Tensor]:
    """The neurons each pruned layer keeps under ``criterion``.

    Args:
        counts: pruned layer -> number of neurons it keeps (the same for every criterion; with
            ``flap_adaptive`` only their total is kept, spread by :func:`flap_adaptive_counts`).
        moments: the moments of ``model``'s neurons (criteria ``flap``, ``wanda``, ``magnitude``).
        skill: per-layer skill neurons, best first (criterion ``skill``: :func:`skillkern.runs.skill_selection`).
        seed: the random criterion's generator seed (per layer, uniformly without replacement).
        keep_massive: keep each layer's massive-activation neurons first (activation norm over ``outlier_factor``,
            default :data:`skillkern.perturb.OUTLIER_FACTOR`, times the layer median, from ``moments``:
            :func:`skillkern.perturb.massive_neurons`; the largest first when there are more than the layer keeps),
            then the criterion's best of the others, at the same count. A few such neurons carry large constant
            activations the rest of the model relies on; a criterion that ranks by task signal alone drops them.

    Returns:
        pruned layer -> (K_l,) int64 kept neuron indices (best first, random: sorted; with ``keep_massive`` the
        massive neurons first).
    """
    if keep_massive:
        if moments is None:
            raise ValueError("keep_massive needs the moments of the neurons (moments=...)")
        from .perturb import OUTLIER_FACTOR, massive_neurons

        base = select_neurons(model, criterion, counts, moments=moments, skill=skill, seed=seed,
                              flap_adaptive=flap_adaptive)
        norms = moments.l2_norm().cpu()  # every neuron of a layer sees the same positions: ranks as the RMS
        massive = massive_neurons(norms, OUTLIER_FACTOR if outlier_factor is None else outlier_factor)
        out = {}
        for layer, picked in base.items():
            k = len(picked)
            first = massive[layer][torch.sort(norms[layer, massive[layer]], descending=True, stable=True).indices][:k]
            rest = picked[~torch.isin(picked, first)][: k - len(first)]
            out[layer] = torch.cat([first, rest])
        return out
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if flap_adaptive and criterion != "flap":
        raise ValueError("flap_adaptive needs criterion 'flap' (its standardised global ranking)")
    chosen = sorted(counts)
    if criterion == "skill":
        if skill is None:
            raise ValueError("criterion 'skill' needs the skill selection (skill=...)")
        return {layer: skill[layer][: counts[layer]] for layer in chosen}
    if criterion == "random":
        from .perturb import random_selection

        width = ffn_layers(model)[0].width
        return dict(zip(chosen, random_selection([counts[layer] for layer in chosen], width, seed)))
    if moments is None:
        raise ValueError(f"criterion {criterion!r} needs the moments of the neurons (moments=...)")
    scores = criterion_scores(model, criterion, moments)
    if flap_adaptive:
        counts = flap_adaptive_counts(scores, counts)
    picked = select_counts(scores[chosen], [counts[layer] for layer in chosen])
    return dict(zip(chosen, picked))


# --------------------------------------------------------------------------------------------------------------
# skillkern prune
# --------------------------------------------------------------------------------------------------------------

def run_moments(pm, examples: Sequence, *, positions: str = "tokens", max_length: int = 128, batch_size: int = 32,
                backend: str = "auto", progress: bool = False) -> NeuronMoments:
    """The moments of a run's model (:class:`~skillkern.prompt.PromptModel` ``pm``, its prompt in place) over
    ``examples``: every real position the FFNs see, prompt positions included (``tokens``), or the prompt slots
    (``slots``; a BitFit run's first token)."""
    from .scoring import collect_moments

    slots = dict(pool="slots", slots=pm.slots) if pm.prompt_len else dict(pool="cls")
    return collect_moments(pm.backbone, pm.tokenizer, examples, positions=positions,
                           forward=lambda _m, batch: pm(**batch.inputs), progress=progress, max_length=max_length,
                           batch_size=batch_size, backend=backend, **slots)


def prune_run(run: str | Path, out: str | Path, *, keep: float = 0.02, layers: str = "top:0.75",
              criterion: str = "skill", fill: Optional[str] = None, flap_adaptive: bool = False, seed: int = 0,
              keep_massive: bool = False, moments: Optional[str | Path] = None, positions: str = "tokens",
              retune: bool = False, retune_epochs: Optional[float] = None, device=None, data: Optional[str] = None,
              progress: bool = True, overwrite: bool = False) -> dict:
    """Prune a tuned run's model to the neurons a criterion keeps, fold the others, and evaluate it
    (``skillkern prune``).

    Validate, then work, then publish: the arguments, the run, its scores and the output folder are checked
    before the model is loaded; the output is written to a temporary sibling folder and moved into place at the
    end, so an interrupted prune leaves the previous output or none, and can simply be run again.

    Every criterion keeps the same number of neurons in each pruned layer, ``int(keep * D)`` (a run scored on
    its ``pn``/``neu`` sub-tasks: twice that, as its skill selection does), and folds the others at the same
    fill values.

    Args:
        run: a tuned run folder; scored (``skillkern score --run``) for criterion ``skill`` and ``fill="prompt"``.
        out: output folder: ``out/model`` (the pruned model + tokenizer, loadable with
            ``skillkern.load_model(out/model)``), ``out/run.json`` + ``out/prompt.safetensors`` (a run on the
            pruned model, usable by score/perturb), ``out/prune.json`` (criterion, statistics, accuracies,
            widths, parameter counts) and, when moments were used, ``out/moments.safetensors``.
        keep: per-layer fraction q of neurons kept, in (0, 1].
        layers: which layers are pruned (see :func:`parse_layers`).
        criterion: ``skill`` (the run's predictivity), ``flap``, ``wanda``, ``magnitude`` (from the moments of the
            activations over the run's training rows: :func:`criterion_scores`) or ``random`` (seeded by
            ``seed``).
        fill: what the pruned neurons are frozen at: ``prompt`` (the paper's: the run's thresholds averaged over
            the prompt slots, :func:`skillkern.runs.prompt_thresholds`) or ``tokens`` (their mean activation over
            the moments' positions: sum / n). Default: ``prompt`` for ``skill``, ``tokens`` for the others (FLAP's
            bias compensation).
        flap_adaptive: criterion ``flap`` only: per-layer widths from FLAP's global ranking of standardised scores
            (:func:`flap_adaptive_counts`), with the same total.
        keep_massive: keep each pruned layer's massive-activation neurons first, then the criterion's best of the
            others (:func:`select_neurons`; reads the moments).
        moments: a moments file (``moments.safetensors`` of an earlier prune of the same run, same positions) to
            use instead of a pass over the training rows.
        positions: the moments' positions: ``tokens`` (every real position of the training rows, prompt
            positions included) or ``slots`` (the prompt slots).
        retune: re-tune the prompt (starting from the run's) on the pruned model; written to ``out/retuned``.
        overwrite: replace an earlier prune output in ``out`` (otherwise refused).
    """
    import time

    from .data import check_split_classes
    from .files import atomic_write_json, staged_dir
    from .runs import (load_run, load_run_task, prompt_digest, prompt_thresholds, read_prompt, run_predictivity,
                       run_splits, scored_names, skill_selection, write_run)
    from .tune import TuneSettings, evaluate

    out = Path(out)
    fill = fill or ("prompt" if criterion == "skill" else "tokens")
    info = _check_prune_job(run, out, keep=keep, fill=fill, criterion=criterion, flap_adaptive=flap_adaptive,
                            keep_massive=keep_massive, moments=moments, positions=positions,
                            retune_epochs=retune_epochs, data=data, overwrite=overwrite)
    needs_moments = uses_moments(criterion, fill, keep_massive)
    preds = run_predictivity(run) if criterion == "skill" else None
    scored = scored_names(run)
    shape = _scored_shape(run, scored)  # (L, D) from the scores' header, before the model loads (None: unscored)
    if shape is not None:
        chosen, k = _kept(layers, keep, *shape, scored)
    s = TuneSettings(**info["settings"])
    task = load_run_task(info, data)
    train, _dev, test = run_splits(task, s)
    check_split_classes(test, task.label_names, f"the test split of {run}")
    moments_meta = {"model": info["model"], "run_prompt_sha256": prompt_digest(run), "split": "train",
                    "rows": len(train), "max_length": s.max_length, "positions": positions}
    loaded = None
    if needs_moments and moments is not None:  # read (and checked against this run) before the model loads
        loaded, _ = NeuronMoments.load(moments, expect=moments_meta)
    values = prompt_thresholds(run) if fill == "prompt" else None  # (L, D): mean over the prompt slots
    pm, task, info = load_run(run, device=device, data=data, task=task)
    before = _ffn_widths(pm.backbone)
    if len(set(before)) != 1 or (shape is not None and shape != (len(before), before[0])):
        raise ValueError(f"--run {run}: its scores do not cover its model's FFN widths {before}; score the run "
                         "again")
    if shape is None:
        chosen, k = _kept(layers, keep, len(before), before[0], scored)
    loaded, values, stats_source = _statistics(run, pm, train, max_length=s.max_length, criterion=criterion,
                                               fill=fill, positions=positions, loaded=loaded, moments=moments,
                                               meta=moments_meta, preds=preds, values=values, progress=progress,
                                               keep_massive=keep_massive)
    selection = select_neurons(pm.backbone, criterion, {i: k for i in chosen}, moments=loaded,
                               skill=skill_selection(preds, keep) if preds is not None else None, seed=seed,
                               flap_adaptive=flap_adaptive, keep_massive=keep_massive)
    params_before = sum(p.numel() for p in pm.backbone.parameters())
    acc_before = evaluate(pm, test, 32, s.max_length)
    started = time.perf_counter()
    how = {"criterion": criterion, "flap_adaptive": flap_adaptive, "seed": seed if criterion == "random" else None,
           "keep_massive": keep_massive, "keep": keep, "layers": layers, "fill": fill}
    prune_model(pm.backbone, selection, values,
                info={"source_run": str(run), **how, "statistics": stats_source, "task": info["task"],
                      "subtask": info.get("subtask")})
    acc_after = evaluate(pm, test, 32, s.max_length)
    after = _ffn_widths(pm.backbone)
    final_model = str((out / "model").resolve())
    result = {
        "run": str(run), "task": info["task"], "subtask": info.get("subtask"), **how,
        "pruned_layers": chosen, "kept_per_layer": k, "statistics": stats_source, "test_rows": len(test),
        "test_accuracy_original": acc_before, "test_accuracy_pruned": acc_after, "widths": after,
        "ffn_neurons_before": sum(before), "ffn_neurons_after": sum(after),
        "params_before": params_before, "params_after": sum(p.numel() for p in pm.backbone.parameters()),
        "head": info["head_description"], "seconds": round(time.perf_counter() - started, 2),
    }
    state = read_prompt(run)
    with staged_dir(out) as tmp:
        save_pruned(pm.backbone, pm.tokenizer, tmp / "model")
        if loaded is not None:
            loaded.save(tmp / "moments.safetensors", dict(moments_meta, layers=len(before), width=before[0]))
        write_run(tmp, dict(info, model=final_model, test_accuracy=acc_after, pruned_from=str(run),
                            prompt=info.get("prompt", "tuned") + " (unchanged, on the pruned model)"), state)
        if retune:
            result.update(_retune(tmp, task, s, state, retune_epochs, final_model, device=device, progress=progress))
        atomic_write_json(tmp / "prune.json", result)
    return result


def _statistics(run, pm, train: Sequence, *, max_length: int, criterion: str, fill: str, positions: str,
                loaded: Optional[NeuronMoments], moments, meta: dict, preds: Optional[dict],
                values: Optional[torch.Tensor], progress: bool,
                keep_massive: bool = False) -> tuple[Optional[NeuronMoments], torch.Tensor, dict]:
    """The statistics a prune reads: the moments (``loaded`` from ``moments``, or one pass over the training rows
    when the criterion, the fill or ``keep_massive`` needs them), the (L, D) fill values (``values``: the prompt
    thresholds, or the moments' mean for fill ``tokens``) and the record of both for prune.json."""
    record: dict = {}
    if uses_moments(criterion, fill, keep_massive):
        if loaded is None:
            loaded = run_moments(pm, train, positions=positions, max_length=max_length, progress=progress)
            record["moments"] = {"computed_from": "train", **meta}
        else:
            record["moments"] = {"file": str(moments), **meta}
        record["moments"]["positions_count"] = loaded.positions()
        if fill == "tokens":
            values = loaded.mean().cpu()
    if criterion == "skill":
        record["predictivity"] = sorted(str(p) for p in _score_files(run, preds))
    if fill == "prompt":
        record["fill"] = "prompt thresholds (the run's task or pn scores)"
    return loaded, values, record


def _scored_shape(run, scored: set) -> Optional[tuple[int, int]]:
    """(layers, width) a run's scores record in their header (no tensor is read), or None for an unscored run."""
    import json

    from .files import safetensors_header
    from .runs import scores_path

    for name in sorted(scored):
        meta, shapes = safetensors_header(scores_path(run, None if name == "task" else name), what="stats file")
        settings = json.loads(meta.get("settings", "{}"))
        if isinstance(settings.get("layers"), int) and isinstance(settings.get("width"), int):
            return settings["layers"], settings["width"]
        if len(shapes.get("threshold", ())) == 3:
            return shapes["threshold"][0], shapes["threshold"][2]
    return None


def _kept(layers: str, keep: float, num_layers: int, width: int, scored: set) -> tuple[list[int], int]:
    """(the pruned layers, the neurons each keeps): ``int(keep * width)``, twice that for a run scored on its
    pn/neu sub-tasks (the union rule's size), for every criterion."""
    chosen = parse_layers(layers, num_layers)
    k = int(keep * width + 1e-9)
    if k == 0:
        raise ValueError(f"--keep {keep} keeps no neuron of the {width} in each layer; use --keep >= "
                         f"{math.ceil(1e4 / width) / 1e4:g} (one neuron per layer)")
    return chosen, min(2 * k, width) if {"pn", "neu"} <= scored else k


def _score_files(run, preds: dict) -> list[Path]:
    from .runs import scores_path

    return [scores_path(run, None if name == "task" else name) for name in preds]


def _check_prune_job(run, out: Path, *, keep: float, fill: str, criterion: str, flap_adaptive: bool,
                     keep_massive: bool, moments: Optional[str | Path], positions: str, retune_epochs: Optional[float],
                     data: Optional[str], overwrite: bool) -> dict:
    """Check the arguments, the run and the output folder of :func:`prune_run` before anything is loaded.
    Returns the run's run.json."""
    from .files import check_out_dir
    from .runs import check_run, run_predictivity, scored_names

    if criterion not in CRITERIA:
        raise ValueError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if fill not in ("prompt", "tokens"):
        raise ValueError(f"--fill must be 'prompt' or 'tokens', got {fill!r}")
    if flap_adaptive and criterion != "flap":
        raise ValueError(f"--flap-adaptive needs --criterion flap (FLAP's standardised global ranking), not "
                         f"{criterion}")
    if positions not in ("tokens", "slots"):
        raise ValueError(f"positions must be 'tokens' or 'slots', got {positions!r}")
    if moments is not None and not uses_moments(criterion, fill, keep_massive):
        raise ValueError(f"--moments: --criterion {criterion} with --fill {fill} uses no moments; drop it")
    if not (0 < keep <= 1):
        raise ValueError(f"--keep must be a fraction in (0, 1], got {keep}")
    if retune_epochs is not None and not (retune_epochs > 0 and math.isfinite(retune_epochs)):
        raise ValueError(f"--retune-epochs must be a positive number, got {retune_epochs}")
    info = check_run(run)
    if (criterion == "skill" or fill == "prompt") and not scored_names(run):
        run_predictivity(run)  # raises: the run has not been scored, named before anything loads
    inputs = [("run folder", run), ("data folder", data), ("task folder", info.get("task_source") or None)]
    if moments is not None:
        inputs.append(("moments file", moments))
    if Path(info["model"]).expanduser().exists():
        inputs.append(("model folder of the run", Path(info["model"]).expanduser()))
    check_out_dir(out, kind="pruned", overwrite=overwrite, inputs=inputs)
    return info


def _ffn_widths(model) -> list[int]:
    """The FFN width of every layer (computed once before and once after pruning)."""
    return [layer.width for layer in ffn_layers(model)]


def _retune(folder: Path, task, settings, state: dict, epochs: Optional[float], final_model: str, *, device,
            progress: bool) -> dict:
    """Re-tune the run's prompt, starting from ``state``, on the pruned model saved in ``folder/model``; the run
    goes to ``folder/retuned``. Returns the keys it adds to prune.json."""
    from .runs import tune_run
    from .tune import TuneSettings

    settings = TuneSettings(**{**settings.to_dict(), **({"epochs": epochs} if epochs else {})})
    info = tune_run(str(folder / "model"), task, settings, folder / "retuned", device=device, progress=progress,
                    init_state=state, label="re-tuned on the pruned model", record_model=final_model)
    return {"test_accuracy_pruned_retuned": info["test_accuracy"], "retune_epochs": settings.epochs}
