"""What kind of expression an input holds (raw counts, log1p / log2 normalised, normalised), and undoing the log exactly."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

InputKind = Literal["counts", "log1p", "log2", "normalized"]
_RATIO_TOL = 2e-3  # relative tolerance for recovering integer counts from log-normalised values


def row_ids(m: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


def _integer_ratio_rows(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether values are integer multiples of the row's smallest value, and the rounded ratios."""
    nnz = np.diff(m.indptr)
    nonempty = nnz > 0
    mins = np.ones(m.shape[0])
    if m.data.size:
        mins[nonempty] = np.minimum.reduceat(m.data, m.indptr[:-1][nonempty])
    ratio = m.data / np.repeat(mins, nnz)
    rounded = np.round(ratio)
    dev = np.abs(ratio - rounded) / np.maximum(rounded, 1.0)
    worst = np.zeros(m.shape[0])
    if dev.size:
        worst[nonempty] = np.maximum.reduceat(dev, m.indptr[:-1][nonempty])
    return worst <= _RATIO_TOL, rounded


def _constant_totals(m: sp.csr_matrix) -> bool:
    totals = np.asarray(m.sum(axis=1)).ravel()
    totals = totals[totals > 0]
    return totals.size >= 2 and totals.std() <= 1e-3 * totals.mean()


_INVERSE = {"log1p": np.expm1, "log2": lambda y: np.exp2(y) - 1.0}


def _with_data(m: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix((data, m.indices, m.indptr), shape=m.shape)


def check_values(m: sp.csr_matrix, where: str) -> None:
    if m.data.size and not np.isfinite(m.data).all():
        bad = int((~np.isfinite(m.data)).sum())
        raise ValueError(
            f"{where} contains {bad} NaN or infinite values. scBERT needs raw counts or log-normalised "
            "expression; fix or remove those cells (e.g. adata = adata[np.isfinite(adata.X.sum(1))]) and run again."
        )
    if m.data.size and m.data.min() < 0:
        raise ValueError(
            f"{where} has negative values (min {m.data.min():.3g}): it looks scaled or centred (sc.pp.scale, "
            "regress_out, PCA input). scBERT needs raw counts or log-normalised values: pass layer='counts' (or "
            "the layer holding counts), use_raw=True if adata.raw holds them, or bin before scaling."
        )


def detect_kind(sample: sp.csr_matrix, where: str = "the input") -> InputKind:
    """Tell raw counts from log1p / log2 normalised data (or normalised, not logged) from a sample of cells.

    Log-normalised values are recognised by what they become when the logarithm is undone: either
    every cell sums to the same total (``sc.pp.normalize_total``), or a cell's values are integer
    multiples of its smallest one (counts divided by a per-cell size factor).
    """
    sample = sp.csr_matrix(sample, dtype=np.float64)
    sample.eliminate_zeros()
    check_values(sample, where)
    d = sample.data
    if d.size == 0:
        raise ValueError(f"{where} has no non-zero values in the cells checked; there is nothing to bin.")
    if np.all(d == np.round(d)):
        return "counts"
    if d.max() < 50:
        for kind, inverse in _INVERSE.items():
            lin = _with_data(sample, inverse(d))
            if _constant_totals(lin) or _integer_ratio_rows(lin)[0].mean() >= 0.9:
                return kind
    if _constant_totals(sample) or _integer_ratio_rows(sample)[0].mean() >= 0.9:
        return "normalized"
    raise ValueError(
        f"The values of {where} are neither integer counts nor log1p / log2 of per-cell normalised counts "
        f"(e.g. {np.round(d[:5], 4).tolist()}). Pass raw counts (a layer such as layer='counts', or use_raw=True), "
        "or data processed only by sc.pp.normalize_total and sc.pp.log1p."
    )


def linear(chunk: sp.csr_matrix, kind: InputKind, where: str) -> sp.csr_matrix:
    """Values proportional to each cell's counts."""
    if kind == "counts":
        if chunk.data.size and not np.all(chunk.data == np.round(chunk.data)):
            raise ValueError(
                f"{where} looked like raw counts in the first cells but has non-integer values later on; "
                "the matrix mixes counts and normalised values. Pass one kind of data."
            )
        return chunk
    lin = _with_data(chunk, _INVERSE[kind](chunk.data)) if kind in _INVERSE else chunk
    ok, rounded = _integer_ratio_rows(lin)
    # where a cell's values are exact multiples of its smallest one, use the recovered integer counts
    use = np.repeat(ok, np.diff(lin.indptr))
    lin.data = np.where(use, rounded, lin.data)
    return lin
