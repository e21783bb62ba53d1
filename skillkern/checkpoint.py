"""Crash-safe checkpoints of a scoring run.

The state of a run is small (the accumulators of :class:`~skillkern.stats.NeuronStats`) and its position is
one number per pass (examples consumed, always at a batch boundary). Every ``every`` batches both are written
to a temporary file, flushed to disk, and renamed over the checkpoint: a process killed at any moment (SIGKILL
included) leaves either the previous checkpoint or the new one, never a torn file. Resuming loads the state
and continues at the recorded position, adding the remaining rows in the same order, so the final statistics
are bit-identical to an uninterrupted run.

A checkpoint records a fingerprint of the job (model, task, splits and their sizes, settings); resuming a
different job is refused rather than silently mixing statistics.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .stats import NeuronStats, ShardedNeuronStats, StatsFileError

logger = logging.getLogger(__name__)


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

    def restore(self, stats: "NeuronStats | ShardedNeuronStats") -> Optional[tuple[str, int]]:
        """Load the checkpoint into ``stats``; returns ``(phase, position)`` or None when starting afresh."""
        if not self.resume or not self.path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise StatsFileError(f"checkpoint {self.path} is unreadable ({err}); delete it to start afresh") from err
        if meta.get("format") != "skillkern-checkpoint":
            raise StatsFileError(f"{self.path} is not a skillkern checkpoint")
        theirs = json.loads(meta.get("fingerprint", "{}"))
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise StatsFileError(f"checkpoint {self.path} belongs to another job (differs in: {', '.join(diff)}); "
                                 "delete it or run without --resume")
        L, S, D, C = stats.shape
        expected = {"sums": (L, S, C, D), "above": (L, S, C, D), "baseline_class_count": (C,),
                    "eval_class_count": (C,)}
        if "threshold" in tensors:
            expected["threshold"] = (L, S, D)
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise StatsFileError(f"checkpoint {self.path}: {key} has shape {got}, expected {shape}")
        stats.load_state(tensors)  # a ShardedNeuronStats sends each layer to its device
        self.skipped = json.loads(meta.get("skipped", "{}"))
        return meta["phase"], int(meta["position"])

    def maybe_save(self, stats: NeuronStats, phase: str, position: int, skipped: Optional[dict] = None) -> None:
        """Called after every chunk; saves every ``every`` chunks."""
        self._chunks += 1
        if self._chunks % self.every == 0:
            self.save(stats, phase, position, skipped)

    def save(self, stats: NeuronStats, phase: str, position: int, skipped: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in stats.state_tensors().items()}
        meta = {"format": "skillkern-checkpoint", "phase": phase, "position": str(position),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True), "skipped": json.dumps(skipped or {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        logger.debug("checkpoint: %s pass at example %d -> %s", phase, position, self.path)

    def remove(self) -> None:
        """Delete the checkpoint (after the final result is safely written)."""
        for p in (self.path, self.path.with_name(self.path.name + ".tmp")):
            if p.exists():
                p.unlink()
