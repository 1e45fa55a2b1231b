"""Tokens for a model from what a tool was given (AnnData in memory or backed, ``.h5ad`` paths), binning when needed.

The one place that joins the data layer (where the bins are, are they current) with the binning of
:mod:`scbert_tl.pp`: the tools ask here, and :func:`scbert_tl.pp.bin` runs only when the bins are
missing or stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import pp
from .._logging import quieted
from ..data import (
    LAYER,
    PANEL_INDEX,
    FileMatrix,
    H5adFile,
    H5adSource,
    MemorySource,
    TokenMatrix,
    TokenSource,
    bins_record,
    bins_stale,
    check_col_map,
    input_params,
    matrix_key,
    recorded_input,
    recorded_params,
    to_panel_csr,
)

if TYPE_CHECKING:
    import scipy.sparse as sp
    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)

MEASURED_WARNING = 0.9  # below this share of a model's genes measured, tokens_for warns


def tokens_for(
    adata: AnnData,
    model: ScBERT,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    unmeasured: Literal["zero", "mask"] | None = None,
) -> TokenMatrix:
    """The model's tokens for ``adata``, binning it first when needed.

    :func:`~scbert_tl.pp.bin` runs (logged) when the bins are missing, were made for another panel, for other genes
    (the genes were subset or reordered since), from other input than asked for, or from values that
    changed since (the input's fingerprint, see :func:`~scbert_tl.data.input_fingerprint`). Input choices not given are
    those of the last :func:`~scbert_tl.pp.bin`.
    Model genes that ``adata`` does not have are fed as ``unmeasured`` says (default: the model's
    :attr:`~scbert_tl.ScBERT.unmeasured`): ``"mask"`` as unknown (the ``[MASK]`` token), ``"zero"`` as not
    expressed. The share of the model's genes that ``adata`` measures is logged, as a warning below 90%.
    """
    info = bins_record(adata)
    params = input_params(adata, gene_key=gene_key, layer=layer, use_raw=use_raw)
    recorded = info.get("params", {}).get("bin", {}) if isinstance(info, dict) else {}
    if LAYER not in adata.layers or PANEL_INDEX not in adata.var:
        reason = "are missing"
    elif not all(recorded.get(k) == v for k, v in params.items()):
        reason = "were made from another input"
    else:
        reason = bins_stale(info, model, recorded_input(adata), adata.var_names, adata.obs_names)
    if reason is not None:
        logger.info("Binning adata for this model's panel (%d genes): the bins %s", len(model.genes), reason)
        pp.bin(adata, panel=model, n_bins=model.n_bins, normalize=model.normalization, **params)
    mode = model.unmeasured if unmeasured is None else unmeasured
    if mode not in ("zero", "mask"):
        raise ValueError(f"unmeasured must be 'zero' or 'mask', got {mode!r}.")
    tokens = TokenMatrix(
        adata.layers[LAYER],
        adata.var[PANEL_INDEX].to_numpy(),
        len(model.genes),
        unmeasured_token=model.config.mask_token if mode == "mask" else None,
    )
    _report_coverage(tokens, mode)
    return tokens


def _report_coverage(tokens: TokenMatrix, mode: str) -> None:
    """Say how many of the model's genes the data measures, and how the others are fed; a warning below 90%."""
    n_measured, n = int(tokens.measured.sum()), tokens.n_genes
    if n_measured == n:
        logger.info("The data measures all %d of the model's genes", n)
        return
    log = logger.warning if n_measured < MEASURED_WARNING * n else logger.info
    log(
        "The data measures %d of the model's %d genes (%.1f%%); the other %d are fed as %s.%s",
        n_measured,
        n,
        100 * n_measured / n,
        n - n_measured,
        "unknown ([MASK])" if mode == "mask" else "not expressed (token 0)",
        ""
        if mode == "mask"
        else " A model fine-tuned with gene masking (scbert.tl.finetune(..., mask_genes=...)) can read them as "
        "unknown instead (model.unmeasured = 'mask').",
    )


def as_items(data: Any) -> list[AnnData | Path]:
    from anndata import AnnData

    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError("No data to pretrain on: the list of inputs is empty.")
    out: list[AnnData | Path] = []
    for item in items:
        if isinstance(item, AnnData):
            out.append(item)
        elif isinstance(item, str | os.PathLike):
            path = Path(item).expanduser()
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder; expected an .h5ad file.")
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (expected an .h5ad file).")
            out.append(path)
        else:
            raise TypeError(f"Expected AnnData objects or .h5ad paths, got {type(item).__name__}.")
    return out


def item_name(item: AnnData | Path, i: int, n: int) -> str:
    if isinstance(item, Path):
        return item.name
    if item.isbacked:
        return Path(item.filename).name
    return "adata" if n == 1 else f"adata[{i}]"


class BinningH5adSource(TokenSource):
    """An ``.h5ad`` file without bins for the model: chunks of its expression are binned on the fly by :func:`scbert_tl.pp.bin`.

    The expression is read where the file's last :func:`~scbert_tl.pp.bin` read it (``X`` by
    default; ``raw/X`` or a layer if recorded), a range of rows at a time.
    """

    def __init__(self, file: H5adFile, model: ScBERT, params: dict[str, Any]) -> None:
        self.file = file
        self.name = file.path.name
        self.model = model
        self.key = matrix_key(params)
        var = file.raw_var if params.get("use_raw") else file.var
        if var is None:
            raise ValueError(f"{file.path}: the bins were made from adata.raw but the file has no raw.")
        gene_key = params.get("gene_key")
        cols = [gene_key] if gene_key is not None and gene_key in var else []
        self.var = pd.DataFrame(var[cols], index=var.index.astype(str))
        self.gene_key = gene_key if cols else None
        self.n_cells = file.n_obs
        self.n_genes = len(model.genes)
        first = self._bin(0, min(self.n_cells, 500), quiet=False)
        self.col_map = check_col_map(first.var[PANEL_INDEX].to_numpy(), len(self.var), self.n_genes, self.name)

    def _bin(self, start: int, stop: int, *, quiet: bool = True) -> AnnData:
        from anndata import AnnData

        block = self.file.rows(self.key, start, stop)
        chunk = AnnData(X=block.astype(np.float64), var=self.var.copy())
        with quieted(logging.getLogger("scbert_tl.pp")) if quiet else contextlib.nullcontext():
            try:
                pp.bin(
                    chunk,
                    panel=self.model,
                    n_bins=self.model.n_bins,
                    normalize=self.model.normalization,
                    gene_key=self.gene_key,
                )
            except (ValueError, KeyError) as e:
                raise ValueError(f"{self.name} (cells {start}..{stop - 1}): {e}") from e
        return chunk

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop``, binned."""
        return to_panel_csr(self._bin(start, stop).layers[LAYER], self.col_map, self.n_genes)


def source_for(item: AnnData | Path, model: ScBERT, name: str, *, main: bool) -> TokenSource:
    n_genes = len(model.genes)
    if not isinstance(item, Path) and not item.isbacked:
        if item.n_obs == 0:
            raise ValueError(f"{name} has no cells.")
        info = bins_record(item)
        reason = (
            bins_stale(info, model, recorded_input(item), item.var_names, item.obs_names)
            if LAYER in item.layers and PANEL_INDEX in item.var
            else "are missing"
        )
        if reason is not None:
            if main:
                logger.info(
                    "%s: binning for this model's panel (%d genes) with scbert.pp.bin: the bins %s",
                    name,
                    n_genes,
                    reason,
                )
            pp.bin(item, panel=model, n_bins=model.n_bins, normalize=model.normalization, **recorded_params(info))
        return MemorySource(item.layers[LAYER], item.var[PANEL_INDEX].to_numpy(), n_genes, name=name)

    if not isinstance(item, Path) and item.is_view:
        raise ValueError(
            f"{name} is a view of a backed AnnData; pass the whole file, or an in-memory copy (view.to_memory())."
        )
    path = Path(item.filename) if not isinstance(item, Path) else item
    file = H5adFile(path)
    if file.n_obs == 0:
        raise ValueError(f"{path} has no cells.")
    reason = "are missing"
    if LAYER in file.layers and PANEL_INDEX in file.var:
        expression = FileMatrix(file, recorded_params(file.uns))
        reason = bins_stale(file.uns, model, expression, file.var.index, file.obs_names())
    if reason is None:
        return H5adSource(path, file.var[PANEL_INDEX].to_numpy(), n_genes, layer=LAYER)
    if main:
        logger.info(
            "%s: its bins %s; binning each chunk on the fly with scbert.pp.bin (bin the file once and write "
            "it again to skip this work every epoch)",
            path.name,
            reason,
        )
    return BinningH5adSource(file, model, recorded_params(file.uns))
