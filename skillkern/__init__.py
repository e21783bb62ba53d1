"""skillkern: find the skill neurons of pre-trained transformers and turn them into faster models.

The public API is small; names are imported lazily so that ``import skillkern`` pulls in neither
transformers nor CUDA.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_API = {
    "load_model": "models",
    "ffn_layers": "models",
    "capture_neurons": "models",
    "edit_neurons": "models",
    "register_architecture": "models",
    "ARCHITECTURES": "models",
    "FFNSpec": "models",
    "load_task": "data",
    "binary_subtask": "data",
    "Scorer": "scoring",
    "ScoreSettings": "scoring",
    "score": "scoring",
    "collect_moments": "scoring",
    "NeuronStats": "stats",
    "ShardedNeuronStats": "stats",
    "NeuronMoments": "stats",
    "select_per_layer": "stats",
    "select_global": "stats",
    "select_multiclass": "stats",
    "combine_runs": "stats",
    "stats_update": "ops.stats_update",
    "stats_moments": "ops.stats_moments",
    "ffn_stats": "ops.ffn_stats",
    "masked_ffn": "ops.masked_ffn",
    "PromptModel": "prompt",
    "TuneSettings": "tune",
    "load_run": "runs",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skillkern' has no attribute {name!r}")


def __dir__():
    return __all__
