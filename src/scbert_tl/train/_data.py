"""Token batches built on the fly from the sparse bins layer (never a dense copy of the dataset)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

if TYPE_CHECKING:
    from collections.abc import Iterator


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

    def tokens(self, rows: np.ndarray | slice) -> torch.Tensor:
        """Dense ``(len(rows), n_genes)`` int8 tokens of the given cells (unmeasured genes filled as asked)."""
        x = self.csr[rows].toarray()
        if self._fill.size:
            x[:, self._fill] = self.unmeasured_token
        return torch.from_numpy(x)


def batch_indices(
    n: int | np.ndarray, batch_size: int, *, shuffle: bool = False, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Yield index arrays of at most ``batch_size`` cells, in order or shuffled by ``rng``."""
    idx = np.arange(n) if np.isscalar(n) else np.asarray(n)
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs an rng.")
        idx = rng.permutation(idx)
    for start in range(0, idx.size, batch_size):
        yield idx[start : start + batch_size]
