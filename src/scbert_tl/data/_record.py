"""The record :func:`scbert_tl.pp.bin` leaves in ``adata.uns``, and the one check of whether the bins are current.

The record is found by its marker field (:data:`~scbert_tl.data._slots.BINS_MARKER`) under any key of
``uns``, so that ``pp.bin(key_added=...)`` is recognised by every tool. It may share its key with
another tool's record (``annotate`` writes ``classes`` and ``params["annotate"]`` at ``uns["scbert"]``
too); each writer changes only its own fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._inputs import in_memory, matrix
from ._slots import BINS_FIELDS, BINS_MARKER, INPUT_KEYS, LAYER

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

FINGERPRINT_ROWS = 64  # cells whose values are hashed; with the shape and the total, what tells a changed input


def panel_checksum(genes: Sequence[str]) -> str:
    """A short fingerprint of a gene panel (its symbols, in order)."""
    return hashlib.sha1("\n".join(genes).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the record
def find_bins(uns: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    """The key and the record of :func:`scbert_tl.pp.bin` in ``uns`` (any key), or None."""
    for key, value in (uns or {}).items():
        if isinstance(value, Mapping) and BINS_MARKER in value:
            return key, dict(value)
    return None


def bins_record(adata: AnnData) -> dict[str, Any] | None:
    """The record of the last :func:`scbert_tl.pp.bin` on ``adata``, or None."""
    found = find_bins(adata.uns)
    return None if found is None else found[1]


def recorded_params(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The input choices (``gene_key``, ``layer``, ``use_raw``) a bins record holds, those that were set."""
    params = record.get("params", {}).get("bin", {}) if isinstance(record, Mapping) else {}
    return {k: params[k] for k in INPUT_KEYS if params.get(k) is not None}


def input_params(adata: AnnData, **given: Any) -> dict[str, Any]:
    """Input choices (``gene_key``, ``layer``, ``use_raw``): those given (not None), else those of the last :func:`~scbert_tl.pp.bin`."""
    params = recorded_params(bins_record(adata))
    params.update({k: v for k, v in given.items() if v is not None})
    return params


def recorded_input(adata: AnnData) -> Any:
    """The matrix the last :func:`~scbert_tl.pp.bin` read (``X``, a layer or ``raw.X``), or None when it is gone."""
    recorded = recorded_params(bins_record(adata))
    try:
        return matrix(adata, recorded.get("layer"), bool(recorded.get("use_raw")))[0]
    except (KeyError, ValueError):
        return None


def write_bins(adata: AnnData, key: str, fields: dict[str, Any], params: dict[str, Any]) -> None:
    """Write the bins record to ``adata.uns[key]``, keeping other tools' fields there.

    Bins records at other keys describe the layer that was just replaced: their bins fields are
    removed (and the record, when nothing else is left in it).
    """
    for other, value in list(adata.uns.items()):
        if other != key and isinstance(value, Mapping) and BINS_MARKER in value:
            rest = {k: v for k, v in value.items() if k not in BINS_FIELDS}
            rest_params = {k: v for k, v in dict(rest.pop("params", {})).items() if k != "bin"}
            if rest_params:
                rest["params"] = rest_params
            if rest:
                adata.uns[other] = rest
            else:
                del adata.uns[other]
    record = dict(adata.uns.get(key, {}))
    record.update(fields)
    record[BINS_MARKER] = LAYER
    record["params"] = {**dict(record.get("params", {})), "bin": params}
    adata.uns[key] = record


# ---------------------------------------------------------------------------------------------- fingerprint
def _row_hashes(m: sp.csr_matrix) -> list[str]:
    m = sp.csr_matrix(m, dtype=np.float64)
    m.sum_duplicates()
    m.eliminate_zeros()
    out = []
    for a, b in zip(m.indptr[:-1], m.indptr[1:], strict=True):
        h = hashlib.sha1(m.indices[a:b].astype(np.int64).tobytes())
        h.update(m.data[a:b].tobytes())
        out.append(h.hexdigest()[:16])
    return out


def _total(X: Any) -> float | None:
    """Sum of all values of an in-memory matrix (None for backed or lazy data, where it would mean reading it all)."""
    if isinstance(X, np.ndarray):
        return float(X.sum(dtype=np.float64))
    if sp.issparse(X):
        return float(np.asarray(X.data).sum(dtype=np.float64))
    return None


def input_fingerprint(X: Any, obs_names: pd.Index) -> dict[str, Any]:
    """A cheap record of the values ``X`` holds: its width, a hash of each of up to 64 evenly spaced cells (by name), and its total.

    It tells whether the input changed since the bins were made (normalised, scaled, replaced,
    edited) without reading the whole matrix of a backed or lazy object. Cells that were since
    removed (a subset) are not needed: the cells left are checked.
    """
    n = X.shape[0]
    positions = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).round().astype(np.int64))
    return {
        "n_obs": int(n),
        "n_vars": int(X.shape[1]),
        "positions": positions.tolist(),
        "names": [str(obs_names[i]) for i in positions],
        "rows": _row_hashes(in_memory(X[positions])),
        "total": _total(X),
    }


def input_unchanged(fingerprint: Any, X: Any, obs_names: pd.Index) -> bool:
    """Whether ``X`` (rows named ``obs_names``) still holds the values :func:`input_fingerprint` recorded."""
    if not isinstance(fingerprint, dict) or "rows" not in fingerprint:
        return False  # binned by an older version: no record to check against
    if int(fingerprint["n_vars"]) != X.shape[1]:
        return False
    names = np.asarray(fingerprint["names"]).astype(str)
    positions = np.asarray(fingerprint["positions"], dtype=np.int64)
    same_cells = X.shape[0] == int(fingerprint["n_obs"]) and np.array_equal(
        np.asarray(obs_names[positions]).astype(str), names
    )
    if same_cells:
        idx = positions
    elif obs_names.is_unique:
        idx = obs_names.get_indexer(pd.Index(names))
    else:
        return False  # other cells, and no unique names to find the recorded ones by
    present = np.flatnonzero(idx >= 0)
    if present.size == 0:
        return False  # none of the recorded cells is left to check: bin again (the subset is small)
    order = present[np.argsort(idx[present])]
    current = _row_hashes(in_memory(X[idx[order]]))
    if current != list(np.asarray(fingerprint["rows"]).astype(str)[order]):
        return False
    recorded, total = fingerprint.get("total"), _total(X) if same_cells else None
    return recorded is None or total is None or total == float(recorded)


# ---------------------------------------------------------------------------------------------- are they current
def bins_stale(record: Any, model: Any, X: Any, var_names: Sequence[str], obs_names: pd.Index) -> str | None:
    """Why the bins a record describes cannot be used for ``model``, or None when they can.

    ``model`` is anything with the model's ``genes``, ``n_bins`` and ``normalization`` (an
    :class:`~scbert_tl.ScBERT`). ``X`` is the matrix the bins were made from (see
    :func:`recorded_input`; None: it is gone), its genes named by ``var_names`` and its cells by ``obs_names``.
    """
    if not isinstance(record, Mapping) or "panel_checksum" not in record:
        return "are missing"
    if X is None:
        return "were made from an input that is no longer there"
    if (
        record.get("panel_checksum") != panel_checksum(model.genes)
        or int(record.get("n_bins", -1)) != model.n_bins
        or record.get("normalize") != model.normalization
    ):
        return "were made for another panel"
    if record.get("var_checksum") != panel_checksum([str(g) for g in var_names]):
        return "were made for other genes (the genes were subset or reordered since)"
    if not isinstance(record.get("fingerprint"), dict):
        return "were made by an earlier scbert-tl, which kept no fingerprint of their input"
    if not input_unchanged(record.get("fingerprint"), X, obs_names):
        return f"no longer match {record.get('input', 'the input')}: its values changed since scbert.pp.bin"
    return None
