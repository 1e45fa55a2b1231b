"""The expression a tool reads: ``X``, a layer or ``raw.X``, its gene identifiers, and rows of it in memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData


def matrix(adata: AnnData, layer: str | None, use_raw: bool) -> tuple[Any, str]:
    """The matrix the input choices name (``adata.X``, a layer or ``adata.raw.X``) and how to call it in messages."""
    if layer is not None and use_raw:
        raise ValueError("Pass either layer= or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but adata.raw is None.")
        if adata.raw.n_vars != adata.n_vars or not adata.raw.var_names.equals(adata.var_names):
            raise ValueError(
                f"adata.raw has {adata.raw.n_vars} genes but adata has {adata.n_vars}: the bins layer lives in "
                "adata's genes. Bin the full data instead: raw = adata.raw.to_adata(); scbert.pp.bin(raw)."
            )
        return adata.raw.X, "adata.raw.X"
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"Layer {layer!r} not found; adata.layers has {list(adata.layers)}.")
        return adata.layers[layer], f"adata.layers[{layer!r}]"
    return adata.X, "adata.X"


def matrix_key(params: dict[str, Any]) -> str:
    """Where the matrix the input choices name is stored in an ``.h5ad`` file."""
    if params.get("use_raw"):
        return "raw/X"
    if params.get("layer"):
        return f"layers/{params['layer']}"
    return "X"


def in_memory(chunk: Any) -> sp.csr_matrix:
    """A block of rows as float64 CSR, whether it came from memory, a backed file or a dask array (dense or sparse chunks)."""
    if hasattr(chunk, "to_memory"):  # a backed sparse dataset
        chunk = chunk.to_memory()
    if hasattr(chunk, "compute"):  # dask
        chunk = chunk.compute()
    return sp.csr_matrix(chunk, dtype=np.float64)


def rows(X: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``X`` as float64 CSR."""
    return in_memory(X[start:stop])


def gene_ids(adata: AnnData, gene_key: str | None) -> pd.Index:
    """The gene identifiers: ``var_names``, or the ``var`` column ``gene_key``."""
    if gene_key is None:
        return adata.var_names
    if gene_key not in adata.var:
        raise KeyError(f"gene_key={gene_key!r} is not a column of adata.var (columns: {list(adata.var.columns)}).")
    return pd.Index(adata.var[gene_key].astype(str))
