"""Held-out evaluation of masked expression modelling: fixed masks per held-out cell, loss and accuracy beside the mode baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ._distributed import all_reduce
from ._inference import autocast
from ._masking import dense, mode_baseline
from ._stream import EVAL, StreamPlan, derive_rng

if TYPE_CHECKING:
    import scipy.sparse as sp

    from ..model import ScBERTNetwork
    from ._distributed import DistContext
    from ._masking import Masking


@dataclass
class Validation:
    ids: np.ndarray
    inputs: sp.csr_matrix
    targets: sp.csr_matrix
    chosen: np.ndarray  # per stored entry of targets


def prepare_validation(plan: StreamPlan, seed: int, masking: Masking) -> Validation:
    """The held-out cells of ``plan`` with their masks, drawn per cell (``(seed, EVAL, cell id)``) so they never change."""
    ids, tokens = plan.validation_cells()
    inputs = tokens.copy()
    chosen = np.zeros(tokens.nnz, dtype=bool)
    for row, cid in enumerate(ids):
        a, b = tokens.indptr[row], tokens.indptr[row + 1]
        rng = derive_rng(seed, EVAL, int(cid))
        inputs.data[a:b], chosen[a:b] = masking.values(tokens.data[a:b], rng)
    return Validation(ids, inputs, tokens, chosen)


@torch.inference_mode()
def evaluate_masked(
    network: ScBERTNetwork,
    val: Validation,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    ctx: DistContext,
) -> dict[str, float]:
    """Masked-token loss and accuracy on the held-out cells beside the mode baseline's, summed over ranks.

    Returns ``val_loss``, ``val_accuracy``, ``baseline_accuracy`` and ``baseline_loss`` (per masked
    position), ``val_masked`` (masked positions) and ``val_cells``.
    """
    c = network.config
    was_training = network.training
    network.eval()
    sums = np.zeros(6)  # loss, correct, baseline correct, baseline loss, positions, cells
    try:
        for start in range(0, val.ids.size, batch_size):
            rows = slice(start, start + batch_size)
            inputs, targets = val.inputs[rows], val.targets[rows]
            a, b = val.targets.indptr[start], val.targets.indptr[min(start + batch_size, val.ids.size)]
            flags = val.chosen[a:b]
            chosen = torch.from_numpy(dense(targets, flags.astype(np.int8)).astype(bool)).to(device)
            y = torch.from_numpy(targets.data[flags].astype(np.int64)).to(device)
            x = torch.from_numpy(dense(inputs)).to(device)
            with autocast(device, dtype):
                logits = network.mlm_logits(x)[:, :-1]
            picked = logits[chosen].float()
            base_pred, base_logp = mode_baseline(x, c.n_bins, c.mask_token)
            row_of = torch.nonzero(chosen)[:, 0]
            sums += [
                F.cross_entropy(picked, y, reduction="sum").item(),
                (picked.argmax(-1) == y).sum().item(),
                (base_pred[row_of] == y).sum().item(),
                -base_logp[row_of, y].sum().item(),
                y.numel(),
                x.shape[0],
            ]
    finally:
        network.train(was_training)
    loss, correct, base_correct, base_loss, n, cells = all_reduce(sums.tolist(), ctx, device)
    n = max(n, 1.0)
    return {
        "val_loss": loss / n,
        "val_accuracy": correct / n,
        "baseline_accuracy": base_correct / n,
        "baseline_loss": base_loss / n,
        "val_masked": int(n),
        "val_cells": int(cells),
    }
