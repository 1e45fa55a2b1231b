"""Training loops and data loading (no AnnData in the loops; the ``tl`` functions feed them)."""

from ._data import TokenMatrix, batch_indices
from ._inference import auto_batch_size, autocast, run_batches

__all__ = ["TokenMatrix", "auto_batch_size", "autocast", "batch_indices", "run_batches"]
