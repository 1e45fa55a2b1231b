"""How one input becomes scBERT tokens, decided once (:func:`prepare_binning`) and applied to chunks of cells (:class:`Binning`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp

from ..data import rows
from ._genes import align_genes, is_ensembl, nomenclature
from ._kinds import check_values, detect_kind, linear, row_ids

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd

    from ._kinds import InputKind

logger = logging.getLogger(__name__)

TARGET_SUM = 1e4
# Fewest panel genes pp.bin accepts (or 5% of a smaller panel): in PBMC3k, a cell expresses a median of
# 6 of 100 random panel genes and 1 of 20 (27% of cells none), so below this the model sees near-empty cells.
MIN_PANEL_GENES = 100
KIND_SAMPLE = 2000  # first cells read to tell raw counts from normalised values


class ModelPanel(Protocol):
    """What preprocessing reads of a model (an :class:`~scbert_tl.ScBERT`): its genes, panel name and normalisation."""

    genes: Sequence[str]
    panel: str | None
    normalization: str


def _resolve_panel(panel: str | Sequence[str] | ModelPanel) -> tuple[list[str], str, str]:
    """Genes, name and default normalisation of a panel argument (a model: anything with genes, panel and normalization)."""
    from .. import datasets

    if all(hasattr(panel, a) for a in ("genes", "panel", "normalization")):
        return list(panel.genes), panel.panel or "model", panel.normalization
    if isinstance(panel, str):
        return datasets.panel_genes(panel), panel, "panel"  # a published panel: the original preprocessing
    genes = [str(g) for g in panel]
    if not genes:
        raise ValueError("panel is an empty list of genes.")
    if len(set(genes)) != len(genes):
        raise ValueError("panel has duplicated gene symbols; each panel position needs its own gene.")
    return genes, "custom", "library"


def _check_species(ids: pd.Index, alignment: Any) -> None:
    """Warn when most genes match only case-insensitively (``Cd3e`` -> ``CD3E``): mouse-style symbols on a human panel."""
    matched = int((alignment.target >= 0).sum())
    by_case = np.flatnonzero(alignment.method == "case")
    if matched and by_case.size > 0.5 * matched:
        logger.warning(
            "%d of the %d matched genes match the model panel only when case is ignored (e.g. %s): the data and the "
            "panel look like different species (mouse-style symbols such as 'Cd3e' against human-style 'CD3E'; "
            "the published panel is human). Each gene is used as its namesake and genes without one are left out, "
            "so a model trained on another species may be less accurate here. If the data is human, check gene_key=.",
            by_case.size,
            matched,
            ", ".join(str(ids[j]) for j in by_case[:3]),
        )


def _row_sums(m: sp.csr_matrix, values: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate(([0.0], np.cumsum(values)))
    return cumulative[m.indptr[1:]] - cumulative[m.indptr[:-1]]


def _tokens(
    lin: sp.csr_matrix,
    target: np.ndarray,
    primary: np.ndarray,
    n_bins: int,
    *,
    sum_duplicates: bool,
    library: bool,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Bins in the user's var space (columns of panel genes only) and each cell's panel total.

    Each cell is normalised by its total over all genes (``library``) or over the panel genes.
    """
    n_rows, n_cols = lin.shape
    library_size = _row_sums(lin, lin.data) if library else None
    if sum_duplicates:  # several user genes on one panel gene: add their values first
        keep = target[lin.indices] >= 0
        rows = row_ids(lin)[keep]
        lin = sp.csr_matrix((lin.data[keep], (rows, primary[lin.indices[keep]])), shape=(n_rows, n_cols))
        lin.sum_duplicates()
    v = np.where(target[lin.indices] >= 0, lin.data, 0.0)
    # per-cell totals; exact for the integer (or recovered integer) counts this mostly sees
    totals = _row_sums(lin, v)
    tok = _bin_values(v, library_size if library else totals, np.diff(lin.indptr), n_bins)
    return _nonzero_bins(tok, primary[lin.indices], lin.indptr, (n_rows, n_cols)), totals


def _bin_values(values: np.ndarray, totals: np.ndarray, per_row: np.ndarray, n_bins: int) -> np.ndarray:
    """``min(floor(log2(1 + value / total * 1e4)), n_bins)`` of CSR data whose rows hold ``per_row`` entries."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = values / np.repeat(totals, per_row) * TARGET_SUM
    tok = np.log2(1.0 + x, out=x)
    np.floor(tok, out=tok)
    return np.minimum(tok, n_bins, out=tok)


def _nonzero_bins(tok: np.ndarray, cols: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR int8 bins of the CSR entries (``cols``, ``indptr``) whose bin is above 0.

    NaN bins (cells with no counts to normalise by) compare False and are dropped with the zeros.
    """
    nz = tok > 0
    kept = np.concatenate(([0], np.cumsum(nz)))[indptr]
    return sp.csr_matrix((tok[nz].astype(np.int8), cols[nz].astype(np.int32), kept.astype(np.int64)), shape=shape)


def bin_counts(counts: sp.csr_matrix, library: np.ndarray | None, n_bins: int) -> sp.csr_matrix:
    """Bins (CSR int8, the same columns) of counts, as :func:`scbert_tl.pp.bin` makes them.

    Each cell is normalised to 1e4 by ``library`` (its total over all genes, ``"library"``
    normalisation) or, when ``None``, by its total over these columns (``"panel"``).
    """
    per_row = np.diff(counts.indptr)
    totals = library if library is not None else _row_sums(counts, counts.data)
    tok = _bin_values(counts.data.astype(np.float64), totals, per_row, n_bins)
    return _nonzero_bins(tok, counts.indices, counts.indptr, counts.shape)


def _check_alignment(ids: pd.Index, genes: list[str], panel_name: str, alignment: Any) -> int:
    """The number of panel genes matched; an error when none or too few are, a warning when the species may differ."""
    n_matched = int((alignment.panel_index >= 0).sum())
    if n_matched == 0:
        hint = ""
        if is_ensembl(ids).mean() > 0.5:
            hint = (
                " The genes look like Ensembl IDs: pass gene_key= a var column with gene symbols, or make the "
                "HGNC table available (aliases=)."
            )
        raise ValueError(
            f"None of the {len(ids)} genes of adata ({', '.join(map(str, ids[:3]))}, ...) is in the model panel "
            f"'{panel_name}' ({', '.join(genes[:3])}, ...). Use human gene symbols or Ensembl IDs, or a model "
            f"trained on your genes.{hint}"
        )

    floor = min(MIN_PANEL_GENES, math.ceil(0.05 * len(genes)))
    if n_matched < floor:
        found = [str(ids[j]) for j in np.flatnonzero(alignment.panel_index >= 0)[:5]]
        raise ValueError(
            f"Only {n_matched} of the {len(genes)} genes of the model panel '{panel_name}' are in adata ({found}); "
            f"at least {floor} are needed ({MIN_PANEL_GENES}, or 5% of a smaller panel). With so few, most cells "
            "express none or a handful of them and the model would see nearly empty cells. Check that the genes are "
            "human symbols or Ensembl IDs (gene_key= names a var column holding them), or use a model trained on "
            "your genes."
        )
    _check_species(ids, alignment)
    return n_matched


def _log_kind(where: str, kind: InputKind, normalization: str) -> None:
    logger.info(
        "pp.bin: %s looks like %s; %s",
        where,
        {
            "counts": "raw counts",
            "log1p": "log1p (natural log) normalised data",
            "log2": "log2(1 + x) normalised data",
            "normalized": "normalised, not log-transformed data",
        }[kind],
        f"normalising each cell to 1e4 over {'all its genes' if normalization == 'library' else 'the panel genes'}"
        + ("" if kind == "counts" else " after undoing it exactly"),
    )


@dataclass
class Binning:
    """How one input becomes tokens, decided once (genes aligned to a panel, the kind of values) and applied to chunks of cells.

    Made by :func:`prepare_binning`; calling it on a chunk of cells (CSR rows of the input) returns
    the chunk's bins in the input's genes. Bins depend on each cell alone, so binning a matrix chunk
    by chunk gives the same bins as binning it whole.
    """

    genes: list[str]
    panel_name: str
    normalization: str
    n_bins: int
    alignment: Any
    kind: InputKind
    where: str
    nom_source: str
    primary: np.ndarray

    def __call__(self, raw: sp.csr_matrix, start: int = 0) -> BinnedChunk:
        """Bin cells ``start, start + 1, ...`` (float64 CSR rows of the input; numbered for messages)."""
        raw.eliminate_zeros()
        check_values(raw, f"{self.where} (cells {start}..{start + raw.shape[0] - 1})")
        lin = linear(raw, self.kind, self.where)
        bins, totals = _tokens(
            lin,
            self.alignment.target,
            self.primary,
            self.n_bins,
            sum_duplicates=self.alignment.duplicates > 0,
            library=self.normalization == "library",
        )
        return BinnedChunk(bins, totals, np.diff(raw.indptr), float(lin.data.sum()))

    def panel_counts(self, raw: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """Cells' values in panel order (float64 CSR, genes on one panel position summed) and their totals over all genes.

        For raw counts (or normalised values from which integer counts are recovered) these are
        counts, which :func:`bin_counts` turns into the same bins as calling the binning.
        """
        raw = raw.copy()
        raw.eliminate_zeros()
        check_values(raw, self.where)
        lin = linear(raw, self.kind, self.where)
        keep = self.alignment.target[lin.indices] >= 0
        counts = sp.csr_matrix(
            (lin.data[keep], (row_ids(lin)[keep], self.alignment.target[lin.indices[keep]])),
            shape=(lin.shape[0], len(self.genes)),
        )
        counts.sum_duplicates()
        return counts, _row_sums(lin, lin.data)


class BinnedChunk(NamedTuple):
    """A chunk of binned cells: bins (CSR int8, the input's genes), panel totals, expressed genes and the input total."""

    bins: sp.csr_matrix
    panel_totals: np.ndarray
    n_genes: np.ndarray
    total: float


def prepare_binning(
    X: Any,
    where: str,
    ids: pd.Index,
    *,
    panel: str | Sequence[str] | ModelPanel,
    n_bins: int,
    normalize: Literal["auto", "library", "panel"] = "auto",
    aliases: str | os.PathLike | pd.DataFrame | None = "hgnc",
) -> Binning:
    """Align the genes ``ids`` of the matrix ``X`` (named ``where`` in messages) to ``panel`` and tell its kind of values.

    ``X`` is anything whose row ranges :func:`~scbert_tl.data.rows` reads (in memory, backed, dask, a
    file); only its first cells are read, to tell raw counts from normalised values. Raises when too
    few genes match.
    """
    genes, panel_name, default_normalization = _resolve_panel(panel)
    normalization = default_normalization if normalize == "auto" else normalize
    if normalization not in ("library", "panel"):
        raise ValueError(f"normalize must be 'auto', 'library' or 'panel', got {normalize!r}.")
    table, nom_source = nomenclature(aliases)
    alignment = align_genes(ids, genes, nomenclature=table)
    _check_alignment(ids, genes, panel_name, alignment)
    kind = detect_kind(rows(X, 0, min(X.shape[0], KIND_SAMPLE)), where)
    _log_kind(where, kind, normalization)
    target = alignment.target
    primary = np.full(target.size, -1, dtype=np.int64)
    first_of_position = {pos: j for j, pos in enumerate(alignment.panel_index) if pos >= 0}
    for j, pos in enumerate(target):
        if pos >= 0:
            primary[j] = first_of_position[pos]
    return Binning(genes, panel_name, normalization, n_bins, alignment, kind, where, nom_source, primary)
