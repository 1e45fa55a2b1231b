"""``.h5ad`` files read with h5py, a part at a time: their cells, genes, bins record, and rows of their matrices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._inputs import matrix_key
from ._slots import BINS_MARKER, LAYER
from ._tokens import TokenSource, check_col_map, to_panel_csr

if TYPE_CHECKING:
    import os


def _bins_record(f: Any, read_elem: Any) -> dict[str, Any] | None:
    """The bins record in the file's ``uns`` (any key; found by its marker), read alone."""
    uns = f.get("uns")
    for key in uns.keys() if uns is not None else ():
        node = uns[key]
        if hasattr(node, "keys") and BINS_MARKER in node:
            return read_elem(node)
    return None


class H5adFile:
    """What the pretraining needs of an ``.h5ad`` file, read with h5py: its cell count, ``var``, the bins record, and rows of its matrices."""

    def __init__(self, path: Path) -> None:
        import h5py
        from anndata.io import read_elem

        self.path = path
        try:
            with h5py.File(path, "r") as f:
                if "obs" not in f or "var" not in f:
                    raise ValueError(f"{path} is not an AnnData .h5ad file (no obs/var groups).")
                obs = f["obs"]
                self.n_obs = int(obs[obs.attrs["_index"]].shape[0])
                self.var = read_elem(f["var"])
                self.raw_var = read_elem(f["raw/var"]) if "raw/var" in f else None
                self.uns = _bins_record(f, read_elem)
                self.layers = list(f["layers"].keys()) if "layers" in f else []
        except OSError as e:
            raise ValueError(f"{path} could not be read as an .h5ad file ({e}).") from e

    def obs_names(self) -> pd.Index:
        """The cell names."""
        import h5py
        from anndata.io import read_elem

        with h5py.File(self.path, "r") as f:
            return pd.Index(read_elem(f["obs"][f["obs"].attrs["_index"]])).astype(str)

    def rows(self, key: str, start: int | np.ndarray, stop: int | None = None) -> sp.csr_matrix:
        """Rows of the matrix at ``key`` ("X", "raw/X" or "layers/NAME"): a range, or sorted indices."""
        import h5py
        from anndata.io import sparse_dataset

        with h5py.File(self.path, "r") as f:
            if key not in f:
                raise KeyError(f"{self.path} has no {key!r}.")
            node = f[key]
            if stop is not None and node.attrs.get("encoding-type") == "csr_matrix":
                return _csr_rows(node, int(start), stop)
            ds = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
            block = ds[start:stop] if stop is not None else ds[np.asarray(start)]
        return sp.csr_matrix(block)


def _csr_rows(group: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix stored in an ``.h5ad`` group, reading only their part of ``indptr``.

    (:func:`anndata.io.sparse_dataset` reads the whole ``indptr``, 8 bytes per cell of the file, at each call.)
    """
    n_rows, n_cols = (int(n) for n in group.attrs["shape"])
    start, stop = min(max(start, 0), n_rows), min(max(stop, start), n_rows)
    indptr = group["indptr"][start : stop + 1].astype(np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    shape = (stop - start, n_cols)
    return sp.csr_matrix((group["data"][lo:hi], group["indices"][lo:hi], indptr - lo), shape=shape)


class FileMatrix:
    """Rows of a matrix in an ``.h5ad`` file, by index or by a range (:func:`~scbert_tl.data._record.bins_stale`, streamed tools)."""

    def __init__(self, file: H5adFile, params: dict[str, Any]) -> None:
        self.file, self.key = file, matrix_key(params)
        var = file.raw_var if params.get("use_raw") else file.var
        self.shape = (file.n_obs, 0 if var is None else len(var))

    def __getitem__(self, rows: np.ndarray | slice) -> sp.csr_matrix:
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            return self.file.rows(self.key, start, max(start, stop))
        return self.file.rows(self.key, np.asarray(rows))


class H5adSource(TokenSource):
    """A bins layer read straight from an ``.h5ad`` file, a range of rows at a time (never the whole layer).

    :func:`anndata.read_h5ad` with ``backed="r"`` keeps only ``X`` on disk and loads layers into
    memory; this reads ``layers/<layer>`` with :func:`anndata.io.sparse_dataset` instead. The file
    is opened on the first read and kept open until :meth:`close`.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    col_map
        Each user gene's panel position, or -1.
    n_genes
        Panel size.
    layer
        The bins layer.
    """

    def __init__(self, path: str | os.PathLike, col_map: np.ndarray, n_genes: int, *, layer: str = LAYER):
        import h5py

        self.path = Path(path)
        self.layer = layer
        self.name = self.path.name
        self.n_genes = int(n_genes)
        self._file = None
        self._ds = None
        with h5py.File(self.path, "r") as f:
            key = f"layers/{layer}"
            if key not in f:
                raise KeyError(f"{self.path} has no layers[{layer!r}]; run scbert.pp.bin on it and write it again.")
            node = f[key]
            if isinstance(node, h5py.Dataset):
                shape = node.shape
            else:
                enc = node.attrs.get("encoding-type", "")
                if enc != "csr_matrix":
                    raise ValueError(
                        f"{self.path}: layers[{layer!r}] is stored as {enc or 'an unknown encoding'}; row-wise "
                        "streaming needs CSR (scbert.pp.bin writes CSR)."
                    )
                shape = tuple(int(s) for s in node.attrs["shape"])
        self.n_cells = int(shape[0])
        self.col_map = check_col_map(col_map, int(shape[1]), self.n_genes, self.name)

    def _dataset(self):
        if self._ds is None:
            import h5py

            self._file = h5py.File(self.path, "r")
            node = self._file[f"layers/{self.layer}"]
            if isinstance(node, h5py.Dataset):
                self._ds = node
            else:
                from anndata.io import sparse_dataset

                self._ds = sparse_dataset(node)
        return self._ds

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop``, read from disk."""
        return to_panel_csr(self._dataset()[start:stop], self.col_map, self.n_genes)

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """Cells at sorted ``rows``, read from disk."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.int8)
        return to_panel_csr(self._dataset()[rows], self.col_map, self.n_genes)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
        self._file = self._ds = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = state["_ds"] = None
        return state
