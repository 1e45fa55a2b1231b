"""Tokens in a model's panel order, read from bins: an eager matrix for the tools, row-range sources for pretraining.

A *source* is anything that returns rows of cells as a CSR matrix of int8 tokens in panel order
(:class:`TokenSource`): an in-memory bins matrix (:class:`MemorySource`), the bins layer of an
``.h5ad`` file read in row ranges (:class:`~scbert_tl.data._h5ad.H5adSource`), or expression binned on
the fly. Dense rows are made only for the batch at hand, never for the dataset.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class TokenMatrix:
    """Cells x panel tokens, stored sparse; dense int8 rows are made only for the batch at hand.

    Parameters
    ----------
    bins
        ``(cells, user genes)`` integer bins (the ``layers["scbert_bins"]`` written by
        :func:`scbert_tl.pp.bin`).
    panel_index
        For each user gene, its position in the model panel, or -1 (``var["scbert_panel_index"]``).
        Non-negative entries must be unique.
    n_genes
        Panel size.
    unmeasured_token
        Token for the panel genes that no user gene maps to (genes the data did not measure): ``None``
        leaves them 0 (not expressed, what the published scBERT saw), the ``[MASK]`` id reads them as unknown.
    """

    def __init__(
        self,
        bins: sp.spmatrix | np.ndarray,
        panel_index: np.ndarray,
        n_genes: int,
        *,
        unmeasured_token: int | None = None,
    ) -> None:
        panel_index = np.asarray(panel_index, dtype=np.int64)
        if bins.shape[1] != panel_index.size:
            raise ValueError(f"bins has {bins.shape[1]} genes but panel_index has {panel_index.size} entries.")
        keep = np.flatnonzero(panel_index >= 0)
        cols = panel_index[keep]
        if cols.size and (cols.max() >= n_genes):
            raise ValueError(f"panel_index has positions >= the panel size {n_genes}.")
        if np.unique(cols).size != cols.size:
            raise ValueError("panel_index maps two genes to the same panel position; run scbert.pp.bin again.")
        sub = sp.csr_matrix(bins)[:, keep]
        sub.sum_duplicates()
        # same rows, columns renumbered into panel order
        self.csr = sp.csr_matrix(
            (sub.data.astype(np.int8), cols[sub.indices], sub.indptr), shape=(sub.shape[0], n_genes)
        )
        self.csr.sort_indices()
        self.n_genes = n_genes
        self.measured = np.zeros(n_genes, dtype=bool)
        self.measured[cols] = True
        self.unmeasured_token = unmeasured_token
        self._fill = np.flatnonzero(~self.measured) if unmeasured_token is not None else np.array([], dtype=np.int64)

    @property
    def coverage(self) -> float:
        """Fraction of the panel genes the data measured."""
        return float(self.measured.mean())

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.csr.shape[0]

    def __len__(self) -> int:
        return self.n_cells

    def dense(self, rows: np.ndarray | slice) -> np.ndarray:
        """Dense ``(len(rows), n_genes)`` int8 tokens of the given cells (unmeasured genes filled as asked)."""
        x = self.csr[rows].toarray()
        if self._fill.size:
            x[:, self._fill] = self.unmeasured_token
        return x


def to_panel_csr(block: sp.spmatrix | np.ndarray, col_map: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Rows of user-gene bins to CSR int8 tokens in panel order (explicit zeros dropped, indices sorted).

    Parameters
    ----------
    block
        ``(cells, user genes)`` bins.
    col_map
        For each user gene, its panel position or -1 (not in the panel). Non-negative entries are unique.
    n_genes
        Panel size.
    """
    csr = sp.csr_matrix(block)
    keep = col_map >= 0
    if keep.all() and col_map.size == n_genes and np.array_equal(col_map, np.arange(n_genes)):
        out = sp.csr_matrix((csr.data.astype(np.int8), csr.indices, csr.indptr), shape=(csr.shape[0], n_genes))
    else:
        sub = csr[:, np.flatnonzero(keep)]
        cols = col_map[keep]
        out = sp.csr_matrix(
            (sub.data.astype(np.int8), cols[sub.indices], sub.indptr), shape=(sub.shape[0], n_genes), copy=False
        )
    out.eliminate_zeros()
    out.sort_indices()
    return out


def check_col_map(col_map: np.ndarray, n_user_genes: int, n_genes: int, name: str) -> np.ndarray:
    """Validate a user-gene -> panel-position map; returns it as int64."""
    col_map = np.asarray(col_map, dtype=np.int64).ravel()
    if col_map.size != n_user_genes:
        raise ValueError(f"{name}: the bins have {n_user_genes} genes but the panel index has {col_map.size} entries.")
    cols = col_map[col_map >= 0]
    if cols.size == 0:
        raise ValueError(f"{name}: none of its genes are in the model's panel; nothing to train on.")
    if cols.max() >= n_genes:
        raise ValueError(f"{name}: the panel index points past the panel ({n_genes} genes); run scbert.pp.bin again.")
    if np.unique(cols).size != cols.size:
        raise ValueError(f"{name}: two genes map to the same panel position; run scbert.pp.bin again.")
    return col_map


class TokenSource:
    """Cells x panel tokens that can be read by row ranges (the interface the pretraining loop consumes).

    Subclasses set ``name``, ``n_cells`` and ``n_genes`` and implement :meth:`read`; :meth:`take` and
    :meth:`close` have working defaults. Rows come back as CSR int8 tokens in panel order, with no
    explicit zeros and sorted indices (:func:`to_panel_csr` makes that from any bins matrix).
    """

    name: str = "source"
    n_cells: int = 0
    n_genes: int = 0

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` (local row numbers)."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """The cells at sorted local row numbers ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.int8)
        return self.read(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]

    def close(self) -> None:
        """Release open files (the source stays usable and reopens on demand)."""

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.n_cells} cells, {self.n_genes} panel genes)"


class MemorySource(TokenSource):
    """Bins held in memory (e.g. ``adata.layers["scbert_bins"]``), converted to panel order one chunk at a time.

    Parameters
    ----------
    bins
        ``(cells, user genes)`` bins, sparse or dense.
    col_map
        Each user gene's panel position, or -1; ``None`` when the columns already are the panel.
    n_genes
        Panel size (defaults to the number of columns when ``col_map`` is None).
    name
        A name for messages and provenance.
    """

    def __init__(
        self,
        bins: sp.spmatrix | np.ndarray,
        col_map: np.ndarray | None = None,
        n_genes: int | None = None,
        *,
        name: str = "adata",
    ) -> None:
        if sp.issparse(bins) and not isinstance(bins, sp.csr_matrix | sp.csr_array):
            bins = sp.csr_matrix(bins)  # row slicing of CSC/COO would be slow
        self.bins = bins
        self.n_genes = int(bins.shape[1] if n_genes is None else n_genes)
        if col_map is None:
            col_map = np.arange(bins.shape[1])
        self.col_map = check_col_map(col_map, bins.shape[1], self.n_genes, name)
        self.n_cells = int(bins.shape[0])
        self.name = name

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop``."""
        return to_panel_csr(self.bins[start:stop], self.col_map, self.n_genes)

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """Cells at ``rows``."""
        return to_panel_csr(self.bins[np.asarray(rows, dtype=np.int64)], self.col_map, self.n_genes)
