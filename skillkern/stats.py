"""The streaming accumulators of a scoring run, predictivity, moments, neuron selection, and their files.

Two passes over data (METHOD.md section 4):

1. baseline split: per-(layer, slot, class, neuron) float64 sums -> ``threshold = sum / rows`` (the mean: METHOD.md's
   baseline(N, p), called the *threshold* everywhere in skillkern).
2. evaluation split: per-(layer, slot, class, neuron) int64 counts of ``activation > threshold``.

Nothing here grows with the number of rows: :class:`NeuronStats` holds ``2 * L * S * C * D`` numbers plus the
thresholds, and two of them merge by addition (batches, resumed jobs, processes). The class axis comes before the
neuron axis (``(L, S, C, D)``) so that a row of activations is added to one contiguous line of memory; the stats
file stores every tensor in the layout it has in memory.

The stats file
--------------
``stats.safetensors`` (written by :meth:`NeuronStats.save`, read by :meth:`NeuronStats.load`): safetensors whose
header metadata holds ``format = "skillkern-stats"``, ``format_version = "2"`` and ``settings`` (JSON: model,
layers, width, task, splits and their sizes, scoring settings; :func:`skillkern.scoring.score_metadata`). ``L``
layers, ``S`` tracked slots, ``C`` classes, ``D`` neurons per layer:

========================  =======  ============  ===================================================================
key                       dtype    shape         content
========================  =======  ============  ===================================================================
``sums``                  float64  (L, S, C, D)  per-class sums of activations over the baseline split's rows
``baseline_class_count``  int64    (C,)          rows of each class in the baseline split
``eval_class_count``      int64    (C,)          rows of each class in the evaluation split
``threshold``             float64  (L, S, D)     ``sums.sum(classes) / baseline rows``: the mean activation on the
                                                 baseline split (once the baseline pass is over)
``above``                 int64    (L, S, C, D)  per-class counts of ``activation > threshold`` on the evaluation
                                                 split (with ``threshold``)
``accuracy``              float32  (L, S, C, D)  one-vs-rest accuracy of ``activation > threshold <=> class c``
                                                 (:meth:`NeuronStats.accuracy`; when the evaluation split has rows)
``predictivity``          float32  (L, D)        Pred(N) (:meth:`NeuronStats.predictivity`; likewise)
``sign``                  int8     (L, D)        +1 excitatory, -1 inhibitory (:meth:`NeuronStats.sign`; likewise)
========================  =======  ============  ===================================================================

The first five are the accumulator's state (:meth:`NeuronStats.state_tensors`): a checkpoint of ``score --resume``
(:mod:`skillkern.checkpoint`) holds exactly those keys, in the same layouts. The last three are derived, for
readers of the file; loading does not read them.

Version 1 (skillkern 0.1.0) named ``threshold`` ``baseline`` and stored ``sums``, ``above`` and ``accuracy`` as
(L, S, D, C); :meth:`NeuronStats.load` reads such files and converts them.

Moments
-------
:class:`NeuronMoments` is the accumulator of the structured-pruning criteria (``skillkern prune --criterion``):
per layer, tracked slot and neuron, the float64 sum, sum of squares and sum of absolute values of the
activations over every position added (all real token positions of a split, or its tracked slots; no labels),
and per slot the number of positions. It merges by addition as :class:`NeuronStats` does, checkpoints
(:mod:`skillkern.checkpoint`) and all-reduces the same way.

**Rounding.** The sums are recursive float64 sums, in any order (row order on the CPU, atomics on a GPU, merged
batches, processes): each is within ``(n - 1) u`` times the sum of its terms' magnitudes of the exact sum
(``u = 2^-53``, ``n`` positions; the squares of float32/16/bfloat16 activations are exact in float64). The
sample variance is then computed in one pass, ``(sumsq - sum * sum / n) / (n - 1)``, which cancels: its error
against the exact variance is at most::

    |var - var_exact| <= (3 n + 5) u * sumsq / (n - 1)        (to first order in n u)

that is, relative to the variance, at most about ``3 n u (1 + mean^2 / var)`` (a worst case: rounding errors of
random sign make the typical error some ``sqrt(n)`` times smaller). A two-pass variance (the mean first, then the
squared deviations, from stored activations) is off by about ``n u`` relative at most, whatever the mean: the
one-pass form loses ``log10(1 + mean^2 / var)`` more digits. For FFN activations (mean and standard deviation of
the same order, ``mean^2 / var`` below 100) and 10^8 positions the bound is a relative error of 4e-6, far below
what changes a ranking; a neuron whose mean is 1000 standard deviations would keep no digit guaranteed at 10^8
positions (``tests/test_stats_moments.py`` checks the bound against exact rational arithmetic, from
well-conditioned neurons to a mean of 10^6 standard deviations, where the one-pass variance really loses 4 or more
digits that the two-pass one keeps).

The moments file
----------------
``moments.safetensors`` (written by :meth:`NeuronMoments.save`, read by :meth:`NeuronMoments.load`; the pruned
folder's record of the statistics its criterion used): safetensors whose header metadata holds
``format = "skillkern-moments"``, ``format_version = "1"`` and ``settings`` (JSON: model, layers, width, the run
and split, rows, positions). ``L`` layers, ``S`` slots (1 for all real token positions), ``D`` neurons:

============  =======  ============  ==========================================================================
key           dtype    shape         content
============  =======  ============  ==========================================================================
``moments``   float64  (L, S, 3, D)  ``[:, :, 0]`` sum of activations, ``[:, :, 1]`` sum of their squares,
                                     ``[:, :, 2]`` sum of their absolute values, per slot
``count``     int64    (S,)          positions added per slot (the same in every layer)
``mean``      float64  (L, D)        sum / n over all slots (n = ``count.sum()``): the fill value of ``prune``
``variance``  float64  (L, D)        one-pass sample variance over all slots (see Rounding; 0 below 2 positions)
``l2_norm``   float64  (L, D)        sqrt(sum of squares): a neuron's activation norm over the positions
``mean_abs``  float64  (L, D)        sum of absolute values / n
============  =======  ============  ==========================================================================

The first two are the accumulator's state (:meth:`NeuronMoments.state_tensors`, also the keys of its
checkpoints); the other four are derived, for readers, and are not read back.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from .files import FileFormatError, load_safetensors, save_safetensors
from .ops.stats_moments import MOMENTS, stats_moments
from .ops.stats_update import stats_update

logger = logging.getLogger(__name__)

#: the stats file's ``format_version`` (see the module docstring); version 1 is still read
FORMAT_VERSION = 2
#: the state tensors every stats file and checkpoint holds; ``threshold`` joins them once the baseline pass is over
STATE_KEYS = ("sums", "above", "baseline_class_count", "eval_class_count")
#: the moments file's ``format_version`` (see the module docstring)
MOMENTS_FORMAT_VERSION = 1
#: the state tensors of a moments file and of a moments pass's checkpoint
MOMENT_KEYS = ("moments", "count")


class StatsFileError(FileFormatError):
    """A stats file is unreadable (truncated, corrupt), is missing keys, has inconsistent shapes, or belongs to
    another model or task."""


class NeuronStats:
    """Streaming per-class statistics of every tracked neuron of a model.

    Shapes: ``L`` layers, ``S`` tracked slots (1 for cls/last/mean/max pooling, P for prompt slots),
    ``D`` neurons per layer, ``C`` classes.

    Attributes:
        sums: (L, S, C, D) float64 per-class sums of activations on the baseline split.
        baseline_class_count: (C,) int64 rows per class seen in the baseline pass.
        threshold: (L, S, D) float64 mean activation on the baseline split, set by :meth:`finalize_thresholds`.
        above: (L, S, C, D) int64 per-class counts of ``activation > threshold`` on the evaluation split.
        eval_class_count: (C,) int64 rows per class seen in the evaluation pass.
    """

    def __init__(self, num_layers: int, num_slots: int, width: int, num_classes: int,
                 device: torch.device | str = "cpu"):
        if num_classes < 2:
            raise ValueError(f"a task needs at least 2 classes, got {num_classes}")
        if min(num_layers, num_slots, width) < 1:
            raise ValueError(f"empty statistics: layers={num_layers}, slots={num_slots}, width={width}")
        self.num_layers, self.num_slots, self.width, self.num_classes = num_layers, num_slots, width, num_classes
        shape = (num_layers, num_slots, num_classes, width)
        self.sums = torch.zeros(shape, dtype=torch.float64, device=device)
        self.above = torch.zeros(shape, dtype=torch.int64, device=device)
        self.baseline_class_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.eval_class_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.threshold: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------------------------------- accumulate
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, S, C, D): layers, slots, classes, neurons: the shape of ``sums`` and ``above``."""
        return self.num_layers, self.num_slots, self.num_classes, self.width

    def add_rows(self, layer: int, h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor,
                 backend: str = "auto", check: bool = True) -> None:
        """Add one batch of rows of one layer to the current pass.

        Before :meth:`finalize_thresholds` the rows go into the baseline sums, afterwards into the counts.

        Args:
            layer: layer index in ``[0, L)``.
            h: (R, D) activation rows.
            slot: (R,) int64 tracked slot of each row (-1: skip).
            label: (R,) int64 class of each row.
        """
        out, threshold = self.accumulator(layer)
        stats_update(h, slot, label, out, threshold, backend=backend, check=check)

    def accumulator(self, layer: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The current pass's state of ``layer``, to be updated in place (by ``stats_update`` or ``ffn_stats``).

        Returns:
            before :meth:`finalize_thresholds`: ``(sums[layer], None)``, (S, C, D) float64;
            after it: ``(above[layer], threshold[layer])``, (S, C, D) int64 and (S, D) float64.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        if self.threshold is None:
            return self.sums[layer], None
        return self.above[layer], self.threshold[layer]

    def count_rows(self, label: torch.Tensor) -> None:
        """Count one batch of samples (once per batch, not per layer). label: (B,) int64."""
        counts = self.eval_class_count if self.threshold is not None else self.baseline_class_count
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            bad = int(label.min()) if int(label.min()) < 0 else int(label.max())
            raise ValueError(f"label {bad} out of range [0, {self.num_classes})")
        counts += torch.bincount(label.to(counts.device), minlength=self.num_classes)

    def finalize_thresholds(self) -> torch.Tensor:
        """End the baseline pass: thresholds = mean activation over all rows of the baseline split. Returns
        (L, S, D)."""
        rows = int(self.baseline_class_count.sum())
        if rows == 0:
            raise ValueError("the baseline split produced no rows: cannot compute thresholds")
        self.threshold = self.sums.sum(dim=2) / rows
        return self.threshold

    # -------------------------------------------------------------------------------------------- merge
    def _check_compatible(self, other: "NeuronStats") -> None:
        if self.shape != other.shape:
            raise ValueError(f"cannot merge statistics of shape {self.shape} and {other.shape}")
        if (self.threshold is None) != (other.threshold is None):
            raise ValueError("cannot merge statistics from different passes (one has thresholds, one has not)")
        if self.threshold is not None and not torch.equal(self.threshold, other.threshold):
            raise ValueError("cannot merge evaluation counts taken against different thresholds")

    def merge_(self, other: "NeuronStats") -> "NeuronStats":
        """Add ``other`` into ``self`` (exact for counts; float64 addition for sums)."""
        self._check_compatible(other)
        self.sums += other.sums.to(self.sums.device)
        self.above += other.above.to(self.above.device)
        self.baseline_class_count += other.baseline_class_count.to(self.baseline_class_count.device)
        self.eval_class_count += other.eval_class_count.to(self.eval_class_count.device)
        return self

    def __add__(self, other: "NeuronStats") -> "NeuronStats":
        return self.clone().merge_(other)

    def clone(self) -> "NeuronStats":
        new = NeuronStats.__new__(NeuronStats)
        new.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
        return new

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulator's state, for the stats file, checkpoints and all-reduce: ``sums``, ``above``, the two
        class counts and, once the baseline pass is over, ``threshold`` (the layouts of the module docstring)."""
        state = {"sums": self.sums, "above": self.above, "baseline_class_count": self.baseline_class_count,
                 "eval_class_count": self.eval_class_count}
        if self.threshold is not None:
            state["threshold"] = self.threshold
        return state

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor (``threshold`` too, which is there once the baseline pass is over)."""
        L, S, C, D = self.shape
        return {"sums": (L, S, C, D), "above": (L, S, C, D), "baseline_class_count": (C,),
                "eval_class_count": (C,), "threshold": (L, S, D)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`: copy ``sums``, ``above``, the class counts and, when present,
        ``threshold`` ((L, S, C, D) / (L, S, D) layouts, any device) into this object."""
        for key in ("sums", "above", "baseline_class_count", "eval_class_count"):
            getattr(self, key).copy_(tensors[key])
        if "threshold" in tensors:
            self.threshold = tensors["threshold"].to(device=self.sums.device, dtype=torch.float64)

    # ----------------------------------------------------------------------------------- predictivity
    def _require_eval(self) -> torch.Tensor:
        if self.threshold is None:
            raise ValueError("no thresholds yet: run the baseline pass and finalize_thresholds() first")
        n = self.eval_class_count
        if int(n.sum()) == 0:
            raise ValueError("the evaluation split produced no rows: no accuracy to compute")
        return n

    def accuracy(self) -> torch.Tensor:
        """Per-neuron one-vs-rest accuracy of the rule ``activation > threshold  <=>  class c``.

        Returns:
            (L, S, C, D) float64: ``Acc[:, :, c] = (above_c + sum_{c' != c} (n_c' - above_c')) / N``.
            For a binary task, ``[:, :, 1]`` is METHOD.md's Acc(N, p) and ``[:, :, 0] = 1 - [:, :, 1]``.
        """
        n = self._require_eval().to(torch.float64)
        above = self.above.to(torch.float64)                     # (L, S, C, D)
        below = n.view(1, 1, -1, 1) - above                      # rows of class c at or under threshold
        correct = above + (below.sum(dim=2, keepdim=True) - below)
        return correct / n.sum()

    def slot_predictivity(self) -> torch.Tensor:
        """(L, S, C, D) float64 ``max(Acc, 1 - Acc)`` per slot and one-vs-rest class."""
        acc = self.accuracy()
        return torch.maximum(acc, 1.0 - acc)

    def predictivity(self) -> torch.Tensor:
        """Neuron predictivity Pred(N): max over slots (and over classes, one-vs-rest, when C > 2).

        Returns:
            (L, D) float64.
        """
        pred = self.slot_predictivity()                          # (L, S, C, D)
        pred = pred[:, :, 1] if self.num_classes == 2 else pred.amax(dim=2)
        return pred.amax(dim=1)

    def sign(self) -> torch.Tensor:
        """(L, D) int8: +1 if the neuron fires above threshold for the positive class (excitatory), -1 if
        it is inhibitory (Acc < 0.5 at its most predictive slot). Binary tasks; for C > 2 the class-c rule
        of the most predictive (slot, class) pair."""
        acc = self.accuracy()                                    # (L, S, C, D)
        if self.num_classes == 2:
            acc = acc[:, :, 1]
        else:
            best_class = torch.maximum(acc, 1 - acc).argmax(dim=2, keepdim=True)
            acc = acc.gather(2, best_class).squeeze(2)
        best_slot = torch.maximum(acc, 1 - acc).argmax(dim=1, keepdim=True)
        best = acc.gather(1, best_slot).squeeze(1)
        return torch.where(best >= 0.5, 1, -1).to(torch.int8)

    # ------------------------------------------------------------------------------------------- files
    def to_file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the stats file, on the CPU: the state (:meth:`state_tensors`) and, when the evaluation
        split has rows, ``accuracy``, ``predictivity`` and ``sign`` (the module docstring lists them)."""
        out = {key: value.cpu() for key, value in self.state_tensors().items()}
        if self.threshold is not None and int(self.eval_class_count.sum()) > 0:
            out["accuracy"] = self.accuracy().to(torch.float32).cpu()
            out["predictivity"] = self.predictivity().to(torch.float32).cpu()
            out["sign"] = self.sign().cpu()
        return out

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        """Write ``path`` (safetensors) atomically (temporary file, fsync, rename: a reader sees the old file or the
        new one, never half of one); ``metadata`` (JSON-serialisable) goes into its header."""
        meta = {"format": "skillkern-stats", "format_version": str(FORMAT_VERSION),
                "settings": json.dumps(metadata or {}, sort_keys=True)}
        save_safetensors(path, self.to_file_tensors(), meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu",
             expect: Optional[dict] = None) -> tuple["NeuronStats", dict]:
        """Read a stats file written by :meth:`save` (format version 2, or 1, converted). Returns
        ``(stats, settings)``.

        ``expect``: settings the file must have (e.g. ``{"model": ..., "task": ...}``); a file that belongs to
        another model or task raises :class:`StatsFileError` naming the difference. A missing file raises
        FileNotFoundError, a truncated or corrupt one :class:`StatsFileError`, both naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stats file not found: {path}")
        try:
            tensors, meta = load_safetensors(path, what="stats file", keys=STATE_KEYS + ("threshold", "baseline"),
                                             hint="score again to rewrite it (with --overwrite)")
        except FileFormatError as err:
            raise StatsFileError(str(err).replace("is not a readable safetensors file",
                                                  "is not a readable safetensors stats file")) from err.__cause__
        if meta.get("format") != "skillkern-stats":
            raise StatsFileError(f"{path} is not a skillkern stats file (metadata format={meta.get('format')!r})")
        version = meta.get("format_version", "1")
        if version == "1":
            tensors = _from_version_1(path, tensors)
        elif version != str(FORMAT_VERSION):
            raise StatsFileError(f"{path} has stats format version {version}, which this skillkern (format "
                                 f"{FORMAT_VERSION}) cannot read; upgrade skillkern or score again")
        L, S, C, D = _state_shape(path, tensors)
        stats = cls(L, S, D, C, device=device)
        stats.load_state({key: tensors[key] for key in STATE_KEYS + ("threshold",) if key in tensors})
        settings = _header_settings(path, meta)
        for key, want in (expect or {}).items():
            if settings.get(key) != want:
                raise StatsFileError(f"{path} belongs to {key}={settings.get(key)!r}, not {want!r}")
        return stats, settings


def _from_version_1(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a version-1 stats file in version 2's keys and layouts: ``baseline`` -> ``threshold``;
    ``sums`` and ``above`` (L, S, D, C) -> (L, S, C, D); a file written before its baseline pass ended (no
    ``baseline``) gets a zero ``above``. (The derived tensors are not read.)"""
    out = dict(tensors)
    if "baseline" in out:
        out["threshold"] = out.pop("baseline")
        if "above" not in out:
            raise StatsFileError(f"{path}: version-1 stats file with 'baseline' but no 'above'")
    for key in ("sums", "above"):
        if key in out:
            if out[key].dim() != 4:
                raise StatsFileError(f"{path}: {key!r} has shape {tuple(out[key].shape)}, expected 4 dimensions")
            out[key] = out[key].permute(0, 1, 3, 2).contiguous()
    if "sums" in out and "above" not in out:
        out["above"] = torch.zeros(out["sums"].shape, dtype=torch.int64)
    return out


def _state_shape(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(L, S, C, D) of a stats file's state tensors, after checking that they are all there and agree."""
    for key in STATE_KEYS:
        if key not in tensors:
            raise StatsFileError(f"{path} lacks the tensor {key!r}")
    if tensors["sums"].dim() != 4:
        raise StatsFileError(f"{path}: 'sums' has shape {tuple(tensors['sums'].shape)}, expected 4 dimensions")
    L, S, C, D = tensors["sums"].shape
    expected = {"above": (L, S, C, D), "baseline_class_count": (C,), "eval_class_count": (C,)}
    if "threshold" in tensors:
        expected["threshold"] = (L, S, D)
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise StatsFileError(f"{path}: {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")
    return L, S, C, D


def _header_settings(path: Path, meta: dict) -> dict:
    try:
        settings = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError:
        raise StatsFileError(f"{path}: the settings in its header are not valid JSON (corrupt file); score again "
                             "to rewrite it") from None
    if not isinstance(settings, dict):
        raise StatsFileError(f"{path}: the settings in its header are not a JSON object (corrupt file)")
    return settings


class NeuronMoments:
    """Streaming float64 moments of every neuron of a model: the statistics of the pruning criteria.

    Shapes: ``L`` layers, ``S`` slots (1 for all real token positions; the tracked slots otherwise), ``D``
    neurons per layer. Positions are added without labels; two accumulators merge by addition.

    Attributes:
        moments: (L, S, 3, D) float64: sum, sum of squares and sum of absolute values of the activations added
            (the moment axis is :data:`skillkern.ops.stats_moments.MOMENTS`).
        count: (S,) int64 positions added per slot (counted once per batch: :meth:`count_positions`).
    """

    def __init__(self, num_layers: int, num_slots: int, width: int, device: torch.device | str = "cpu"):
        if min(num_layers, num_slots, width) < 1:
            raise ValueError(f"empty moments: layers={num_layers}, slots={num_slots}, width={width}")
        self.num_layers, self.num_slots, self.width = num_layers, num_slots, width
        self.moments = torch.zeros((num_layers, num_slots, len(MOMENTS), width), dtype=torch.float64, device=device)
        self.count = torch.zeros(num_slots, dtype=torch.int64, device=device)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, S, D): layers, slots, neurons."""
        return self.num_layers, self.num_slots, self.width

    # ----------------------------------------------------------------------------------------- accumulate
    def add_rows(self, layer: int, h: torch.Tensor, slot: torch.Tensor, label: Optional[torch.Tensor] = None,
                 backend: str = "auto", check: bool = True) -> None:
        """Add one batch of rows of one layer (``stats_moments``); ``label`` is ignored (the signature of
        :meth:`NeuronStats.add_rows`). The positions are counted once per batch by :meth:`count_positions`.

        Args:
            layer: layer index in ``[0, L)``.
            h: (R, D) activation rows.
            slot: (R,) int64 slot of each row (-1: skip).
        """
        stats_moments(h, slot, self.accumulator(layer), backend=backend, check=check)

    def accumulator(self, layer: int) -> torch.Tensor:
        """(S, 3, D) float64 moments of ``layer``, to be updated in place (``stats_moments`` or ``ffn_stats``)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        return self.moments[layer]

    def count_positions(self, slot: torch.Tensor) -> None:
        """Count one batch's positions (once per batch, not per layer). slot: (R,) int64, -1 for skipped rows."""
        slot = slot.to(self.count.device)
        tracked = slot[slot >= 0]
        if tracked.numel() and int(tracked.max()) >= self.num_slots:
            raise ValueError(f"slot {int(tracked.max())} out of range for {self.num_slots} slots")
        self.count += torch.bincount(tracked, minlength=self.num_slots)

    # -------------------------------------------------------------------------------------------- merge
    def merge_(self, other: "NeuronMoments") -> "NeuronMoments":
        """Add ``other`` into ``self`` (float64 addition; counts exact)."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge moments of shape {self.shape} and {other.shape}")
        self.moments += other.moments.to(self.moments.device)
        self.count += other.count.to(self.count.device)
        return self

    def __add__(self, other: "NeuronMoments") -> "NeuronMoments":
        return self.clone().merge_(other)

    def clone(self) -> "NeuronMoments":
        new = NeuronMoments.__new__(NeuronMoments)
        new.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
        return new

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulator's state (:data:`MOMENT_KEYS`), for the moments file, checkpoints and all-reduce."""
        return {"moments": self.moments, "count": self.count}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor."""
        L, S, D = self.shape
        return {"moments": (L, S, len(MOMENTS), D), "count": (S,)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (any device)."""
        self.moments.copy_(tensors["moments"])
        self.count.copy_(tensors["count"])

    # ------------------------------------------------------------------------------------------- derived
    def positions(self) -> int:
        """n: the positions added, over all slots."""
        return int(self.count.sum())

    def totals(self) -> torch.Tensor:
        """(L, 3, D) float64 moments summed over the slots."""
        return self.moments.sum(dim=1)

    def _require(self, at_least: int) -> int:
        n = self.positions()
        if n < at_least:
            raise ValueError(f"the moments hold {n} position(s); this statistic needs at least {at_least}")
        return n

    def mean(self) -> torch.Tensor:
        """(L, D) float64 mean activation over every position added (all slots): sum / n."""
        n = self._require(1)
        return self.totals()[:, 0] / n

    def variance(self) -> torch.Tensor:
        """(L, D) float64 sample variance (n - 1 in the denominator) over every position added, computed in one
        pass from the sums, ``(sumsq - sum^2 / n) / (n - 1)``, clamped at 0; its rounding error is bounded in
        the module docstring."""
        n = self._require(2)
        t = self.totals()
        return ((t[:, 1] - t[:, 0] * (t[:, 0] / n)) / (n - 1)).clamp(min=0.0)

    def l2_norm(self) -> torch.Tensor:
        """(L, D) float64 L2 norm of each neuron's activations over the positions: sqrt(sum of squares)."""
        self._require(1)
        return self.totals()[:, 1].sqrt()

    def mean_abs(self) -> torch.Tensor:
        """(L, D) float64 mean magnitude |a| over the positions."""
        n = self._require(1)
        return self.totals()[:, 2] / n

    # ------------------------------------------------------------------------------------------- files
    def to_file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the moments file, on the CPU: the state and, with positions, the derived statistics."""
        out = {key: value.cpu() for key, value in self.state_tensors().items()}
        n = self.positions()
        if n:
            out.update(mean=self.mean().cpu(), l2_norm=self.l2_norm().cpu(), mean_abs=self.mean_abs().cpu(),
                       variance=(self.variance() if n > 1 else torch.zeros(self.num_layers, self.width,
                                                                          dtype=torch.float64)).cpu())
        return out

    def save(self, path: str | Path, metadata: Optional[dict] = None) -> None:
        """Write the moments file ``path`` atomically; ``metadata`` (JSON-serialisable) goes into its header."""
        meta = {"format": "skillkern-moments", "format_version": str(MOMENTS_FORMAT_VERSION),
                "settings": json.dumps(metadata or {}, sort_keys=True)}
        save_safetensors(path, self.to_file_tensors(), meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu",
             expect: Optional[dict] = None) -> tuple["NeuronMoments", dict]:
        """Read a moments file written by :meth:`save`. Returns ``(moments, settings)``.

        ``expect``: settings the file must have; a file of another model, run or split raises
        :class:`StatsFileError` naming the difference, as a missing (FileNotFoundError), truncated or corrupt
        one does, naming the file.
        """
        path = Path(path)
        hint = "compute the moments again (prune without --moments)"
        try:
            tensors, meta = load_safetensors(path, what="moments file", keys=MOMENT_KEYS, hint=hint)
        except FileFormatError as err:
            raise StatsFileError(str(err)) from err.__cause__
        if meta.get("format") != "skillkern-moments":
            raise StatsFileError(f"{path} is not a skillkern moments file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != str(MOMENTS_FORMAT_VERSION):
            raise StatsFileError(f"{path} has moments format version {meta.get('format_version')}, which this "
                                 f"skillkern (version {MOMENTS_FORMAT_VERSION}) cannot read; {hint}")
        for key in MOMENT_KEYS:
            if key not in tensors:
                raise StatsFileError(f"{path} lacks the tensor {key!r}")
        moments, count = tensors["moments"], tensors["count"]
        if moments.dim() != 4 or moments.shape[2] != len(MOMENTS) or tuple(count.shape) != (moments.shape[1],):
            raise StatsFileError(f"{path}: 'moments' {tuple(moments.shape)} and 'count' {tuple(count.shape)} do not "
                                 "have the shapes (L, S, 3, D) and (S,)")
        if moments.dtype != torch.float64 or count.dtype != torch.int64:
            raise StatsFileError(f"{path}: 'moments' must be float64 and 'count' int64, got {moments.dtype} and "
                                 f"{count.dtype}")
        L, S, _, D = moments.shape
        out = cls(L, S, D, device=device)
        out.load_state(tensors)
        settings = _header_settings(path, meta)
        for key, want in (expect or {}).items():
            if settings.get(key) != want:
                raise StatsFileError(f"{path} belongs to {key}={settings.get(key)!r}, not {want!r}")
        return out, settings


class ShardedNeuronStats:
    """:class:`NeuronStats` split by layer over devices, for models whose layers live on several devices
    (``device_map="auto"``): layer ``l``'s statistics are allocated, and updated, on ``layer_devices[l]``, so
    no activation crosses a device.

    One :class:`NeuronStats` per distinct device (:attr:`parts`, in order of first appearance) holds that
    device's layers in increasing order (:attr:`groups`); every part counts the class of every sample. It has
    the accumulating API of :class:`NeuronStats` (``add_rows``, ``accumulator``, ``count_rows``,
    ``finalize_thresholds``, ``threshold``, ``shape``, ``state_tensors``, ``load_state``); :meth:`gather` merges it
    into one :class:`NeuronStats` (on the CPU by default) for everything else. The per-layer numbers are those of
    a single-device run exactly: the same op adds the same rows.

    Args:
        layer_devices: the device of each of the ``num_layers`` layers.
    """

    def __init__(self, num_layers: int, num_slots: int, width: int, num_classes: int,
                 layer_devices: Sequence[torch.device | str]):
        devices = [torch.device(d) for d in layer_devices]
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} layer devices given for {num_layers} layers")
        self.num_layers, self.num_slots, self.width, self.num_classes = num_layers, num_slots, width, num_classes
        by_device: dict[torch.device, list[int]] = {}
        for layer, device in enumerate(devices):
            by_device.setdefault(device, []).append(layer)
        #: (device, layer indices held there), in order of first appearance
        self.groups: list[tuple[torch.device, list[int]]] = list(by_device.items())
        self.parts = [NeuronStats(len(layers), num_slots, width, num_classes, device)
                      for device, layers in self.groups]
        self._where = [(0, 0)] * num_layers
        for part, (_, layers) in enumerate(self.groups):
            for local, layer in enumerate(layers):
                self._where[layer] = (part, local)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, S, C, D): layers, slots, classes, neurons: the shape of ``sums`` and ``above``."""
        return self.num_layers, self.num_slots, self.num_classes, self.width

    @property
    def layer_devices(self) -> list[torch.device]:
        """The device holding each layer's statistics."""
        return [self.groups[part][0] for part, _ in self._where]

    def _part(self, layer: int) -> tuple[NeuronStats, int]:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        part, local = self._where[layer]
        return self.parts[part], local

    def add_rows(self, layer: int, h: torch.Tensor, slot: torch.Tensor, label: torch.Tensor,
                 backend: str = "auto", check: bool = True) -> None:
        """:meth:`NeuronStats.add_rows` on the device of ``layer``. h: (R, D); slot, label: (R,) int64, all on
        that device."""
        part, local = self._part(layer)
        part.add_rows(local, h, slot, label, backend=backend, check=check)

    def accumulator(self, layer: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`NeuronStats.accumulator` of ``layer``, on its device: (S, C, D) state and (S, D) thresholds."""
        part, local = self._part(layer)
        return part.accumulator(local)

    def count_rows(self, label: torch.Tensor) -> None:
        """Count one batch of samples in every part. label: (B,) int64."""
        for part in self.parts:
            part.count_rows(label)

    def finalize_thresholds(self) -> torch.Tensor:
        """Thresholds of every part; returns the (L, S, D) thresholds gathered on the CPU."""
        for part in self.parts:
            part.finalize_thresholds()
        return self.threshold

    def _gather_key(self, key: str, device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
        tensors = [getattr(part, key) for part in self.parts]
        if tensors[0] is None:
            return None
        out = torch.empty((self.num_layers, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=device)
        for (_, layers), t in zip(self.groups, tensors):
            out[torch.tensor(layers, device=device)] = t.to(device)
        return out

    @property
    def threshold(self) -> Optional[torch.Tensor]:
        """(L, S, D) float64 thresholds gathered on the CPU (a copy), or None before :meth:`finalize_thresholds`."""
        return self._gather_key("threshold")

    @property
    def sums(self) -> torch.Tensor:
        """(L, S, C, D) float64 baseline sums gathered on the CPU (a copy: update through :meth:`add_rows`)."""
        return self._gather_key("sums")

    @property
    def above(self) -> torch.Tensor:
        """(L, S, C, D) int64 counts gathered on the CPU (a copy)."""
        return self._gather_key("above")

    @property
    def baseline_class_count(self) -> torch.Tensor:
        return self.parts[0].baseline_class_count

    @property
    def eval_class_count(self) -> torch.Tensor:
        return self.parts[0].eval_class_count

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """:meth:`NeuronStats.state_shapes`."""
        L, S, C, D = self.shape
        return {"sums": (L, S, C, D), "above": (L, S, C, D), "baseline_class_count": (C,),
                "eval_class_count": (C,), "threshold": (L, S, D)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The raw state gathered on the CPU, in :meth:`NeuronStats.state_tensors`'s layout (checkpoints)."""
        state = {"sums": self.sums, "above": self.above, "baseline_class_count": self.baseline_class_count.cpu(),
                 "eval_class_count": self.eval_class_count.cpu()}
        threshold = self.threshold
        if threshold is not None:
            state["threshold"] = threshold
        return state

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`: each part takes its layers' slices."""
        for (device, layers), part in zip(self.groups, self.parts):
            index = torch.tensor(layers, device=tensors["sums"].device)
            part.load_state({key: (value.index_select(0, index.to(value.device)) if value.dim() > 1 else value)
                             for key, value in tensors.items()})

    def gather(self, device: torch.device | str = "cpu") -> NeuronStats:
        """One :class:`NeuronStats` on ``device`` holding every layer (exact copies of the parts' numbers)."""
        out = NeuronStats(self.num_layers, self.num_slots, self.width, self.num_classes, device)
        out.load_state({k: v.to(device) for k, v in self.state_tensors().items()})
        return out


def write_score_files(folder: str | Path, stats: NeuronStats, meta: dict, *, top: int = 10, title: str = "",
                      extra: Optional[dict] = None) -> dict:
    """Write a score result into ``folder``: ``stats.safetensors`` (``meta`` in its header), ``summary.json``
    (``meta``, class counts, per-layer best and mean predictivity, the ``top`` neurons, ``extra``) and
    ``predictivity.png``. Callers write into a :func:`skillkern.files.staged_dir`, so the three appear together.
    Returns the summary."""
    from .files import atomic_write_json
    from .plotting import plot_predictivity

    folder = Path(folder)
    pred, sign = stats.predictivity(), stats.sign()
    stats.save(folder / "stats.safetensors", meta)
    summary = dict(meta)
    summary.update({
        "baseline_class_count": stats.baseline_class_count.tolist(),
        "eval_class_count": stats.eval_class_count.tolist(),
        "per_layer_best_predictivity": pred.max(dim=1).values.tolist(),
        "per_layer_mean_predictivity": pred.mean(dim=1).tolist(),
        "top_neurons": top_neurons(pred, top, sign),
    })
    summary.update(extra or {})
    atomic_write_json(folder / "summary.json", summary)
    plot_predictivity(pred, folder / "predictivity.png", title=title)
    return summary


# ------------------------------------------------------------------------------------------- selection
def combine_runs(preds: Sequence[torch.Tensor], how: str = "mean") -> torch.Tensor:
    """Combine per-run neuron predictivities (each (L, D)) over runs/seeds: ``mean`` (paper) or ``min``."""
    if not preds:
        raise ValueError("no runs to combine")
    shapes = {tuple(p.shape) for p in preds}
    if len(shapes) != 1:
        raise ValueError(f"runs have different shapes: {sorted(shapes)}")
    stacked = torch.stack([p.to(torch.float64) for p in preds])
    if how == "mean":
        return stacked.mean(0)
    if how == "min":
        return stacked.amin(0)
    raise ValueError(f"unknown combination {how!r}; use 'mean' or 'min'")


def _check_fraction(q: float) -> None:
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"keep fraction must be in [0, 1], got {q}")


def select_per_layer(pred: torch.Tensor, q: float) -> list[torch.Tensor]:
    """Top ``int(q * width)`` neurons of each layer by predictivity (METHOD.md section 5).

    Args:
        pred: (L, D) neuron predictivity.
        q: fraction of each layer to keep, in [0, 1].

    Returns:
        L int64 tensors of neuron indices, each sorted by decreasing predictivity (ties: lower index first).
    """
    _check_fraction(q)
    k = int(q * pred.shape[1] + 1e-9)  # +eps: 0.02 * 1536 must give 30, not 29 after float rounding
    return [_top(pred[layer], k) for layer in range(pred.shape[0])]


def select_counts(values: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Top ``counts[l]`` neurons of each layer ``l`` by ``values``.

    Args:
        values: (L, D) scores (higher first).
        counts: L numbers of neurons to keep, each in [0, D].

    Returns:
        L int64 tensors of neuron indices, each sorted by decreasing value (ties: lower index first).
    """
    if len(counts) != values.shape[0] or any(not 0 <= k <= values.shape[1] for k in counts):
        raise ValueError(f"counts {list(counts)} do not fit {values.shape[0]} layers of {values.shape[1]} neurons")
    return [_top(values[layer], int(k)) for layer, k in enumerate(counts)]


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort so that ties break by neuron index, reproducibly across backends.
    order = torch.sort(values.cpu(), descending=True, stable=True).indices
    return order[:k].clone()


def select_global(pred: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``k`` neurons of the whole model. pred: (L, D). Returns (k, 2) int64 rows of (layer, neuron)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat = _top(pred.reshape(-1), min(k, pred.numel()))
    return torch.stack([flat // pred.shape[1], flat % pred.shape[1]], dim=1)


def select_multiclass(pred_pn: torch.Tensor, pred_neu: torch.Tensor, q: float) -> list[torch.Tensor]:
    """Skill neurons of a 3-class task from its "pn" and "neu" sub-tasks (METHOD.md section 5).

    Per layer: the top ``int(q * D)`` neurons of "pn", then the best of "neu" not already chosen, until the
    layer holds ``2 * int(q * D)`` distinct neurons.

    Args:
        pred_pn, pred_neu: (L, D) predictivities of the two sub-tasks.

    Returns:
        L int64 index tensors.
    """
    if pred_pn.shape != pred_neu.shape:
        raise ValueError(f"sub-task predictivities differ in shape: {tuple(pred_pn.shape)} vs {tuple(pred_neu.shape)}")
    _check_fraction(q)
    width = pred_pn.shape[1]
    k = int(q * width + 1e-9)
    out = []
    for layer in range(pred_pn.shape[0]):
        chosen = _top(pred_pn[layer], k).tolist()
        taken = set(chosen)
        for idx in _top(pred_neu[layer], width).tolist():
            if len(chosen) >= min(2 * k, width):
                break
            if idx not in taken:
                chosen.append(idx)
                taken.add(idx)
        out.append(torch.tensor(chosen, dtype=torch.int64))
    return out


def top_neurons(pred: torch.Tensor, k: int = 10, sign: Optional[torch.Tensor] = None) -> list[dict]:
    """The ``k`` most predictive neurons as dicts ``{layer, neuron, predictivity[, sign]}`` (for reports)."""
    rows = []
    for layer, neuron in select_global(pred, k).tolist():
        row = {"layer": layer, "neuron": neuron, "predictivity": float(pred[layer, neuron])}
        if sign is not None:
            row["sign"] = int(sign[layer, neuron])
        rows.append(row)
    return rows
