"""Expression proportional to counts (log-normalised input undone), for scanpy's own preprocessing on the input pp.bin reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from ..data import in_memory, matrix, rows
from ._kinds import check_values, detect_kind, linear

if TYPE_CHECKING:
    from anndata import AnnData


def expression(
    adata: AnnData,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_cells: int | None = None,
    rng: np.random.Generator | None = None,
    cells: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Values proportional to each cell's counts (log-normalised input undone), as float32 CSR.

    Used where scanpy's own preprocessing is wanted on the same input :func:`bin` reads (e.g. ranking
    highly variable genes). At most ``max_cells`` cells, drawn by ``rng``, in their original order;
    or the rows ``cells`` (sorted indices), when given.
    """
    X, where = matrix(adata, layer, use_raw)
    if cells is not None:
        cells = np.asarray(cells)
    elif max_cells is not None and adata.n_obs > max_cells:
        rng = rng if rng is not None else np.random.default_rng(0)
        cells = np.sort(rng.choice(adata.n_obs, size=max_cells, replace=False))
    else:
        cells = np.arange(adata.n_obs)
    kind = detect_kind(rows(X, 0, min(adata.n_obs, 2000)), where)
    parts = []
    for start in range(0, cells.size, 5_000):
        idx = cells[start : start + 5_000]
        chunk = in_memory(X[idx])
        chunk.eliminate_zeros()
        check_values(chunk, where)
        parts.append(linear(chunk, kind, where).astype(np.float32))
    return sp.vstack(parts, format="csr")
