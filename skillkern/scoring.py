"""The streaming scorer: two passes of a frozen model over task data, statistics accumulated on the fly.

Two ways to read the neurons, same numbers up to float rounding:

* **hooks** (any backend, any pool): each FFN layer's neuron vector (the input of its down-projection) is read
  by a forward pre-hook, reduced to the tracked rows (``pool``), checked for NaN/Inf and added to a
  :class:`~skillkern.stats.NeuronStats` by the ``stats_update`` op.
* **fused** (``backend="triton"``, or ``"auto"`` when every layer is on a CUDA device and Triton imports; pools
  ``cls``, ``last`` and ``slots``): each layer's up-projection + activation is replaced, through the adapter
  table, by ONE ``ffn_stats`` call that also adds the tracked tokens' statistics in its epilogue; its ``h``
  flows on into the down-projection, so the model computes what it always does and a scoring pass is one FFN
  pass. Every token row goes in; rows of untracked tokens carry slot -1. Pools ``mean``/``max`` (they need all
  tokens), ``nonfinite="skip"`` (it must see every layer before adding a sample) and layers the kernel cannot
  compute (activation, gate bias, quantized or wrapped projections...) use the hooks, with the reason logged.

No activation outlives its batch, so memory is flat in the number of samples. A model split over devices
(``device_map``) keeps each layer's statistics on that layer's device (:class:`~skillkern.stats.ShardedNeuronStats`),
gathered on the CPU at the end.

Batch invariance: batches come from :func:`skillkern.batching.iter_batches`, whose padding rule makes a sample's
activations, and so the counts, independent of the batch size and of its neighbours.

:func:`score_task` is the whole ``skillkern score`` job (validate, score with checkpoints, publish the result
folder); :func:`score_and_publish` is its second half, shared with scoring a tuned run
(:func:`skillkern.runs.score_run`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .batching import Batch, check_positions, check_rows_differ, iter_batches, take
from .files import check_out_dir, staged_dir
from .models import (FusedFFNWeights, capture_neurons, ffn_layers, fused_ffn_weights, layer_device, model_id,
                     replace_neuron_computation)
from .ops import dispatch
from .ops.ffn_stats import ffn_stats
from .stats import NeuronMoments, NeuronStats, ShardedNeuronStats

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

POOLS = ("cls", "last", "mean", "max", "slots")
#: the positions a moments pass (:meth:`Scorer.moments`) adds: every real token position, or the tracked slots
MOMENT_POSITIONS = ("tokens", "slots")


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or Inf activations at tracked positions."""


@dataclass
class ScoreSettings:
    """How a scoring run reads the model.

    Attributes:
        pool: tracked positions: ``cls`` (first token), ``last`` (last non-padding token), ``mean`` / ``max``
            over the non-padding tokens, or ``slots`` (the positions listed in ``slots``).
        slots: positions tracked with ``pool="slots"`` (e.g. the prompt slots).
        max_length: truncation length in tokens.
        batch_size: samples per batch.
        pad_multiple: pad each sample to its length rounded up to this many tokens (batch invariance);
            0 pads each batch to its longest sample (faster to set up, not batch-invariant).
        backend: statistics op backend (``auto``, ``torch``, ``ext``, ``triton``). ``triton``, and ``auto`` when
            every layer is on a CUDA device and Triton imports, score through the fused FFN kernel where the pool
            and the model allow (see the module docstring); never on the CPU under ``auto``.
        which: ``neuron`` (input of the down-projection) or ``gate`` (``act(W_gate x)`` of gated MLPs).
    """

    pool: str = "cls"
    slots: Optional[tuple[int, ...]] = None
    max_length: int = 128
    batch_size: int = 32
    pad_multiple: int = 32
    backend: str = "auto"
    which: str = "neuron"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {POOLS}")
        if self.pool == "slots":
            if not self.slots:
                raise ValueError("pool='slots' needs a non-empty list of slot positions")
            self.slots = tuple(int(s) for s in self.slots)
            if min(self.slots) < 0:
                raise ValueError(f"slot positions must be >= 0, got {self.slots}")
        elif self.slots:
            raise ValueError(f"slots={self.slots} given but pool={self.pool!r}; use pool='slots'")
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pad_multiple < 0:
            raise ValueError(f"pad_multiple must be >= 0, got {self.pad_multiple}")

    @property
    def num_slots(self) -> int:
        return len(self.slots) if self.pool == "slots" else 1

    def to_dict(self) -> dict:
        return asdict(self)


def pool_rows(h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, settings: ScoreSettings
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce one layer's neurons to the tracked rows.

    Args:
        h: (B, T, D) neuron activations of one layer.
        mask: (B, T) attention mask (1 = real token).
        labels: (B,) class of each sample.

    Returns:
        rows (B * S, D), slot (B * S,) int64, label (B * S,) int64.
    """
    if h.dim() != 3:
        raise ValueError(f"expected neuron activations of shape (batch, tokens, neurons), got {tuple(h.shape)}")
    B, T, _ = h.shape
    pool = settings.pool
    if pool == "cls":
        rows = h[:, 0]
    elif pool == "last":
        # last real token, whichever side the padding is on
        positions = torch.arange(T, device=h.device).expand(B, T)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)
        rows = h[torch.arange(B, device=h.device), last]
    elif pool == "mean":
        m = mask.to(torch.float32).unsqueeze(-1)
        rows = (h.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1)
    elif pool == "max":
        rows = h.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)
    else:
        pos = torch.tensor(settings.slots, device=h.device)
        if int(pos.max()) >= T:
            raise ValueError(f"slot position {int(pos.max())} is beyond the sequence length {T}")
        S = pos.numel()
        rows = h[:, pos].reshape(B * S, -1)
        slot = torch.arange(S, device=h.device).repeat(B)
        return rows, slot, labels.repeat_interleave(S)
    return rows, torch.zeros(B, dtype=torch.long, device=h.device), labels


class Scorer:
    """Runs the two scoring passes of a model over examples.

    Args:
        model: a Hugging Face model whose architecture is in :data:`skillkern.models.ARCHITECTURES`. Its layers
            may sit on several devices (``device_map``): each layer's statistics then live on its device.
        tokenizer: its tokenizer (with a pad token).
        num_classes: number of classes of the task (None for a scorer that only collects moments).
        settings: :class:`ScoreSettings`.
        forward: optional ``forward(model, batch) -> None`` replacing ``model(**batch.inputs)`` (prompt tuning
            prepends soft-prompt embeddings this way).
        progress: show tqdm progress bars.
        nonfinite: ``raise`` (default) stops at the first NaN/Inf activation, naming the layer; ``skip`` drops
            every sample with a non-finite activation in any layer and counts it in :attr:`skipped`.

    Attributes:
        layer_devices: the device of each layer's down-projection weight (where its statistics are kept).
        device_groups: ``{device: [layer indices]}``; more than one entry means sharded statistics.
        path: ``"fused"`` or ``"hooks"``: how the last pass read the neurons.
    """

    def __init__(self, model, tokenizer, num_classes: Optional[int], settings: Optional[ScoreSettings] = None,
                 forward: Optional[Callable] = None, progress: bool = True, nonfinite: str = "raise"):
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ScoreSettings()
        self.layers = ffn_layers(model)
        widths = {layer.width for layer in self.layers}
        if len(widths) != 1:
            raise ValueError(f"layers have different FFN widths {sorted(widths)}; scoring needs one width")
        self.width = widths.pop()
        self.num_classes = num_classes
        self.forward = forward or (lambda m, batch: m(**batch.inputs))
        self.progress = progress
        self.nonfinite = nonfinite
        self.skipped = {"baseline": 0, "eval": 0}
        self.device = next(model.parameters()).device  # where batches go (the embeddings' device)
        self.layer_devices = [torch.device(layer_device(layer)) for layer in self.layers]
        self.device_groups: dict[torch.device, list[int]] = {}
        for index, device in enumerate(self.layer_devices):
            self.device_groups.setdefault(device, []).append(index)
        if len(self.device_groups) > 1:
            logger.info("layers on %d devices (%s): each layer's statistics stay on its device",
                        len(self.device_groups),
                        ", ".join(f"{d}: layers {v[0]}..{v[-1]}" for d, v in self.device_groups.items()))
        self.path: Optional[str] = None
        self.backends: dict[str, str] = {}  # {op: backend} that really ran, filled by score()

    def new_stats(self) -> "NeuronStats | ShardedNeuronStats":
        """Empty statistics: a :class:`NeuronStats` on the model's device, or, when the layers sit on several
        devices, a :class:`ShardedNeuronStats` with each layer's part on its device."""
        L, S = len(self.layers), self.settings.num_slots
        if self.num_classes is None:
            raise ValueError("this Scorer was built without num_classes: it collects moments only")
        if len(self.device_groups) > 1:
            return ShardedNeuronStats(L, S, self.width, self.num_classes, self.layer_devices)
        return NeuronStats(L, S, self.width, self.num_classes, self.layer_devices[0] if self.layers else self.device)

    # ------------------------------------------------------------------------------------------ fused path
    def fused_backend(self) -> Optional[str]:
        """``"triton"`` when the dispatch policy runs ``ffn_stats`` on Triton for every layer's device (an
        explicit ``triton``, or ``auto`` with every layer on a CUDA device), else None. An explicit backend
        that cannot run raises :class:`~skillkern.ops.dispatch.BackendUnavailable`."""
        chosen = {dispatch.resolve("ffn_stats", self.settings.backend, d) for d in self.layer_devices}
        return "triton" if chosen == {"triton"} else None

    def _fused_plan(self, positions: str = "slots") -> tuple[Optional[list[FusedFFNWeights]], str, bool]:
        """(per-layer weights, "") when the fused path applies, else (None, reason, model_side). ``positions``:
        ``tokens`` for a moments pass over every real token (one slot per token: always fused-capable)."""
        s = self.settings
        if self.fused_backend() is None:
            return None, f"backend {s.backend!r} does not use the fused kernel on {self.layer_devices[0]}", False
        if positions == "tokens":
            pass
        elif s.pool not in ("cls", "last", "slots"):
            return None, f"pool {s.pool!r} reduces over all tokens, the fused kernel takes one slot per token", False
        if s.pool == "slots" and len(set(s.slots)) != len(s.slots):
            return None, f"slot positions {s.slots} repeat, a token can have one slot only", False
        if self.nonfinite == "skip":
            return None, "nonfinite='skip' needs every layer's rows before adding a sample", False
        chunk = getattr(getattr(self.model, "config", None), "chunk_size_feed_forward", 0) or 0
        if chunk:
            return None, f"config.chunk_size_feed_forward={chunk}", True
        try:
            return [fused_ffn_weights(self.model, layer, s.which) for layer in self.layers], "", True
        except ValueError as err:
            return None, str(err), True

    def fused_path_reason(self) -> Optional[str]:
        """None when a pass with these settings runs through the fused kernel, else why it uses the hooks."""
        weights, reason, _ = self._fused_plan()
        return None if weights is not None else reason

    def _fused(self, stats, current: dict, weights: list[FusedFFNWeights], flags: list, positions: str = "slots"):
        """The context that scores through ``ffn_stats``: every layer's up-projection (+ activation) becomes one
        fused call over all B*T token rows (slot -1 for untracked tokens, the sample's label). A moments pass
        (``stats`` a :class:`NeuronMoments`) adds the moments of the tracked rows (``positions="tokens"``: every
        real token) and counts them at layer 0."""
        s = self.settings
        check = self.nonfinite == "raise"
        moments = isinstance(stats, NeuronMoments)

        def rows_info(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            cache = current.setdefault("rows", {})
            key = (device, rows)
            if key not in cache:
                batch = current["batch"]
                if positions == "tokens":
                    slot = token_positions(batch.attention_mask, rows)
                    label = batch.labels.repeat_interleave(rows // batch.labels.numel())
                else:
                    slot, label = token_slots(batch.attention_mask, batch.labels, rows, s)
                slot, label = slot.to(device), label.to(device)
                cache[key] = (slot, label, (slot >= 0).nonzero().flatten())
            return cache[key]

        def compute(index: int, x: torch.Tensor) -> torch.Tensor:
            w = weights[index]
            x2 = x.reshape(-1, x.shape[-1])
            slot, label, tracked = rows_info(x2.device, x2.shape[0])
            if moments:
                out, threshold, mode = stats.accumulator(index), None, "moments"
                if index == 0:
                    stats.count_positions(slot)
            else:
                out, threshold = stats.accumulator(index)
                mode = "sums" if threshold is None else "counts"
            h = ffn_stats(x2, w.w1, w.b1, act=w.act, w_gate=w.w_gate, slot=slot, label=label, out=out,
                          threshold=threshold, mode=mode, backend="triton")
            if check:
                flags.append((index, x2.shape[0], tracked, ~torch.isfinite(h.index_select(0, tracked)).all(dim=1)))
            return h.view(*x.shape[:-1], h.shape[-1])

        return replace_neuron_computation(self.model, compute, which=s.which)

    def _hooks(self, stats, current: dict, buffered: dict, desc: str, positions: str = "slots"):
        """The context that scores through hooks: each layer's neurons are pooled to the tracked rows, checked
        for NaN/Inf and added to ``stats`` (with ``nonfinite="skip"``, kept in ``buffered`` until every layer has
        run: a sample is dropped if any layer misbehaves). A moments pass counts the rows at layer 0;
        ``positions="tokens"``: every real token's row."""
        s = self.settings
        skip = self.nonfinite == "skip"
        moments = isinstance(stats, NeuronMoments)

        def on_device(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            """The batch's mask and labels on ``device`` (small; copied once per batch and device)."""
            moved = current.setdefault("moved", {})
            if device not in moved:
                batch = current["batch"]
                moved[device] = (batch.attention_mask.to(device), batch.labels.to(device))
            return moved[device]

        def on_layer(index: int, h: torch.Tensor) -> None:
            mask, labels = on_device(h.device)
            if positions == "tokens":
                rows, slot, label = token_rows(h, mask, labels)
            else:
                rows, slot, label = pool_rows(h, mask, labels, s)
            if moments and index == 0:
                stats.count_positions(slot)
            if skip:
                buffered[index] = (rows.clone(), slot, label)
                return
            if not bool(torch.isfinite(rows).all()):
                bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()[:5].tolist()
                raise NonFiniteActivationError(
                    f"layer {index}: NaN or Inf activations at tracked rows {bad} of the batch starting at "
                    f"example {current['start']} ({desc}); pass nonfinite='skip' (--skip-nonfinite) to drop "
                    f"such samples instead")
            stats.add_rows(index, rows, slot, label, backend=s.backend, check=False)

        return capture_neurons(self.model, on_layer, which=s.which)

    def _check_flags(self, flags: list, current: dict, desc: str) -> None:
        for index, rows, tracked, bad in flags:
            if bool(bad.any()):
                T = rows // current["batch"].labels.numel()
                samples = sorted({int(r) // T for r in tracked[bad].tolist()})[:5]
                raise NonFiniteActivationError(
                    f"layer {index}: NaN or Inf activations at tracked tokens of samples {samples} of the batch "
                    f"starting at example {current['start']} ({desc}); pass nonfinite='skip' (--skip-nonfinite) "
                    f"to drop such samples instead")
        flags.clear()

    # ------------------------------------------------------------------------------------------- passes
    def run_pass(self, stats: "NeuronStats | ShardedNeuronStats | NeuronMoments", examples: Sequence,
                 desc: str = "scoring", start: int = 0, on_chunk: Optional[Callable[[int], None]] = None,
                 positions: str = "slots") -> int:
        """Feed ``examples[start:]`` through the model, adding tracked rows to the current pass of ``stats``.

        Examples are consumed in chunks of ``batch_size``; after each chunk ``on_chunk(position)`` is called
        with the number of examples consumed so far (checkpoints hook in there). The neurons are read through
        the fused kernel when the settings and the model allow it (:meth:`fused_path_reason`), else by hooks.
        With a :class:`NeuronMoments` (a moments pass, :meth:`moments`) ``positions`` says which rows are
        added: ``tokens`` (every real token) or ``slots`` (the settings' tracked positions).

        Returns:
            the number of examples consumed (``len(examples)``).
        """
        from tqdm.auto import tqdm

        s = self.settings
        moments = isinstance(stats, NeuronMoments)
        if positions not in MOMENT_POSITIONS or (positions == "tokens" and not moments):
            raise ValueError(f"positions must be one of {MOMENT_POSITIONS} ('tokens' in a moments pass only), got "
                             f"{positions!r}")
        if moments and self.nonfinite == "skip":
            raise ValueError("a moments pass stops at NaN/Inf activations: nonfinite='skip' applies to scoring only")
        phase = "moments" if moments else ("eval" if stats.threshold is not None else "baseline")
        skip = self.nonfinite == "skip"
        current: dict = {}
        buffered: dict[int, tuple] = {}
        flags: list = []
        if not hasattr(examples, "__getitem__"):
            examples = list(examples)
        total = len(examples)
        if total == 0:
            raise ValueError(f"{desc}: the split is empty")
        if not 0 <= start <= total:
            raise ValueError(f"{desc}: cannot resume at example {start} of {total}")
        weights, reason, model_side = self._fused_plan(positions)
        if weights is not None:
            self.path = "fused"
            reading = self._fused(stats, current, weights, flags, positions)
            logger.debug("%s: fused FFN + statistics kernel (%d layers)", desc, len(weights))
        else:
            self.path = "hooks"
            reading = self._hooks(stats, current, buffered, desc, positions)
            if self.fused_backend() is not None:  # the fused kernel was asked for but cannot run here
                (logger.warning if model_side and s.backend == "triton" else logger.info)(
                    "%s: not using the fused FFN kernel (%s); reading neurons with hooks", desc, reason)
        bar = tqdm(total=total, initial=start, desc=desc, unit="ex", disable=not self.progress, leave=False)
        with torch.inference_mode(), reading:
            for chunk_start in range(start, total, s.batch_size):
                chunk = examples[chunk_start: chunk_start + s.batch_size]
                for batch in iter_batches(self.tokenizer, chunk, s.batch_size, s.max_length, s.pad_multiple,
                                          self.device):
                    current.clear()
                    current.update(batch=batch, start=chunk_start)
                    if not skip and not moments:
                        stats.count_rows(batch.labels)  # validates labels before any layer sees the batch
                    self.forward(self.model, batch)
                    if flags:
                        self._check_flags(flags, current, desc)
                    if skip:
                        self._add_buffered(stats, buffered, batch, phase)
                done = min(chunk_start + s.batch_size, total)
                bar.update(done - chunk_start)
                if on_chunk is not None:
                    on_chunk(done)
        bar.close()
        return total

    def _add_buffered(self, stats, buffered: dict, batch: Batch, phase: str) -> None:
        S = self.settings.num_slots
        good = torch.ones(batch.labels.numel(), dtype=torch.bool, device=batch.labels.device)
        for rows, _, _ in buffered.values():
            good &= torch.isfinite(rows).all(dim=1).view(-1, S).all(dim=1).to(good.device)
        n_bad = int((~good).sum())
        if n_bad:
            self.skipped[phase] += n_bad
            logger.warning("skipped %d sample(s) with NaN/Inf activations (%s pass)", n_bad, phase)
        stats.count_rows(batch.labels[good])
        keep = good.repeat_interleave(S)
        for index in sorted(buffered):
            rows, slot, label = buffered[index]
            keep_rows = keep.to(rows.device)
            stats.add_rows(index, rows[keep_rows], slot[keep_rows], label[keep_rows],
                           backend=self.settings.backend, check=False)
        buffered.clear()

    def score(self, baseline: Sequence, evaluation: Sequence, checkpoint: Optional["Checkpoint"] = None
              ) -> NeuronStats:
        """Both passes: thresholds from ``baseline``, counts on ``evaluation``. Returns the statistics.

        With a :class:`~skillkern.checkpoint.Checkpoint`, the state is saved atomically every few chunks and
        a run killed at any moment continues from its last checkpoint with bit-identical results. A model whose
        layers sit on several devices is scored into a :class:`ShardedNeuronStats` (each layer's statistics on
        its device, all-reduced per device with several processes) and the result is gathered on the CPU.
        """
        with dispatch.recording() as ran:
            try:
                return self._score(baseline, evaluation, checkpoint)
            finally:
                self.backends = dispatch.describe(ran)

    def _score(self, baseline: Sequence, evaluation: Sequence, checkpoint: Optional["Checkpoint"]) -> NeuronStats:
        stats = self.new_stats()
        parts = stats.parts if isinstance(stats, ShardedNeuronStats) else [stats]
        rank, world = _dist_rank_world()
        if world > 1:
            # Contiguous shards; counts are integers, so the all-reduced result equals one process's exactly.
            baseline, evaluation = _shard(baseline, rank, world), _shard(evaluation, rank, world)
        phase, position = "baseline", 0
        if checkpoint is not None:
            resumed = checkpoint.restore(stats)
            if resumed is not None:
                phase, position = resumed
                self.skipped.update(checkpoint.skipped)
                logger.info("resuming the %s pass at example %d", phase, position)
        if world > 1:
            _check_same_phase(phase, parts[0].sums.device)

        def saver(ph):
            if checkpoint is None:
                return None
            return lambda pos: checkpoint.maybe_save(stats, ph, pos, self.skipped)

        if phase == "baseline":
            if len(baseline) or world == 1:
                self.run_pass(stats, baseline, "baseline pass", start=position, on_chunk=saver("baseline"))
            if world > 1:
                for part in parts:
                    _all_reduce(part.sums, part.baseline_class_count)
            stats.finalize_thresholds()
            phase, position = "eval", 0
            if checkpoint is not None:  # the reduced thresholds are the point of no return: save them now
                checkpoint.save(stats, phase, position, self.skipped)
        if len(evaluation) or world == 1:
            self.run_pass(stats, evaluation, "evaluation pass", start=position, on_chunk=saver("eval"))
        if world > 1:
            for part in parts:
                _all_reduce(part.above, part.eval_class_count)
        if isinstance(stats, ShardedNeuronStats):
            return stats.gather("cpu")
        return stats

    # ------------------------------------------------------------------------------------------ moments
    def new_moments(self, positions: str = "tokens") -> NeuronMoments:
        """Empty moments on the model's device: one slot for ``positions="tokens"``, else the tracked slots."""
        if len(self.device_groups) > 1:
            raise ValueError("moments of a model split over several devices are not supported: load it on one "
                             "device")
        S = 1 if positions == "tokens" else self.settings.num_slots
        return NeuronMoments(len(self.layers), S, self.width, self.layer_devices[0])

    def moments(self, examples: Sequence, positions: str = "tokens",
                checkpoint: Optional["Checkpoint"] = None) -> NeuronMoments:
        """One pass over ``examples`` adding the float64 moments (sum, sum of squares, sum of |a|) of every
        neuron at ``positions``: ``tokens``, every real (non-padding) position the FFN sees, prompt positions
        included (one slot); or ``slots``, the settings' tracked positions (``pool`` cls/last/slots; one slot
        each). No labels are used; the pass runs through the fused kernel where scoring would.

        With a :class:`~skillkern.checkpoint.Checkpoint`, resumable as :meth:`score` (bit-identical with the
        ``ext`` or ``torch`` backend); under torchrun each process takes a contiguous shard of ``examples`` and
        the moments are all-reduced. Returns the moments (counts in :attr:`NeuronMoments.count`)."""
        if positions not in MOMENT_POSITIONS:
            raise ValueError(f"positions must be one of {MOMENT_POSITIONS}, got {positions!r}")
        if positions == "slots" and self.settings.pool not in ("cls", "last", "slots"):
            raise ValueError(f"positions='slots' needs one row per tracked position (pool cls, last or slots), not "
                             f"pool {self.settings.pool!r}")
        with dispatch.recording() as ran:
            try:
                moments = self.new_moments(positions)
                rank, world = _dist_rank_world()
                if world > 1:
                    examples = _shard(examples, rank, world)
                position = 0
                if checkpoint is not None:
                    resumed = checkpoint.restore(moments)
                    if resumed is not None:
                        phase, position = resumed
                        if phase != "moments":
                            raise ValueError(f"checkpoint {checkpoint.path} is of a {phase} pass, not a moments pass")
                        logger.info("resuming the moments pass at example %d", position)
                on_chunk = None if checkpoint is None else (
                    lambda pos: checkpoint.maybe_save(moments, "moments", pos, self.skipped))
                if len(examples) or world == 1:
                    self.run_pass(moments, examples, "moments pass", start=position, on_chunk=on_chunk,
                                  positions=positions)
                if world > 1:
                    _all_reduce(moments.moments, moments.count)
                return moments
            finally:
                self.backends = dispatch.describe(ran)


def token_positions(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Slot 0 for every real position of a batch whose B*T token rows are flattened, -1 for padding.

    Args:
        mask: (B, T0) attention mask (1 = real token). The FFN may see T >= T0 positions per sample: positions
            prepended inside ``forward`` (a soft prompt) are real and come first.
        rows: B*T, the number of token rows the FFN sees.

    Returns:
        (B*T,) int64 slots.
    """
    B, T0 = mask.shape
    if B == 0 or rows % B or rows // B < T0:
        raise ValueError(f"the FFN saw {rows} token rows for a batch of {B} samples of {T0} tokens")
    real = mask.bool()
    extra = rows // B - T0
    if extra:
        real = torch.cat([torch.ones(B, extra, dtype=torch.bool, device=mask.device), real], dim=1)
    return torch.where(real, 0, -1).reshape(-1).to(torch.int64)


def token_rows(h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of every real position of one layer's neurons (see :func:`token_positions`).

    Args:
        h: (B, T, D) neuron activations; mask: (B, T0) attention mask, T0 <= T; labels: (B,).

    Returns:
        rows (N, D), slot (N,) int64 zeros, label (N,) int64 (each row's sample label), N real positions.
    """
    B, T, _ = h.shape
    real = token_positions(mask, B * T).to(h.device) >= 0
    rows = h.reshape(B * T, -1)[real]
    label = labels.to(h.device).repeat_interleave(T)[real]
    return rows, torch.zeros(rows.shape[0], dtype=torch.int64, device=h.device), label


def token_slots(mask: torch.Tensor, labels: torch.Tensor, rows: int, settings: ScoreSettings
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token slot and label of a batch whose B*T token rows are flattened (the fused kernel's view).

    Args:
        mask: (B, T) attention mask (needed for ``pool="last"`` only).
        labels: (B,) class of each sample.
        rows: B*T, the number of token rows the FFN sees (T may exceed the mask's length when a prompt is
            prepended inside ``forward``; positions then count from the FFN's first token).

    Returns:
        slot (B*T,) int64: the tracked slot of each token row, -1 for untracked tokens; label (B*T,) int64.
        The tracked rows are those :func:`pool_rows` reads, for pools ``cls``, ``last`` and ``slots``.
    """
    B = labels.numel()
    if B == 0 or rows % B:
        raise ValueError(f"the FFN saw {rows} token rows for a batch of {B} samples")
    T = rows // B
    device = labels.device
    slot = torch.full((B, T), -1, dtype=torch.long, device=device)
    pool = settings.pool
    if pool == "cls":
        slot[:, 0] = 0
    elif pool == "last":
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"pool='last': the attention mask {tuple(mask.shape)} does not match the FFN's "
                             f"{B} x {T} tokens")
        positions = torch.arange(T, device=mask.device).expand(B, T)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1).to(device)
        slot[torch.arange(B, device=device), last] = 0
    elif pool == "slots":
        pos = torch.tensor(settings.slots, device=device)
        if int(pos.max()) >= T:
            raise ValueError(f"slot position {int(pos.max())} is beyond the sequence length {T}")
        slot[:, pos] = torch.arange(pos.numel(), device=device)
    else:
        raise ValueError(f"pool {pool!r} has no per-token slot (it reduces over tokens)")
    return slot.reshape(-1), labels.repeat_interleave(T)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(examples: Sequence, rank: int, world: int) -> Sequence:
    n = len(examples)
    return examples[rank * n // world: (rank + 1) * n // world]


def _all_reduce(*tensors: torch.Tensor) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _check_same_phase(phase: str, device: torch.device) -> None:
    import torch.distributed as dist

    mine = torch.tensor([0 if phase == "baseline" else 1], device=device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo) != int(hi):
        raise RuntimeError("resumed ranks are in different passes (one was killed between saving the reduced "
                           "thresholds and another rank doing so); delete the checkpoints and run again")


def collect_moments(model, tokenizer, examples: Sequence, *, positions: str = "tokens", forward=None,
                    progress: bool = False, checkpoint: Optional["Checkpoint"] = None, **settings) -> NeuronMoments:
    """The float64 moments of every FFN neuron of ``model`` over ``examples`` (functional form of
    :meth:`Scorer.moments`): the statistics of the pruning criteria (:mod:`skillkern.prune`).

    Args:
        examples: examples (``skillkern.data.Example`` or dicts with text/text_pair/label).
        positions: ``tokens`` (every real position, prompt positions included) or ``slots`` (the tracked
            positions of ``settings``).
        forward: optional ``forward(model, batch)`` replacing ``model(**batch.inputs)`` (a prompt model).
        **settings: fields of :class:`ScoreSettings` (max_length, batch_size, backend, pool, slots, ...).

    Returns:
        :class:`~skillkern.stats.NeuronMoments` of shape (L, S, D) (S = 1 for ``tokens``).
    """
    scorer = Scorer(model, tokenizer, None, ScoreSettings(**settings), forward=forward, progress=progress)
    return scorer.moments(examples, positions=positions, checkpoint=checkpoint)


def score(model, tokenizer, baseline: Sequence, evaluation: Sequence, num_classes: int, *,
          progress: bool = False, **settings) -> NeuronStats:
    """Score every FFN neuron of ``model`` for a task (functional form of :class:`Scorer`).

    Args:
        baseline: examples (``skillkern.data.Example`` or dicts with text/text_pair/label) giving thresholds.
        evaluation: examples on which accuracy is counted.
        num_classes: number of classes.
        **settings: fields of :class:`ScoreSettings` (pool, slots, max_length, batch_size, ...).

    Returns:
        :class:`NeuronStats` with thresholds (L, S, D) and counts (L, S, C, D).
    """
    scorer = Scorer(model, tokenizer, num_classes, ScoreSettings(**settings), progress=progress)
    return scorer.score(baseline, evaluation)


# --------------------------------------------------------------------------------------------------------------
# The scoring job: validate, score (with checkpoints, in one or several processes), publish
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Processes:
    """The processes of a scoring job: this one's ``rank`` among ``world`` (torchrun), and whether
    :func:`join_process_group` created the process group (then :meth:`leave` destroys it)."""

    rank: int = 0
    world: int = 1
    joined: bool = False

    def leave(self) -> None:
        """Wait for every process (barrier), then destroy the group if this job created it."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            if self.joined:
                dist.destroy_process_group()


def join_process_group(device=None) -> Processes:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU); one
    process (no ``WORLD_SIZE`` above 1) joins nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch.distributed as dist

    if dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), joined=False)
    use_cuda = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), joined=True)


def process_device(device, procs: Processes):
    """Where this process loads the model: ``device`` as given (None: :func:`skillkern.load_model`'s default,
    the CPU), except that under torchrun a CUDA device without an index becomes this process's GPU
    (``LOCAL_RANK``)."""
    if device is None or procs.world == 1:
        return device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", procs.rank)) % torch.cuda.device_count())
    return device


def split_rows(task, baseline_split: str, eval_split: str, max_baseline: Optional[int], max_eval: Optional[int],
               *, where: str, hint: str) -> tuple[list, list]:
    """The rows a scoring job reads: the first ``max_baseline`` rows of ``baseline_split`` and the first
    ``max_eval`` of ``eval_split`` (:func:`skillkern.batching.take`), checked before any model is loaded: the
    evaluation rows need two classes at least (predictivity is undefined otherwise; the error ends in ``hint``),
    baseline rows that lack a class are reported. ``where`` names the data in messages (task or run)."""
    from .data import check_split_classes

    baseline = take(task.split(baseline_split), max_baseline)
    evaluation = take(task.split(eval_split), max_eval)
    check_split_classes(evaluation, task.label_names, f"the evaluation split {eval_split!r} of {where}",
                        require_two=True, why="predictivity (how well a neuron separates classes) is undefined",
                        hint=hint)
    check_split_classes(baseline, task.label_names, f"the baseline split {baseline_split!r} of {where}")
    return baseline, evaluation


def score_metadata(scorer: Scorer, task, *, subtask: Optional[str], baseline_split: str, eval_split: str,
                   baseline_rows: int, eval_rows: int, split_seed: int, world_size: int = 1, **extra) -> dict:
    """The settings a score result records (the stats file's header, and the head of ``summary.json``): model,
    layers and width, task and labels, splits and their sizes, scoring settings, the backend each op really ran
    with and how the neurons were read (after :meth:`Scorer.score`); ``extra`` adds to or overrides them (a run's
    ``run``, ``pool``, ``prompt``, ``head``)."""
    from . import __version__

    meta = {
        "skillkern_version": __version__,
        "model": model_id(scorer.model),
        "model_type": scorer.model.config.model_type,
        "layers": len(scorer.layers),
        "width": scorer.width,
        "task": task.name,
        "task_source": task.source,
        "label_names": task.label_names,
        "subtask": subtask,
        "baseline_split": baseline_split,
        "eval_split": eval_split,
        "baseline_rows": baseline_rows,
        "eval_rows": eval_rows,
        "split_seed": split_seed,
        "settings": scorer.settings.to_dict(),
        "backends": scorer.backends,
        "neuron_path": scorer.path,
        "neuron": "input of the FFN down-projection" if scorer.settings.which == "neuron" else "act(W_gate x)",
        "world_size": world_size,
        "skipped_nonfinite": scorer.skipped,
    }
    meta.update(extra)
    return meta


def score_and_publish(scorer: Scorer, task, baseline: Sequence, evaluation: Sequence, out: str | Path, *,
                      splits: tuple[str, str], meta: dict, checkpoint: Optional["Checkpoint"] = None, top: int = 10,
                      title: str = "", procs: Processes = Processes()) -> tuple[NeuronStats, Optional[dict]]:
    """The second half of every scoring job: both passes, then the result folder ``out`` published as a whole.

    The folder holds ``stats.safetensors`` (header: :func:`score_metadata`, with ``meta``: ``subtask``,
    ``split_seed`` and any extra keys), ``summary.json`` and ``predictivity.png``
    (:func:`skillkern.stats.write_score_files`); it is built out of sight and replaces ``out`` (and the
    checkpoint in it) at the end, after every process has finished. The checkpoint is then removed.

    Args:
        baseline, evaluation: the rows of the two splits; ``splits``: their names.
        checkpoint: atomic checkpoints of both passes (:meth:`skillkern.checkpoint.Checkpoint.for_job`).

    Returns:
        ``(stats, summary)``; ``summary`` is None in processes of rank > 0 (they write nothing).
    """
    from .stats import write_score_files

    logger.info("scoring %s on %s: %d layers x %d neurons, baseline %s (%d rows), eval %s (%d rows)",
                model_id(scorer.model), task.name, len(scorer.layers), scorer.width,
                splits[0], len(baseline), splits[1], len(evaluation))
    started = time.perf_counter()
    stats = scorer.score(baseline, evaluation, checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    summary = None
    if procs.rank != 0:
        procs.leave()
    else:
        full = score_metadata(scorer, task, baseline_split=splits[0], eval_split=splits[1],
                              baseline_rows=len(baseline), eval_rows=len(evaluation), world_size=procs.world, **meta)
        extra = {"seconds": round(seconds, 3), "device": str(scorer.device),
                 "layer_devices": sorted({str(d) for d in scorer.layer_devices})}
        with staged_dir(out) as tmp:
            summary = write_score_files(tmp, stats, full, top=top, title=title, extra=extra)
            procs.leave()  # every process is done before the folder moves
    if checkpoint is not None:
        checkpoint.remove()
    return stats, summary


def _score_inputs(model: str, task, data: Optional[str]) -> list:
    """The inputs of ``score`` that its output folder must neither be nor contain."""
    from .data import DATA_ENV

    def existing(path) -> Optional[Path]:
        p = Path(path).expanduser() if path else None
        return p if p is not None and p.exists() else None

    if isinstance(task, (str, Path)):
        task_folder = existing(task)
    else:
        task_folder = existing(task.source) if task.source and not task.source.startswith("hub:") else None
    return [("data folder", existing(data) or existing(os.environ.get(DATA_ENV))), ("task folder", task_folder),
            ("model folder", existing(model))]


def score_task(model: str, task, out: str | Path, settings: Optional[ScoreSettings] = None, *,
               data: Optional[str] = None, subtask: Optional[str] = None, baseline_split: str = "train",
               eval_split: str = "dev", max_baseline: Optional[int] = None, max_eval: Optional[int] = None,
               seed: int = 0, device=None, device_map: Optional[str] = None, nonfinite: str = "raise",
               resume: bool = False, checkpoint_every: int = 50, top: int = 10, progress: bool = True,
               overwrite: bool = False) -> tuple[NeuronStats, Optional[dict]]:
    """Score every FFN neuron of ``model`` on a task and publish the result folder ``out`` (``skillkern score``).

    Validate, then work, then publish: ``out``, the model source and its positions, the data (classes of both
    splits) and, with ``resume``, the checkpoint are checked before the model is loaded; both passes save an
    atomic checkpoint in ``out`` every ``checkpoint_every`` batches; the result (:func:`score_and_publish`)
    replaces ``out`` as a whole at the end. Under torchrun each process scores a contiguous shard of both
    splits with its own checkpoint, and rank 0 writes the result.

    Args:
        model: ``minilm``, a hub id or a local folder (see :func:`skillkern.load_model`).
        task: a task name or folder (read with :func:`skillkern.load_task` from ``data``, split with ``seed``),
            or a loaded :class:`~skillkern.data.TaskData`.
        settings: how the model is read (pool, max_length, batch_size, pad_multiple, backend, which).
        subtask: score a binary sub-task (``pn``, ``neu``, ``ovr:C``, ``pair:A,B``).
        max_baseline, max_eval: the first N rows of the baseline / evaluation split.
        seed: seed of the 80/20 train/dev split of a task without a dev file.
        device: the model's device (None: :func:`skillkern.load_model`'s default, the CPU); ``device_map``
            instead splits a large model over GPUs (each layer's statistics stay on its GPU).
        nonfinite: ``raise`` or ``skip`` samples with NaN/Inf activations (see :class:`Scorer`).
        resume: continue from the checkpoint in ``out`` (the same job only).
        overwrite: replace an earlier score result in ``out`` (otherwise refused).

    Returns:
        ``(stats, summary)``: statistics of shape (L, S, C, D) and the content of ``summary.json``; ``summary`` is
        None in processes of rank > 0.
    """
    from .checkpoint import PARTIAL, Checkpoint
    from .data import binary_subtask, load_task
    from .models import check_model_source, load_model, resolved_model_id

    settings = settings or ScoreSettings()
    out = Path(out)
    check_out_dir(out, kind="scores", overwrite=overwrite, partial=PARTIAL,
                  inputs=_score_inputs(model, task, data))
    check_model_source(model)
    check_positions(model, 0, settings.max_length)
    procs = join_process_group(device)
    if isinstance(task, (str, Path)):
        task = load_task(task, data, seed=seed)
    if subtask:
        task = binary_subtask(task, subtask, seed=seed)
    baseline, evaluation = split_rows(task, baseline_split, eval_split, max_baseline, max_eval, where=task.name,
                                      hint="use more rows (--max-eval) or another split (--eval-split)")
    fingerprint = {"model": resolved_model_id(model), "task": task.name, "task_source": task.source,
                   "subtask": subtask, "baseline_split": baseline_split, "eval_split": eval_split,
                   "baseline_rows": len(baseline), "eval_rows": len(evaluation), "seed": seed,
                   "settings": settings.to_dict(), "world_size": procs.world, "rank": procs.rank}
    checkpoint = Checkpoint.for_job(out, fingerprint, rank=procs.rank, world=procs.world, every=checkpoint_every,
                                    resume=resume)
    if device_map is not None:
        net, tokenizer = load_model(model, device_map=device_map)
    else:
        net, tokenizer = load_model(model, device=process_device(device, procs))
    check_rows_differ(tokenizer, evaluation, settings.max_length, f"the evaluation split {eval_split!r}",
                      required=True, hint="raise --max-length")
    check_rows_differ(tokenizer, baseline, settings.max_length, f"the baseline split {baseline_split!r}",
                      required=False)
    scorer = Scorer(net, tokenizer, task.num_classes, settings, progress=progress and procs.rank == 0,
                    nonfinite=nonfinite)
    return score_and_publish(scorer, task, baseline, evaluation, out, splits=(baseline_split, eval_split),
                             meta={"subtask": subtask, "split_seed": seed}, checkpoint=checkpoint, top=top,
                             title=f"{task.name}: {model_id(net)} ({settings.pool})", procs=procs)
