"""Training loops and data loading (no AnnData in the loops; the ``tl`` functions feed them)."""

from ._data import TokenMatrix, batch_indices
from ._inference import auto_batch_size, autocast, run_batches
from ._pretrain import PretrainResult, load_checkpoint, mask_tokens, mode_baseline, pretrain_network
from ._stream import H5adSource, MemorySource, StreamPlan, TokenSource

__all__ = [
    "H5adSource",
    "MemorySource",
    "PretrainResult",
    "StreamPlan",
    "TokenMatrix",
    "TokenSource",
    "auto_batch_size",
    "autocast",
    "batch_indices",
    "load_checkpoint",
    "mask_tokens",
    "mode_baseline",
    "pretrain_network",
    "run_batches",
]
