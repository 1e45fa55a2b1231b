"""Augmentation of training cells during fine-tuning: genes hidden behind the ``[MASK]`` token.

A query dataset often measures fewer genes than the model reads (another panel, a targeted assay, a
gene filter). Such genes are fed as unknown (``[MASK]``), and a model meets that at prediction time
only if it met it in training: :func:`gene_mask` chooses a random share of every training cell's genes to hide.
"""

from __future__ import annotations

import torch


def gene_mask(n_cells: int, n_genes: int, max_rate: float, generator: torch.Generator) -> torch.Tensor | None:
    """Which genes of each cell to hide behind ``[MASK]``; ``None`` when ``max_rate`` is 0.

    Each cell draws its share uniformly from ``[0, max_rate]``, then each of its genes is hidden with
    that probability, so the model trains on cells with few and with most genes missing.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the token batch.
    max_rate
        Largest share of a cell's genes hidden, in ``[0, 1]``.
    generator
        Source of the randomness (on the CPU).

    Returns
    -------
    A boolean ``(n_cells, n_genes)`` tensor, True where the gene is hidden.
    """
    if max_rate <= 0:
        return None
    rate = torch.rand(n_cells, 1, generator=generator) * max_rate
    return torch.rand(n_cells, n_genes, generator=generator) < rate
