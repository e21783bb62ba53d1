"""Crash-safe checkpoints of a scoring run.

The state of a run is small (the accumulators of :class:`~skillkern.stats.NeuronStats`) and its position is
one number per pass (examples consumed, always at a batch boundary). Every ``every`` batches both are written
to a temporary file, flushed to disk, and renamed over the checkpoint: a process killed at any moment (SIGKILL
included) leaves either the previous checkpoint or the new one, never a torn file. Resuming loads the state
and continues at the recorded position, adding the remaining rows in the same order, so the final statistics
are bit-identical to an uninterrupted run.

A checkpoint records a fingerprint of the job (model, task, splits and their sizes, settings); resuming a
different job is refused rather than silently mixing statistics.

The file holds the accumulator's state under the stats file's keys and layouts (``sums``, ``above``,
``baseline_class_count``, ``eval_class_count`` and, after the baseline pass, ``threshold``: the module docstring
of :mod:`skillkern.stats`; a moments pass: ``moments`` and ``count``, the moments file's), and in its header
``format = "skillkern-checkpoint"``, ``format_version`` (the stats format's), ``phase`` (``baseline``, ``eval``
or ``moments``), ``position``, ``fingerprint`` and ``skipped``. A checkpoint
without ``format_version`` (skillkern 0.1.0) has the same keys and layouts and is read as it is; a newer
version is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .files import FileFormatError, is_leftover, load_safetensors, safetensors_header, save_safetensors
from .stats import FORMAT_VERSION, NeuronMoments, NeuronStats, ShardedNeuronStats, StatsFileError

logger = logging.getLogger(__name__)

#: what an unfinished scoring job leaves in its output folder (not a result: ``--resume`` continues it)
PARTIAL = ("checkpoint.safetensors", "checkpoint.rank*.safetensors")


def checkpoint_path(folder: str | Path, rank: int = 0, world: int = 1) -> Path:
    """The checkpoint file of a scoring job writing ``folder``: one per process when ``world`` > 1."""
    return Path(folder) / ("checkpoint.safetensors" if world == 1 else f"checkpoint.rank{rank}.safetensors")


class Checkpoint:
    """Periodic, atomic checkpoints of a scoring run.

    Args:
        path: checkpoint file (safetensors).
        fingerprint: JSON-serialisable description of the job; must match to resume.
        every: save after every ``every`` batches (chunks of ``batch_size`` examples).
        resume: load an existing checkpoint at ``path`` (otherwise an existing one is overwritten).
    """

    def __init__(self, path: str | Path, fingerprint: dict, every: int = 50, resume: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 batch, got {every}")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # normalise (tuples -> lists)
        self.every = every
        self.resume = resume
        self.skipped: dict = {}
        self._chunks = 0

    @classmethod
    def for_job(cls, folder: str | Path, fingerprint: dict, *, rank: int = 0, world: int = 1, every: int = 50,
                resume: bool = False) -> "Checkpoint":
        """The checkpoint of the scoring job that writes ``folder`` (:func:`checkpoint_path`), checked before any
        model is loaded: with ``resume``, a truncated checkpoint or one of another job is refused now; without
        it, a checkpoint left there is reported (it is overwritten as the job goes)."""
        checkpoint = cls(checkpoint_path(folder, rank, world), fingerprint, every=every, resume=resume)
        checkpoint.check()
        if not resume and checkpoint.path.exists():
            logger.warning("%s holds the checkpoint of an unfinished job; starting afresh (pass --resume to "
                           "continue it)", folder)
        return checkpoint

    def restore(self, stats: "NeuronStats | ShardedNeuronStats | NeuronMoments") -> Optional[tuple[str, int]]:
        """Load the checkpoint into ``stats``; returns ``(phase, position)`` or None when starting afresh."""
        if not self.resume or not self.path.exists():
            return None
        try:
            tensors, meta = load_safetensors(self.path, what="checkpoint",
                                             hint="delete it to start afresh, or run without --resume")
        except FileFormatError as err:
            raise StatsFileError(str(err)) from err.__cause__
        phase, position, skipped = self._check_meta(meta)
        self._restore_tensors(stats, tensors)
        self.skipped = skipped
        return phase, position

    def check(self) -> None:
        """With ``resume``: check, before any model is loaded, that an existing checkpoint is a whole skillkern
        checkpoint of this very job (reads its header only). Raises :class:`StatsFileError` naming the file."""
        if not self.resume or not self.path.exists():
            return
        try:
            meta, _ = safetensors_header(self.path, what="checkpoint",
                                         hint="delete it to start afresh, or run without --resume")
        except FileFormatError as err:
            raise StatsFileError(str(err)) from err.__cause__
        self._check_meta(meta)

    def _check_meta(self, meta: dict) -> tuple[str, int, dict]:
        if meta.get("format") != "skillkern-checkpoint":
            raise StatsFileError(f"{self.path} is not a skillkern checkpoint; delete it or run without --resume")
        version = meta.get("format_version", str(FORMAT_VERSION))  # none: 0.1.0's, the same keys and layouts
        if version != str(FORMAT_VERSION):
            raise StatsFileError(f"checkpoint {self.path} has format version {version}, which this skillkern "
                                 f"(format {FORMAT_VERSION}) cannot read; delete it or run without --resume")
        try:
            theirs = json.loads(meta.get("fingerprint", "{}"))
            skipped = json.loads(meta.get("skipped", "{}"))
            phase, position = meta["phase"], int(meta["position"])
        except (ValueError, KeyError):
            raise StatsFileError(f"checkpoint {self.path} has a corrupt header; delete it to start afresh") from None
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise StatsFileError(f"checkpoint {self.path} belongs to another job (differs in: {', '.join(diff)}); "
                                 "delete it or run without --resume")
        return phase, position, skipped

    def _restore_tensors(self, stats, tensors: dict) -> None:
        expected = stats.state_shapes()
        if "threshold" in expected and "threshold" not in tensors:  # before the end of the baseline pass
            del expected["threshold"]
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise StatsFileError(f"checkpoint {self.path}: {key} has shape {got}, expected {shape}")
        stats.load_state(tensors)  # a ShardedNeuronStats sends each layer to its device

    def maybe_save(self, stats: NeuronStats, phase: str, position: int, skipped: Optional[dict] = None) -> None:
        """Called after every chunk; saves every ``every`` chunks."""
        self._chunks += 1
        if self._chunks % self.every == 0:
            self.save(stats, phase, position, skipped)

    def save(self, stats: NeuronStats, phase: str, position: int, skipped: Optional[dict] = None) -> None:
        """Write the checkpoint atomically (:func:`skillkern.files.atomic_write`: temporary file, fsync, rename)."""
        tensors = stats.state_tensors()
        meta = {"format": "skillkern-checkpoint", "format_version": str(FORMAT_VERSION), "phase": phase,
                "position": str(position), "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "skipped": json.dumps(skipped or {})}
        save_safetensors(self.path, tensors, meta)
        logger.debug("checkpoint: %s pass at example %d -> %s", phase, position, self.path)

    def remove(self) -> None:
        """Delete the checkpoint (after the final result is safely written), and any temporary file of it."""
        self.path.unlink(missing_ok=True)
        if self.path.parent.is_dir():
            for p in self.path.parent.glob(f".{self.path.name}.*"):
                if is_leftover(p.name):
                    p.unlink(missing_ok=True)
