"""``scbert.pp.bin``: align genes to a model panel and turn expression into scBERT tokens."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from .._settings import settings
from ._genes import align_genes, is_ensembl

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT
    from ..train import TokenMatrix

logger = logging.getLogger(__name__)

LAYER = "scbert_bins"
PANEL_INDEX = "scbert_panel_index"
TARGET_SUM = 1e4
QC_MIN_GENES = 200  # the paper's quality control: cells with fewer expressed genes are flagged
# Fewest panel genes pp.bin accepts (or 5% of a smaller panel): in PBMC3k, a cell expresses a median of
# 6 of 100 random panel genes and 1 of 20 (27% of cells none), so below this the model sees near-empty cells.
MIN_PANEL_GENES = 100
KIND_SAMPLE = 2000  # first cells read to tell raw counts from normalised values
MEASURED_WARNING = 0.9  # below this share of a model's genes measured, tokens_for warns
InputKind = Literal["counts", "log1p", "log2", "normalized"]
_RATIO_TOL = 2e-3  # relative tolerance for recovering integer counts from log-normalised values


def panel_checksum(genes: Sequence[str]) -> str:
    """A short fingerprint of a gene panel (its symbols, in order)."""
    return hashlib.sha1("\n".join(genes).encode()).hexdigest()[:16]


def _resolve_panel(panel: str | Sequence[str] | ScBERT) -> tuple[list[str], str, str]:
    """Genes, name and default normalisation of a panel argument."""
    from .. import datasets
    from .._scbert import ScBERT

    if isinstance(panel, ScBERT):
        return list(panel.genes), panel.panel or "model", panel.normalization
    if isinstance(panel, str):
        return datasets.panel_genes(panel), panel, "panel"  # a published panel: the original preprocessing
    genes = [str(g) for g in panel]
    if not genes:
        raise ValueError("panel is an empty list of genes.")
    if len(set(genes)) != len(genes):
        raise ValueError("panel has duplicated gene symbols; each panel position needs its own gene.")
    return genes, "custom", "library"


@functools.cache
def _registry_nomenclature(cachedir: str) -> pd.DataFrame | None:
    """The registry's HGNC table, or None when it cannot be had: tried once per process (and cache folder)."""
    from .. import datasets

    try:
        return datasets.hgnc_table()
    except (OSError, ValueError) as e:  # offline, blocked, or a bad download (already removed)
        logger.warning(
            "The HGNC nomenclature table could not be fetched (%s). In this session genes are matched by exact and "
            "case-insensitive symbol only: renamed genes (previous or alias symbols) and Ensembl IDs are not aligned, "
            "so fewer genes may match than with the table. To use it offline, download %s elsewhere and set "
            "scbert.settings.hgnc_path to that file (or put it at %s). Not tried again in this process.",
            type(e).__name__,
            datasets.REGISTRY["hgnc-complete-set"].url,
            Path(cachedir) / "hgnc-complete-set",
        )
        return None


@functools.cache
def _hgnc_file(path: str, mtime: float) -> pd.DataFrame:
    from .. import datasets

    return datasets.read_hgnc(path)


def _nomenclature(aliases: str | os.PathLike | pd.DataFrame | None) -> tuple[pd.DataFrame | None, str]:
    from .. import datasets

    if aliases is None or aliases is False:
        return None, "not used (aliases=None): exact and case-insensitive symbols only"
    if isinstance(aliases, pd.DataFrame):
        return aliases, "user-supplied table"
    if isinstance(aliases, str) and aliases == "hgnc":
        if settings.hgnc_path is not None:
            path = settings.hgnc_path
            return _hgnc_file(str(path), path.stat().st_mtime), f"HGNC table {path} (settings.hgnc_path)"
        table = _registry_nomenclature(str(settings.cachedir))
        if table is None:
            return None, "unavailable (HGNC table could not be fetched): exact and case-insensitive symbols only"
        return table, f"HGNC complete set ({datasets.REGISTRY['hgnc-complete-set'].url})"
    return datasets.read_hgnc(aliases), f"HGNC-format table {aliases}"


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


# ------------------------------------------------------------------------------------------ input kind
def _row_ids(m: sp.csr_matrix) -> np.ndarray:
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


def _check_values(m: sp.csr_matrix, where: str) -> None:
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
    _check_values(sample, where)
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


def _linear(chunk: sp.csr_matrix, kind: InputKind, where: str) -> sp.csr_matrix:
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
        rows = _row_ids(lin)[keep]
        lin = sp.csr_matrix((lin.data[keep], (rows, primary[lin.indices[keep]])), shape=(n_rows, n_cols))
        lin.sum_duplicates()
    v = np.where(target[lin.indices] >= 0, lin.data, 0.0)
    # per-cell totals; exact for the integer (or recovered integer) counts this mostly sees
    totals = _row_sums(lin, v)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = v / np.repeat(library_size if library else totals, np.diff(lin.indptr)) * TARGET_SUM
    tok = np.log2(1.0 + x, out=x)
    np.floor(tok, out=tok)
    np.minimum(tok, n_bins, out=tok)
    nz = tok > 0  # NaN (cells with no panel counts) compares False
    indptr = np.concatenate(([0], np.cumsum(nz)))[lin.indptr]
    bins = sp.csr_matrix(
        (tok[nz].astype(np.int8), primary[lin.indices[nz]].astype(np.int32), indptr.astype(np.int64)),
        shape=(n_rows, n_cols),
    )
    return bins, totals


def _source(adata: AnnData, layer: str | None, use_raw: bool) -> tuple[Any, str]:
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


def _in_memory(chunk: Any) -> sp.csr_matrix:
    """A block of rows as float64 CSR, whether it came from memory, a backed file or a dask array (dense or sparse chunks)."""
    if hasattr(chunk, "to_memory"):  # a backed sparse dataset
        chunk = chunk.to_memory()
    if hasattr(chunk, "compute"):  # dask
        chunk = chunk.compute()
    return sp.csr_matrix(chunk, dtype=np.float64)


def _rows(X: Any, start: int, stop: int) -> sp.csr_matrix:
    return _in_memory(X[start:stop])


def _gene_ids(adata: AnnData, gene_key: str | None) -> pd.Index:
    if gene_key is None:
        return adata.var_names
    if gene_key not in adata.var:
        raise KeyError(f"gene_key={gene_key!r} is not a column of adata.var (columns: {list(adata.var.columns)}).")
    return pd.Index(adata.var[gene_key].astype(str))


# ------------------------------------------------------------------------------------------ fingerprint
FINGERPRINT_ROWS = 64  # cells whose values are hashed; with the shape and the total, what tells a changed input


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
        "rows": _row_hashes(_in_memory(X[positions])),
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
    current = _row_hashes(_in_memory(X[idx[order]]))
    if current != list(np.asarray(fingerprint["rows"]).astype(str)[order]):
        return False
    recorded, total = fingerprint.get("total"), _total(X) if same_cells else None
    return recorded is None or total is None or total == float(recorded)


def recorded_input(adata: AnnData) -> Any:
    """The matrix the last :func:`bin` read (``X``, a layer or ``raw.X``), or None when it is gone."""
    info = adata.uns.get("scbert")
    recorded = info.get("params", {}).get("bin", {}) if isinstance(info, dict) else {}
    try:
        return _source(adata, recorded.get("layer"), bool(recorded.get("use_raw")))[0]
    except (KeyError, ValueError):
        return None


def bins_stale(info: Any, model: ScBERT, X: Any, var_names: Sequence[str], obs_names: pd.Index) -> str | None:
    """Why the bins recorded in ``info`` (``uns["scbert"]``) cannot be used for ``model``, or None when they can.

    ``X`` is the matrix the bins were made from (see :func:`recorded_input`; None: it is gone), its
    genes named by ``var_names`` and its cells by ``obs_names``.
    """
    if not isinstance(info, dict) or "panel_checksum" not in info:
        return "are missing"
    if X is None:
        return "were made from an input that is no longer there"
    if (
        info.get("panel_checksum") != panel_checksum(model.genes)
        or int(info.get("n_bins", -1)) != model.n_bins
        or info.get("normalize") != model.normalization
    ):
        return "were made for another panel"
    if info.get("var_checksum") != panel_checksum([str(g) for g in var_names]):
        return "were made for other genes (the genes were subset or reordered since)"
    if not isinstance(info.get("fingerprint"), dict):
        return "were made by an earlier scbert-tl, which kept no fingerprint of their input"
    if not input_unchanged(info.get("fingerprint"), X, obs_names):
        return f"no longer match {info.get('input', 'the input')}: its values changed since scbert.pp.bin"
    return None


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
    target: np.ndarray
    primary: np.ndarray

    @property
    def n_matched(self) -> int:
        """Panel genes the input has."""
        return int((self.alignment.panel_index >= 0).sum())

    def __call__(self, raw: sp.csr_matrix, start: int = 0) -> BinnedChunk:
        """Bin cells ``start, start + 1, ...`` (float64 CSR rows of the input; numbered for messages)."""
        raw.eliminate_zeros()
        _check_values(raw, f"{self.where} (cells {start}..{start + raw.shape[0] - 1})")
        lin = _linear(raw, self.kind, self.where)
        bins, totals = _tokens(
            lin,
            self.target,
            self.primary,
            self.n_bins,
            sum_duplicates=self.alignment.duplicates > 0,
            library=self.normalization == "library",
        )
        return BinnedChunk(bins, totals, np.diff(raw.indptr), float(lin.data.sum()))


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
    panel: str | Sequence[str] | ScBERT,
    n_bins: int,
    normalize: Literal["auto", "library", "panel"] = "auto",
    aliases: str | os.PathLike | pd.DataFrame | None = "hgnc",
) -> Binning:
    """Align the genes ``ids`` of the matrix ``X`` (named ``where`` in messages) to ``panel`` and tell its kind of values.

    ``X`` is anything whose row ranges :func:`_rows` reads (in memory, backed, dask, a file); only its
    first cells are read, to tell raw counts from normalised values. Raises when too few genes match.
    """
    genes, panel_name, default_normalization = _resolve_panel(panel)
    normalization = default_normalization if normalize == "auto" else normalize
    if normalization not in ("library", "panel"):
        raise ValueError(f"normalize must be 'auto', 'library' or 'panel', got {normalize!r}.")
    table, nom_source = _nomenclature(aliases)
    alignment = align_genes(ids, genes, nomenclature=table)
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

    kind = detect_kind(_rows(X, 0, min(X.shape[0], KIND_SAMPLE)), where)
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

    target = alignment.target
    primary = np.full(target.size, -1, dtype=np.int64)
    first_of_position = {pos: j for j, pos in enumerate(alignment.panel_index) if pos >= 0}
    for j, pos in enumerate(target):
        if pos >= 0:
            primary[j] = first_of_position[pos]
    return Binning(genes, panel_name, normalization, n_bins, alignment, kind, where, nom_source, target, primary)


def bin(
    adata: AnnData,
    *,
    panel: str | Sequence[str] | ScBERT = "scbert-panglao",
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
        Key of the record in ``adata.uns`` and prefix of the ``obs`` columns.
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
        there by other functions, such as :func:`~scbert_tl.tl.annotate`, are kept).

    Examples
    --------
    >>> import scanpy as sc
    >>> import scbert_tl as scbert
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> scbert.pp.bin(adata, use_raw=True)  # doctest: +SKIP
    """
    if n_bins < 1 or n_bins > 126:
        raise ValueError(f"n_bins must be between 1 and 126, got {n_bins}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if copy:
        adata = adata.copy()
    if min_genes is not None and adata.isbacked:
        raise ValueError(
            "min_genes removes cells, which an AnnData opened with backed='r' cannot do in place: bin without "
            "min_genes (cells are flagged in obs), or load the data into memory first (adata.to_memory())."
        )
    X, where = _source(adata, layer, use_raw)
    binning = prepare_binning(
        X, where, _gene_ids(adata, gene_key), panel=panel, n_bins=n_bins, normalize=normalize, aliases=aliases
    )
    genes, panel_name, normalization, alignment = (
        binning.genes,
        binning.panel_name,
        binning.normalization,
        binning.alignment,
    )
    n_matched, kind, nom_source, target = binning.n_matched, binning.kind, binning.nom_source, binning.target

    chunks, n_genes_expr = [], []
    panel_total = all_total = 0.0
    zero_cells = 0
    bar = tqdm(
        total=adata.n_obs, desc="pp.bin", unit="cells", disable=not settings.progress or adata.n_obs <= chunk_size
    )
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        chunk = binning(_rows(X, start, stop), start)
        chunks.append(chunk.bins)
        n_genes_expr.append(chunk.n_genes)
        panel_total += chunk.panel_totals.sum()
        all_total += chunk.total
        zero_cells += int((chunk.panel_totals == 0).sum())
        bar.update(stop - start)
    bar.close()
    bins = sp.vstack(chunks, format="csr", dtype=np.int8) if len(chunks) > 1 else chunks[0]
    n_expr = np.concatenate(n_genes_expr)
    if min_genes is not None and (n_expr < min_genes).all():
        raise ValueError(
            f"min_genes={min_genes} would remove every cell (the most genes any cell expresses is {n_expr.max()}); "
            "pass a lower min_genes, or None to only flag cells with fewer than 200."
        )

    counts_fraction = float(panel_total / all_total) if all_total > 0 else 0.0
    coverage = {
        "panel_genes_matched": n_matched,
        "panel_size": len(genes),
        "panel_fraction": n_matched / len(genes),
        "user_genes": int(target.size),
        "user_genes_matched": int((target >= 0).sum()),
        "counts_fraction": counts_fraction,
        "by_method": alignment.counts(),
        "duplicates_summed": alignment.duplicates,
        "shadowed": len(alignment.shadowed),
        "cells_without_panel_counts": zero_cells,
    }
    logger.info(
        "pp.bin: %d of %d panel genes matched (%.1f%%; exact %d, case %d, nomenclature %d, Ensembl %d); "
        "%.1f%% of the counts land in the panel",
        n_matched,
        len(genes),
        100 * coverage["panel_fraction"],
        *alignment.counts().values(),
        100 * counts_fraction,
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
            len(genes),
            100 * coverage["panel_fraction"],
            key_added,
        )
    if zero_cells:
        logger.warning(
            "%d of %d cells (%.1f%%) have no counts in the panel genes: all their tokens are 0, so the model sees "
            "an empty cell and gives each of them the same prediction.",
            zero_cells,
            adata.n_obs,
            100 * zero_cells / adata.n_obs,
        )

    if LAYER in adata.layers:
        logger.info("pp.bin: replacing the existing adata.layers[%r]", LAYER)
    qc_threshold = QC_MIN_GENES if min_genes is None else int(min_genes)
    adata.layers[LAYER] = bins
    adata.var[PANEL_INDEX] = alignment.panel_index
    adata.obs[f"{key_added}_n_genes"] = n_expr
    adata.obs[f"{key_added}_low_quality"] = n_expr < qc_threshold
    record = dict(adata.uns.get(key_added, {}))  # other functions' keys (e.g. tl.annotate's) are kept
    record.update(
        {
            "panel": panel_name,
            "panel_size": len(genes),
            "panel_checksum": panel_checksum(genes),
            "var_checksum": panel_checksum(list(map(str, adata.var_names))),
            "n_bins": n_bins,
            "normalize": normalization,
            "input": where,
            "input_kind": kind,
            "fingerprint": input_fingerprint(X, adata.obs_names),
            "coverage": coverage,
            "nomenclature": nom_source,
        }
    )
    record["params"] = {
        **dict(record.get("params", {})),
        "bin": {
            "panel": panel_name,
            "gene_key": gene_key,
            "layer": layer,
            "use_raw": use_raw,
            "n_bins": n_bins,
            "normalize": normalization,
            "min_genes": min_genes,
            "aliases": aliases if isinstance(aliases, str) or aliases is None else "table",
        },
    }
    adata.uns[key_added] = record
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
    return adata if copy else None


def input_params(adata: AnnData, **given: Any) -> dict[str, Any]:
    """Input choices (``gene_key``, ``layer``, ``use_raw``): those given (not None), else those of the last :func:`bin`."""
    info = adata.uns.get("scbert")
    recorded = info.get("params", {}).get("bin", {}) if isinstance(info, dict) else {}
    params = {k: recorded[k] for k in ("gene_key", "layer", "use_raw") if recorded.get(k) is not None}
    params.update({k: v for k, v in given.items() if v is not None})
    return params


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

    :func:`bin` runs (logged) when the bins are missing, were made for another panel, for other genes
    (the genes were subset or reordered since), from other input than asked for, or from values that
    changed since (the input's fingerprint, see :func:`input_fingerprint`). Input choices not given are
    those of the last :func:`bin`.
    Model genes that ``adata`` does not have are fed as ``unmeasured`` says (default: the model's
    :attr:`~scbert_tl.ScBERT.unmeasured`): ``"mask"`` as unknown (the ``[MASK]`` token), ``"zero"`` as not
    expressed. The share of the model's genes that ``adata`` measures is logged, as a warning below 90%.
    """
    from ..train import TokenMatrix

    info = adata.uns.get("scbert")
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
        bin(adata, panel=model, n_bins=model.n_bins, normalize=model.normalization, **params)
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


def expression(
    adata: AnnData,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_cells: int | None = None,
    rng: np.random.Generator | None = None,
) -> sp.csr_matrix:
    """Values proportional to each cell's counts (log-normalised input undone), as float32 CSR.

    Used where scanpy's own preprocessing is wanted on the same input :func:`bin` reads (e.g. ranking
    highly variable genes). At most ``max_cells`` cells, drawn by ``rng``, in their original order.
    """
    X, where = _source(adata, layer, use_raw)
    rows = np.arange(adata.n_obs)
    if max_cells is not None and adata.n_obs > max_cells:
        rng = rng if rng is not None else np.random.default_rng(0)
        rows = np.sort(rng.choice(adata.n_obs, size=max_cells, replace=False))
    kind = detect_kind(_rows(X, 0, min(adata.n_obs, 2000)), where)
    parts = []
    for start in range(0, rows.size, 5_000):
        idx = rows[start : start + 5_000]
        chunk = _in_memory(X[idx])
        chunk.eliminate_zeros()
        _check_values(chunk, where)
        parts.append(_linear(chunk, kind, where).astype(np.float32))
    return sp.vstack(parts, format="csr")
