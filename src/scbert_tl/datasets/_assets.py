"""Readers that turn registry files into what the model needs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ._registry import fetch

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

PANELS = {"scbert-panglao": "scbert-panglao-genes"}


def panel_genes(name: str = "scbert-panglao") -> list[str]:
    """The gene symbols of a registered model panel, in model order.

    Parameters
    ----------
    name
        Panel name; ``"scbert-panglao"`` is the 16,906-gene panel of the published scBERT.

    Returns
    -------
    Gene symbols in the order the model sees them.
    """
    if name not in PANELS:
        raise KeyError(f"Unknown panel {name!r}; known panels are {sorted(PANELS)}.")
    text = fetch(PANELS[name]).read_text()
    return [g.strip() for g in text.splitlines() if g.strip()]


def read_gene2vec(path: str | os.PathLike, genes: Sequence[str]) -> tuple[np.ndarray, float]:
    """Read a gene2vec text file into a panel-aligned embedding matrix.

    Parameters
    ----------
    path
        gene2vec text: one gene a line, ``SYMBOL<TAB>v1 v2 ... vD`` (spaces also accepted).
    genes
        The panel, in model order.

    Returns
    -------
    ``(len(genes) + 1, D)`` float32 matrix (the last row, the appended position, is zero; so is the
    row of every gene without a vector) and the fraction of panel genes that have a vector.
    """
    index = {g: i for i, g in enumerate(genes)}
    rows: dict[int, np.ndarray] = {}
    dim = None
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'SYMBOL<TAB>floats', got {line[:60]!r}.")
            values = np.asarray(parts[1:], dtype=np.float32)
            if dim is None:
                dim = values.size
            elif values.size != dim:
                raise ValueError(f"{path}:{lineno}: {values.size} values where earlier lines had {dim}.")
            i = index.get(parts[0])
            if i is not None and i not in rows:
                rows[i] = values
    if dim is None:
        raise ValueError(f"{path} holds no gene vectors.")
    matrix = np.zeros((len(genes) + 1, dim), dtype=np.float32)
    for i, v in rows.items():
        matrix[i] = v
    coverage = len(rows) / max(len(genes), 1)
    logger.info("gene2vec: %d of %d panel genes have a vector (%.1f%%)", len(rows), len(genes), 100 * coverage)
    return matrix, coverage


def gene2vec_matrix(genes: Sequence[str]) -> tuple[np.ndarray, float]:
    """Fetch gene2vec through the registry and align it to ``genes`` (see :func:`~scbert_tl.datasets.read_gene2vec`)."""
    return read_gene2vec(fetch("gene2vec-200"), genes)
