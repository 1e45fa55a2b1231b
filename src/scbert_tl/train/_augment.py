"""Augmentation of training cells during fine-tuning: genes hidden behind the ``[MASK]`` token.

A query dataset often measures fewer genes than the model reads (another panel, a targeted assay, a
gene filter). Such genes are fed as unknown (``[MASK]``), and a model meets that at prediction time
only if it met it in training: :func:`gene_mask` chooses which of a training cell's genes to hide, at random or the least
detected ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import scipy.sparse as sp


def gene_mask(
    n_cells: int,
    n_genes: int,
    max_rate: float,
    generator: torch.Generator,
    detection_rank: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which genes of each cell to hide behind ``[MASK]``; ``None`` when ``max_rate`` is 0.

    Each cell draws a share uniformly from ``[0, max_rate]`` and one of three schemes with equal
    chance: it keeps all its genes; it hides each gene with that probability (genes missing at
    random, as in a panel that measures other genes); or it hides that share of the genes least
    often detected in the training cells (``detection_rank``), as in a query that kept only its most
    detected genes. Without ``detection_rank`` the third scheme hides genes at random too.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the token batch.
    max_rate
        Largest share of a cell's genes hidden, in ``[0, 1]``.
    generator
        Source of the randomness (on the CPU).
    detection_rank
        ``(n_genes,)`` rank of every gene by how many training cells express it (0 = the most).

    Returns
    -------
    A boolean ``(n_cells, n_genes)`` tensor, True where the gene is hidden.
    """
    if max_rate <= 0:
        return None
    scheme = torch.randint(0, 3, (n_cells, 1), generator=generator)
    rate = torch.rand(n_cells, 1, generator=generator) * max_rate
    at_random = torch.rand(n_cells, n_genes, generator=generator) < rate
    if detection_rank is None:
        least_detected = at_random
    else:
        least_detected = detection_rank.unsqueeze(0) >= (1 - rate) * n_genes
    return torch.where(scheme == 1, at_random, least_detected & (scheme == 2))


def detection_rank(csr: sp.csr_matrix) -> torch.Tensor:
    """Rank of every column by the number of rows where it is non-zero (0 = the most; ties in column order)."""
    detected = np.bincount(csr.indices, minlength=csr.shape[1])
    rank = np.empty(csr.shape[1], dtype=np.int64)
    rank[np.argsort(-detected, kind="stable")] = np.arange(csr.shape[1])
    return torch.from_numpy(rank)
