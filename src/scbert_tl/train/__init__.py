"""Training loops and data loading (no AnnData in the loops; the ``tl`` functions feed them)."""

from ._checkpoint import load_checkpoint
from ._inference import auto_batch_size, autocast, batch_indices, run_batches
from ._masking import mask_tokens, mode_baseline
from ._pretrain import pretrain_network
from ._step import PretrainResult
from ._stream import StreamPlan

__all__ = [
    "PretrainResult",
    "StreamPlan",
    "auto_batch_size",
    "autocast",
    "batch_indices",
    "load_checkpoint",
    "mask_tokens",
    "mode_baseline",
    "pretrain_network",
    "run_batches",
]
