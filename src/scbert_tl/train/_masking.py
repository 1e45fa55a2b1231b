"""Masking for masked expression modelling, and the per-cell mode baseline it is measured against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


def mask_tokens(
    tokens: sp.csr_matrix,
    rng: np.random.Generator,
    *,
    mask_token: int,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Choose positions for masked expression modelling, as in scBERT.

    Only non-zero tokens are candidates; each is chosen with probability ``mask_prob``; a chosen
    token becomes ``mask_token`` with probability ``replace_prob`` and otherwise stays as it is.

    Parameters
    ----------
    tokens
        ``(cells, genes)`` CSR int8 tokens (indices sorted).
    rng
        The generator of the draws (two uniforms per stored entry, in storage order).
    mask_token
        The ``[MASK]`` id (``config.mask_token``).
    mask_prob
        Chance that a non-zero token is chosen.
    replace_prob
        Chance that a chosen token is replaced by ``[MASK]``.

    Returns
    -------
    The input tokens (same sparsity pattern, masked values replaced) and a boolean flag per stored
    entry of ``tokens`` (``tokens.data``) that says whether it was chosen. The targets are
    ``tokens.data[chosen]``, in row-major order.
    """
    masked = tokens.copy()
    masked.data, chosen = mask_values(tokens.data, rng, mask_token, mask_prob, replace_prob)
    return masked, chosen


def mask_values(
    values: np.ndarray, rng: np.random.Generator, mask_token: int, mask_prob: float, replace_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < mask_prob <= 1 or not 0 <= replace_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1] and replace_prob in [0, 1]; got {mask_prob}, {replace_prob}.")
    u = rng.random(values.size)
    v = rng.random(values.size)
    chosen = (values != 0) & (u < mask_prob)
    return np.where(chosen & (v < replace_prob), np.int8(mask_token), values).astype(np.int8), chosen


@dataclass(frozen=True)
class Masking:
    """How a pretraining run masks tokens, in training steps and held-out cells alike (see :func:`mask_tokens`)."""

    mask_token: int
    mask_prob: float
    replace_prob: float

    def tokens(self, tokens: sp.csr_matrix, rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray]:
        """:func:`mask_tokens` of ``tokens``."""
        return mask_tokens(
            tokens, rng, mask_token=self.mask_token, mask_prob=self.mask_prob, replace_prob=self.replace_prob
        )

    def values(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """:func:`mask_values` of the stored values of one cell."""
        return mask_values(values, rng, self.mask_token, self.mask_prob, self.replace_prob)


def dense(csr: sp.csr_matrix, data: np.ndarray | None = None) -> np.ndarray:
    """Dense rows of ``csr`` (optionally with other values on the same pattern)."""
    if data is not None:
        csr = sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    return csr.toarray()


def mode_baseline(inputs: torch.Tensor, n_bins: int, mask_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trivial predictor: each cell's most common visible non-zero bin.

    Parameters
    ----------
    inputs
        ``(cells, genes)`` model inputs (with ``[MASK]`` tokens, which are not counted).
    n_bins
        Expression bins (non-zero tokens are ``1..n_bins``).
    mask_token
        The ``[MASK]`` id.

    Returns
    -------
    Per cell the predicted bin (ties to the lower bin; bin 1 when nothing is visible) and the log
    probabilities ``(cells, n_bins + 1)`` of the add-one smoothed frequencies of its visible
    non-zero bins (bin 0 gets none; masked positions are never 0).
    """
    x = inputs.long()
    x = torch.where(x == mask_token, torch.zeros_like(x), x)
    counts = torch.zeros(x.shape[0], n_bins + 1, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, x, torch.ones_like(x, dtype=torch.float64))
    counts = counts[:, 1:]
    pred = counts.argmax(dim=1) + 1
    probs = (counts + 1) / (counts.sum(dim=1, keepdim=True) + n_bins)
    logp = torch.cat([torch.full_like(probs[:, :1], -math.inf), probs.log()], dim=1)
    return pred, logp
