"""``scbert.tl.attention``: the attention each gene receives, per cell type (scBERT's gene importance)."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._docs import doc_params
from ..data import PANEL_INDEX
from ..model._attention import resolve_layers
from ..train import run_batches
from ..train._inference import check_compute
from ..train._predict import panel_attention
from ._data import tokens_for
from ._docs import FRAGMENTS
from ._resolve import model_for_inference

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT
    from ..data import TokenMatrix
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)

#: Cells per call of the batched inference: bounds the dense ``cells x panel`` block held at once.
CELLS_PER_CALL = 1024
ALL_CELLS = "all cells"


def _groups(adata: AnnData, groupby: str | None) -> tuple[str | None, np.ndarray, list[str]]:
    """The grouping column (``None``: all cells), each cell's group code (-1: none) and the group names."""
    if groupby is None and "scbert" in adata.obs and isinstance(adata.obs["scbert"].dtype, pd.CategoricalDtype):
        groupby = "scbert"
        logger.info("attention: grouping cells by adata.obs['scbert'] (written by scbert.tl.annotate)")
    if groupby is None:
        return None, np.zeros(adata.n_obs, dtype=np.int64), [ALL_CELLS]
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    column = adata.obs[groupby]
    cat = column.cat if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category").cat
    codes = cat.codes.to_numpy().astype(np.int64)
    names = [str(c) for c in cat.categories]
    present = np.bincount(codes[codes >= 0], minlength=len(names)) > 0  # drop empty categories
    remap = np.full(len(names) + 1, -1, dtype=np.int64)
    remap[np.flatnonzero(present)] = np.arange(present.sum())
    codes = remap[codes]  # -1 stays -1 (remap[-1] is the extra slot)
    if (codes < 0).all():
        raise ValueError(f"adata.obs[{groupby!r}] has no values; nothing to group.")
    if (codes < 0).any():
        logger.info("attention: %d cells without a %r value are left out", int((codes < 0).sum()), groupby)
    return groupby, codes, [n for n, p in zip(names, present, strict=True) if p]


def _group_sums(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    codes: np.ndarray,
    n_groups: int,
    blocks: list[int],
    *,
    per_cell: bool,
    batch_size: int | None,
    device: str | None,
    precision: str | None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per group (``codes``; -1: none), the sum over its cells of the attention each panel gene receives.

    Cells are run ``CELLS_PER_CALL`` at a time; with ``per_cell`` every cell is run and its values kept.
    """
    sums = np.zeros((n_groups, tokens.n_genes), dtype=np.float64)
    rows = np.flatnonzero(codes >= 0) if not per_cell else np.arange(codes.size)
    fn = partial(panel_attention, layers=blocks)
    kept = []
    for start in range(0, rows.size, CELLS_PER_CALL):
        chunk = rows[start : start + CELLS_PER_CALL]
        (values,) = run_batches(
            network, tokens, fn, rows=chunk, batch_size=batch_size, device=device, precision=precision, desc="attention"
        )
        c = codes[chunk]
        inside = np.flatnonzero(c >= 0)
        indicator = sp.csr_matrix((np.ones(inside.size), (c[inside], inside)), shape=(n_groups, chunk.size))
        sums += indicator @ values  # group sums of this chunk
        if per_cell:
            kept.append(values)
    return sums, kept


@doc_params(**FRAGMENTS)
def attention(
    adata: AnnData,
    model: str | os.PathLike | ScBERT,
    *,
    groupby: str | None = None,
    layers: str | int | Sequence[int] = "all",
    n_top: int = 20,
    per_cell: bool = False,
    key_added: str = "scbert_attention",
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Attention each gene receives, averaged per cell type: scBERT's gene importance.

    For every cell, the FAVOR+ attention matrices of the selected blocks are averaged over heads and
    blocks and each column is summed: the attention a gene receives from all genes of that cell
    (the scBERT paper's interpretation). The column sums of the row-normalised FAVOR+ matrix
    ``D^-1 Q' K'^T`` are computed exactly in linear time (``K' (Q'^T d^-1)``, see
    :func:`scbert_tl.model.attention_received`), so no ``genes x genes`` matrix is made and the full
    16,907-position model costs little more than a forward pass. The per-cell values are averaged per
    group; the whole ``cells x genes`` matrix is not kept unless ``per_cell=True``. A cell's values sum
    to the number of positions, so 1 is the attention an average gene receives.

    Any model works (a classifier is not needed): pretrained or fine-tuned.

    Parameters
    ----------
    {doc_cells}
    groupby
        ``adata.obs`` column to average by (e.g. the true cell types). Default: ``obs["scbert"]``, the
        predictions of :func:`scbert_tl.tl.annotate`, when present, else all cells together. Cells
        without a value are left out; empty categories are dropped.
    layers
        Encoder blocks to average over: ``"all"``, an index or a list of indices (negative ones
        count from the end). The encoder stops after the last selected block.
    n_top
        Genes ranked per group.
    per_cell
        Also store each cell's values for the union of the groups' top genes.
    key_added
        Key in ``adata.uns`` (and ``adata.obsm`` with ``per_cell=True``).
    {doc_inputs}
        ``layer`` is an ``adata.layers`` key, not an encoder block (that is ``layers``).
    {doc_batch_size}
    {doc_device}
    precision
        Autocast precision of the block's matrix products (default: bf16 on CUDA, float32 on CPU); the
        attention features and column sums are always float32.
    {doc_copy}

    Returns
    -------
    ``None``, or the copy with ``copy=True``. Writes ``adata.uns[key_added]``, a dict of:

    ``"mean"``
        :class:`~pandas.DataFrame`, model panel genes (index, panel order) x groups: mean attention
        received per cell of the group.
    ``"top_genes"``
        :class:`~pandas.DataFrame`, ``n_top`` ranks x groups: gene names by decreasing mean attention
        (as the ``"names"`` of :func:`scanpy.tl.rank_genes_groups`). Only genes measured in ``adata``
        are ranked: panel genes it lacks (always token 0) stay in ``"mean"`` but are never top genes.
    ``"top_scores"``
        :class:`~pandas.DataFrame` like ``"top_genes"``: their mean attention.
    ``"n_cells"``
        Cells per group (a dict).
    ``"measured"``
        Boolean array over the panel genes of ``"mean"``: measured in ``adata``.
    ``"per_cell_genes"``
        With ``per_cell=True``: names of the columns of ``adata.obsm[key_added]``.
    ``"params"``
        ``groupby`` (``None`` for all cells), ``layers`` (the block indices), ``n_top``, ``per_cell``,
        ``model``.

    With ``per_cell=True`` also ``adata.obsm[key_added]``: cells x ``len(per_cell_genes)`` float32,
    each cell's attention received by the union of the top genes (this keeps a dense cells x panel
    float32 matrix in memory while it runs).
    """
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}.")
    check_compute(device, precision, batch_size)  # before anything is written
    groupby, codes, names = _groups(adata, groupby)
    if copy:
        adata = adata.copy()
    m = model_for_inference(model, adata)
    blocks = resolve_layers(layers, m.config.depth)
    tokens = tokens_for(adata, m, gene_key=gene_key, layer=layer, use_raw=use_raw)
    n_genes = len(m.genes)
    panel_index = adata.var[PANEL_INDEX].to_numpy()
    measured = np.zeros(n_genes, dtype=bool)
    measured[panel_index[panel_index >= 0]] = True

    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    sums, kept = _group_sums(
        m.network,
        tokens,
        codes,
        len(names),
        blocks,
        per_cell=per_cell,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    mean = sums / counts[:, None]

    n_ranked = min(n_top, int(measured.sum()))  # panel genes adata lacks are never ranked
    order = np.argsort(-np.where(measured, mean, -np.inf), axis=1, kind="stable")[:, :n_ranked]
    genes = np.asarray(m.genes, dtype=object)
    record = {
        "mean": pd.DataFrame(mean.T.astype(np.float32), index=pd.Index(m.genes), columns=names),
        "top_genes": pd.DataFrame({g: genes[order[i]] for i, g in enumerate(names)}),
        "top_scores": pd.DataFrame({g: mean[i, order[i]].astype(np.float32) for i, g in enumerate(names)}),
        "n_cells": {g: int(c) for g, c in zip(names, counts, strict=True)},
        "measured": measured,
        "params": {
            "groupby": groupby,
            "layers": blocks,
            "n_top": int(n_top),
            "per_cell": bool(per_cell),
            "model": str(m.provenance.get("source", "")),
        },
    }
    if per_cell:
        union = list(dict.fromkeys(order.T.ravel().tolist()))  # rank by rank, so each group's best come first
        if key_added in adata.obsm:
            logger.info("attention: replacing adata.obsm[%r]", key_added)
        adata.obsm[key_added] = np.concatenate(kept)[:, union].astype(np.float32)
        record["per_cell_genes"] = [m.genes[j] for j in union]
    if key_added in adata.uns:
        logger.info("attention: replacing adata.uns[%r]", key_added)
    adata.uns[key_added] = record
    logger.info(
        "attention: %d cells in %d group(s), blocks %s; top genes in adata.uns[%r]['top_genes']",
        int(counts.sum()),
        len(names),
        blocks,
        key_added,
    )
    return adata if copy else None
