"""``scbert.pp.bin``: align genes to a model panel and turn expression into scBERT tokens."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .._settings import settings
from ..data import (
    LAYER,
    PANEL_INDEX,
    gene_ids,
    input_fingerprint,
    matrix,
    panel_checksum,
    rows,
    write_bins,
)
from ._binning import Binning, prepare_binning

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData

    from ._binning import ModelPanel

logger = logging.getLogger(__name__)

QC_MIN_GENES = 200  # the paper's quality control: cells with fewer expressed genes are flagged


def _bin_chunks(
    X: Any, binning: Binning, chunk_size: int
) -> tuple[sp.csr_matrix, np.ndarray, tuple[float, float, int]]:
    """Bins of every cell, read ``chunk_size`` cells at a time; expressed genes per cell; count totals (panel, all, empty cells)."""
    n_obs = X.shape[0]
    chunks, n_genes_expr = [], []
    panel_total = all_total = 0.0
    zero_cells = 0
    bar = tqdm(total=n_obs, desc="pp.bin", unit="cells", disable=not settings.progress or n_obs <= chunk_size)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        chunk = binning(rows(X, start, stop), start)
        chunks.append(chunk.bins)
        n_genes_expr.append(chunk.n_genes)
        panel_total += chunk.panel_totals.sum()
        all_total += chunk.total
        zero_cells += int((chunk.panel_totals == 0).sum())
        bar.update(stop - start)
    bar.close()
    bins = sp.vstack(chunks, format="csr", dtype=np.int8) if len(chunks) > 1 else chunks[0]
    return bins, np.concatenate(n_genes_expr), (panel_total, all_total, zero_cells)


def _coverage(alignment: Any, genes: list[str], ids: pd.Index, totals: tuple[float, float, int]) -> dict[str, Any]:
    panel_total, all_total, zero_cells = totals
    n_matched = int((alignment.panel_index >= 0).sum())
    return {
        "panel_genes_matched": n_matched,
        "panel_size": len(genes),
        "panel_fraction": n_matched / len(genes),
        "user_genes": int(len(ids)),
        "user_genes_matched": int((alignment.target >= 0).sum()),
        "counts_fraction": float(panel_total / all_total) if all_total > 0 else 0.0,
        "by_method": alignment.counts(),
        "duplicates_summed": alignment.duplicates,
        "shadowed": len(alignment.shadowed),
        "cells_without_panel_counts": zero_cells,
    }


def _log_coverage(coverage: dict[str, Any], alignment: Any, key_added: str, n_obs: int) -> None:
    n_matched, n_panel, zero_cells = (
        coverage["panel_genes_matched"],
        coverage["panel_size"],
        coverage["cells_without_panel_counts"],
    )
    logger.info(
        "pp.bin: %d of %d panel genes matched (%.1f%%; exact %d, case %d, nomenclature %d, Ensembl %d); "
        "%.1f%% of the counts land in the panel",
        n_matched,
        n_panel,
        100 * coverage["panel_fraction"],
        *alignment.counts().values(),
        100 * coverage["counts_fraction"],
    )
    if alignment.duplicates:
        logger.info(
            "pp.bin: %d genes map to a panel gene another gene already has; their counts were summed",
            alignment.duplicates,
        )
    if coverage["panel_fraction"] < 0.5:
        logger.warning(
            "Only %d of the %d panel genes (%.1f%%) are in your data (the model reads the rest as not "
            "expressed, or as unknown when it was fine-tuned with gene masking). "
            "Predictions may be less reliable; see adata.uns[%r]['coverage'].",
            n_matched,
            n_panel,
            100 * coverage["panel_fraction"],
            key_added,
        )
    if zero_cells:
        logger.warning(
            "%d of %d cells (%.1f%%) have no counts in the panel genes: all their tokens are 0, so the model sees "
            "an empty cell and gives each of them the same prediction.",
            zero_cells,
            n_obs,
            100 * zero_cells / n_obs,
        )


def bin(
    adata: AnnData,
    *,
    panel: str | Sequence[str] | ModelPanel = "scbert-panglao",
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    n_bins: int = 5,
    normalize: Literal["auto", "library", "panel"] = "auto",
    aliases: str | os.PathLike | pd.DataFrame | None = "hgnc",
    min_genes: int | None = None,
    chunk_size: int = 5_000,
    key_added: str = "scbert",
    copy: bool = False,
) -> AnnData | None:
    """Align genes to a model panel and turn expression into scBERT's tokens.

    Each cell's expression is normalised to 10,000 and tokenised as
    ``min(floor(log2(1 + x)), n_bins)``, the published scBERT preprocessing. Raw counts are used as
    they are; log1p (natural log, scanpy's default) or log2 normalised values are converted back
    exactly first. Which kind of input was found is logged and recorded.

    Genes are matched to the panel by exact symbol, then case-insensitively, then through previous
    and alias symbols and Ensembl IDs of the HGNC nomenclature. User genes that land on the same
    panel gene have their expression summed. The coverage (matched panel genes, the fraction of
    the counts that land in the panel) is logged and stored; below 50% it is a warning, and fewer
    than 100 matched panel genes (or 5% of a smaller panel) is an error: in PBMC3k a cell expresses a
    median of 6 of 100 random panel genes and 1 of 20, so with fewer the model sees nearly empty
    cells. When most genes match only case-insensitively (mouse-style ``Cd3e`` on the human panel)
    a warning says the species may differ. The data is read in chunks of cells and never densified,
    so backed, dask and very large AnnData objects work.

    Parameters
    ----------
    adata
        Cells x genes. Not changed except for the slots listed under Returns.
    panel
        The model's gene panel: a registry name (``"scbert-panglao"``), a list of gene symbols in
        model order, or an :class:`~scbert_tl.ScBERT` whose panel is used.
    gene_key
        Column of ``adata.var`` holding the gene identifiers (symbols or Ensembl IDs); default
        ``adata.var_names``.
    layer
        Layer to read instead of ``adata.X``.
    use_raw
        Read ``adata.raw.X`` (it must have the same genes as ``adata``).
    n_bins
        Expression bins (the published model: 5).
    normalize
        The total each cell is normalised by: ``"library"``, its counts over all its measured genes
        (scanpy's ``total_counts``), or ``"panel"``, its counts over the panel genes (what the original
        scBERT did: it subset the data to the panel, then normalised). ``"auto"``: the model's own
        choice when ``panel`` is an :class:`~scbert_tl.ScBERT`, ``"panel"`` for a published panel
        name, ``"library"`` for a list of genes. For a small panel ``"library"`` keeps the bins
        informative; over a small panel, per-panel totals push every expressed gene to the top bin.
    aliases
        Nomenclature for previous/alias symbols and Ensembl IDs: ``"hgnc"`` (the HGNC table from the
        registry, fetched once per process, or the local copy :attr:`scbert.settings.hgnc_path
        <scbert_tl._settings.ScBERTSettings.hgnc_path>` names; when it cannot be had, exact and case
        matching only, with one warning that says how to fix it), a path to an HGNC-format TSV, a
        :class:`~pandas.DataFrame` from :func:`scbert_tl.datasets.read_hgnc`, or ``None``.
    min_genes
        Remove cells with fewer expressed genes than this (the paper used 200). By default no cell is
        removed; cells with fewer than 200 are only flagged.
    chunk_size
        Cells read and binned at a time.
    key_added
        Key of the record in ``adata.uns`` and prefix of the ``obs`` columns. The tools find the
        record under whatever key it has, so bins made with another ``key_added`` are used as they are.
    copy
        Return a binned copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the binned copy with ``copy=True``. Writes:

    ``adata.layers["scbert_bins"]``
        Sparse (CSR) int8 tokens in ``adata``'s own genes; columns of genes outside the panel are empty.
    ``adata.var["scbert_panel_index"]``
        Each gene's position in the panel, -1 when it is not used.
    ``adata.obs[f"{key_added}_n_genes"]``, ``adata.obs[f"{key_added}_low_quality"]``
        Expressed genes per cell, and whether that is below 200 (or ``min_genes``).
    ``adata.uns[key_added]``
        Panel, input kind, coverage, nomenclature source, a fingerprint of the input (so that tools bin
        again after the input changes), and the parameters under ``["params"]["bin"]`` (keys written
        there by other functions, such as :func:`~scbert_tl.tl.annotate`, are kept). The record of an
        earlier ``pp.bin`` under another key is removed: it described the bins this call replaces.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scbert_tl as scbert
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> scbert.pp.bin(adata, use_raw=True)  # doctest: +SKIP
    """
    _check_args(adata, n_bins, chunk_size)
    if copy:
        adata = adata.copy()
    if min_genes is not None and adata.isbacked:
        raise ValueError(
            "min_genes removes cells, which an AnnData opened with backed='r' cannot do in place: bin without "
            "min_genes (cells are flagged in obs), or load the data into memory first (adata.to_memory())."
        )
    X, where = matrix(adata, layer, use_raw)
    ids = gene_ids(adata, gene_key)
    binning = prepare_binning(X, where, ids, panel=panel, n_bins=n_bins, normalize=normalize, aliases=aliases)
    genes, panel_name, normalization, alignment = (
        binning.genes,
        binning.panel_name,
        binning.normalization,
        binning.alignment,
    )
    bins, n_expr, totals = _bin_chunks(X, binning, chunk_size)
    if min_genes is not None and (n_expr < min_genes).all():
        raise ValueError(
            f"min_genes={min_genes} would remove every cell (the most genes any cell expresses is {n_expr.max()}); "
            "pass a lower min_genes, or None to only flag cells with fewer than 200."
        )
    coverage = _coverage(alignment, genes, ids, totals)
    _log_coverage(coverage, alignment, key_added, adata.n_obs)
    if LAYER in adata.layers:
        logger.info("pp.bin: replacing the existing adata.layers[%r]", LAYER)
    qc_threshold = QC_MIN_GENES if min_genes is None else int(min_genes)
    adata.layers[LAYER] = bins
    adata.var[PANEL_INDEX] = alignment.panel_index
    adata.obs[f"{key_added}_n_genes"] = n_expr
    adata.obs[f"{key_added}_low_quality"] = n_expr < qc_threshold
    write_bins(
        adata,
        key_added,
        {
            "panel": panel_name,
            "panel_size": len(genes),
            "panel_checksum": panel_checksum(genes),
            "var_checksum": panel_checksum(list(map(str, adata.var_names))),
            "n_bins": n_bins,
            "normalize": normalization,
            "input": where,
            "input_kind": binning.kind,
            "fingerprint": input_fingerprint(X, adata.obs_names),
            "coverage": coverage,
            "nomenclature": binning.nom_source,
        },
        {
            "panel": panel_name,
            "gene_key": gene_key,
            "layer": layer,
            "use_raw": use_raw,
            "n_bins": n_bins,
            "normalize": normalization,
            "min_genes": min_genes,
            "aliases": aliases if isinstance(aliases, str) or aliases is None else "table",
        },
    )
    _quality_control(adata, n_expr, min_genes, qc_threshold, key_added)
    return adata if copy else None


def _check_args(adata: AnnData, n_bins: int, chunk_size: int) -> None:
    if n_bins < 1 or n_bins > 126:
        raise ValueError(f"n_bins must be between 1 and 126, got {n_bins}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")


def _quality_control(
    adata: AnnData, n_expr: np.ndarray, min_genes: int | None, qc_threshold: int, key_added: str
) -> None:
    """Remove the cells with fewer than ``min_genes`` expressed genes, or say how many are flagged."""
    n_low = int((n_expr < qc_threshold).sum())
    if min_genes is not None and n_low:
        logger.info("pp.bin: removing %d cells with fewer than %d expressed genes", n_low, min_genes)
        adata._inplace_subset_obs(n_expr >= min_genes)
    elif n_low:
        logger.info(
            "pp.bin: %d cells have fewer than %d expressed genes; flagged in obs[%r] (pass min_genes=200 to "
            "remove them)",
            n_low,
            qc_threshold,
            f"{key_added}_low_quality",
        )
