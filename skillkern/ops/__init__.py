"""The ops: one file per op (reference, Triton kernel, host wrapper, registration + fake) and ``dispatch.py``,
the only place that knows backends. Importing this package registers every op's implementations."""

from . import ffn_stats, masked_ffn, stats_moments, stats_update  # noqa: F401  (registration side effects)
from .dispatch import BACKENDS, BackendUnavailable, resolve  # noqa: F401  (the public names)
