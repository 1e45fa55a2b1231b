"""Batched inference: tokens to the device as int8, autocast where asked, results back as numpy."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._settings import settings
from ._data import batch_indices

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..model import ScBERTConfig, ScBERTNetwork
    from ._data import TokenMatrix


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def auto_batch_size(config: ScBERTConfig, device: torch.device, *, training: bool = False) -> int:
    """Cells per batch that fit the device for this architecture (a conservative estimate)."""
    if settings.batch_size != "auto":
        return int(settings.batch_size)
    # float32 activations that live at once in one block, per cell
    per_pos = (
        2 * config.heads * config.n_features + 4 * config.heads * config.dim_head + 2 * config.dim * config.ff_mult
    )
    per_cell = 4 * config.seq_len * per_pos
    if training:
        per_cell *= 2 * config.depth
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.6 * free
    else:
        budget = 2 * 1024**3  # keep CPU batches cache- and memory-friendly
    return int(max(1, min(512, budget // max(per_cell, 1))))


@torch.inference_mode()
def run_batches(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    fn: Callable[[ScBERTNetwork, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    *,
    rows: np.ndarray | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    desc: str = "scBERT",
) -> list[np.ndarray]:
    """Apply ``fn(network, tokens_on_device)`` to every batch of cells; concatenate the outputs as float32 numpy.

    ``fn`` returns one tensor, or a tuple of tensors, with the cells along the first axis.
    """
    dev = settings.resolve_device(device)
    dtype = settings.resolve_dtype(dev, precision)
    was_training = network.training
    network.eval().to(dev)
    rows = np.arange(tokens.n_cells) if rows is None else np.asarray(rows)
    batch_size = batch_size or auto_batch_size(network.config, dev)
    outputs: list[list[np.ndarray]] = []
    bar = tqdm(total=rows.size, desc=desc, unit="cells", disable=not settings.progress or rows.size <= batch_size)
    try:
        for idx in batch_indices(rows, batch_size):
            x = tokens.tokens(idx)
            if dev.type == "cuda":
                x = x.pin_memory().to(dev, non_blocking=True)
            with autocast(dev, dtype):
                out = fn(network, x)
            out = out if isinstance(out, tuple) else (out,)
            outputs.append([o.float().cpu().numpy() for o in out])
            bar.update(idx.size)
    finally:
        bar.close()
        network.train(was_training)
    n_out = len(outputs[0]) if outputs else 0
    return [np.concatenate([o[i] for o in outputs]) for i in range(n_out)]
