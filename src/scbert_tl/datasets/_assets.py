"""Readers that turn registry files into what the model needs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._registry import fetch

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd

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


HGNC_COLUMNS = ("hgnc_id", "symbol", "prev_symbol", "alias_symbol", "ensembl_gene_id")


def read_hgnc(path: str | os.PathLike) -> pd.DataFrame:
    """Read an HGNC complete-set table (tab-separated, as genenames.org publishes it).

    Parameters
    ----------
    path
        The ``hgnc_complete_set`` text file, or any TSV with the same columns.

    Returns
    -------
    A frame with columns ``hgnc_id``, ``symbol``, ``prev_symbol``, ``alias_symbol`` and
    ``ensembl_gene_id`` (strings; multiple previous or alias symbols are ``|``-separated, missing
    values are empty strings).
    """
    import pandas as pd

    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"HGNC table {path} is not a file (download hgnc_complete_set.txt from genenames.org).")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, usecols=lambda c: c in HGNC_COLUMNS, quoting=3)
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path} is not an HGNC complete-set table ({e}).") from e
    missing = [c for c in HGNC_COLUMNS if c not in frame.columns]
    if missing or frame.empty:
        raise ValueError(
            f"{path} is not an HGNC complete-set table: columns {missing} are missing or it has no rows "
            "(download it from https://www.genenames.org/download/archive/)."
        )
    return frame.fillna("").apply(lambda col: col.str.strip('"'))


def hgnc_table() -> pd.DataFrame:
    """Fetch the HGNC nomenclature table through the registry (see :func:`~scbert_tl.datasets.read_hgnc`).

    A download that is not an HGNC table (an error page, a truncated file) is deleted from the cache.
    """
    path = fetch("hgnc-complete-set")
    try:
        return read_hgnc(path)
    except ValueError:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        raise
