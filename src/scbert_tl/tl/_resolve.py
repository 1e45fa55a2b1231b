"""What the ``model`` argument of the tools may be: a registry name, ``"compact"``, an ScBERT, or a path."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from .._scbert import PRETRAINED, ScBERT

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

logger = logging.getLogger(__name__)

#: The compact configuration: a CPU-sized scBERT trained from scratch (``model="compact"``). Width 32 (two heads
#: of 16) costs a third of width 64 per cell at the same accuracy; 9 expression bins (cap at 2^9 - 1 per 1e4
#: instead of 31) resolve highly expressed genes that 5 bins lump together. Dropout 0.3 in the classifier head
#: (an MLP over one value per gene, most of the parameters) scored higher than 0.1 on held-out PBMC3k cells.
#: A feed-forward of twice the width (not four times) and 24 random features per head (not 16 ln 16 = 44)
#: train a cell in 0.68-0.74 of the time, and one layer (not two) in about half of that, as accurately within
#: the seed-to-seed spread (docs: benchmarks, "A lighter compact model" and "One layer").
COMPACT = {
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "dim_head": 16,
    "ff_mult": 2,
    "n_features": 24,
    "n_bins": 9,
    "classifier_hidden": (256, 64),
    "classifier_dropout": 0.3,
}
COMPACT_GENES = 2000
#: Marker genes of each type among a new compact model's genes when the types are known (fine-tuning): the
#: most variable genes of a reference are those of its large populations, and miss markers such as CCR7 (naive
#: T cells) or MS4A1 (B cells, when they are rare); at most half of the genes go to markers.
COMPACT_MARKERS = 50
#: Cells read (drawn at random, seeded) to rank a compact model's genes.
MAX_RANKED_CELLS = 50_000
#: Fine-tuning defaults of a new model (``tl.finetune``): epochs by the number of training cells
#: (:func:`new_model_epochs`; the cosine schedule ends with them, and training stops earlier when the validation
#: cells stop improving), gene masking so that genes a query lacks can be read as unknown, and depth augmentation
#: (cells thinned down to 500 counts) so that shallower queries than the reference are read as the same types.
NEW_MODEL_FINETUNE = {"epochs": 20, "patience": 3, "lr": 1e-3, "mask_genes": 1.0, "downsample": 500.0}
#: A new model's default epochs: enough to see about ``NEW_MODEL_CELLS_SEEN`` training cells, between
#: ``NEW_MODEL_MIN_EPOCHS`` and 20. PBMC3k's 1,900 training cells scored as well with 6 as with 8; small
#: references gain from more: Segerstolpe's 632 cells annotating Baron, macro F1 0.930 over three seeds with 19
#: epochs against 0.891 with 8; pbmc68k_reduced's 5-fold 0.659 / 0.692 with 20 against 0.637 / 0.641 (docs:
#: benchmarks, "Epochs for small references").
NEW_MODEL_CELLS_SEEN = 12_000
NEW_MODEL_MIN_EPOCHS = 6
#: Fine-tuning defaults when starting from trained weights (the published preprocessing: no gene masking).
TRAINED_FINETUNE = {"epochs": 20, "patience": 5, "lr": 1e-4, "mask_genes": 0.0, "downsample": 0.0}


def new_model_epochs(n_train: int) -> int:
    """Default epochs of a new model's fine-tuning on ``n_train`` cells: 20 up to 600 cells, 12,000 / n_train above, at least 6."""
    most = NEW_MODEL_FINETUNE["epochs"]
    return int(min(most, max(NEW_MODEL_MIN_EPOCHS, round(NEW_MODEL_CELLS_SEEN / max(n_train, 1)))))


def compact_genes(
    adata: AnnData,
    *,
    n_genes: int = COMPACT_GENES,
    panel: str = "scbert-panglao",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    measured: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
) -> list[str]:
    """The genes of a compact model for ``adata``: at most ``n_genes``, markers then highly variable ones, in panel order.

    Genes are those of ``adata`` that are in the scBERT panel (by symbol, case or nomenclature, as
    :func:`scbert_tl.pp.bin` aligns them; the panel's own symbols are used), ranked by
    :func:`scanpy.pp.highly_variable_genes` (``flavor="seurat"`` on normalised, log1p expression).
    When the panel cannot be had (offline, nothing cached) this is an error that says where to put it.
    ``params`` are the input choices of :func:`scbert_tl.pp.bin` (``gene_key``, ``layer``, ``use_raw``).
    ``measured``: gene identifiers of the data the model is for (a query); only panel genes among them
    are candidates, so that the query measures every model gene. ``labels`` (one integer code per cell
    of ``adata``, negative for cells to leave out, e.g. validation cells): the :data:`COMPACT_MARKERS`
    genes of each type with the highest Welch t statistic against the other cells come first, the most
    variable genes fill the rest.
    """
    import anndata as ad
    import scanpy as sc

    from .. import datasets
    from ..data import gene_ids
    from ..pp._expression import expression
    from ..pp._genes import align_genes, nomenclature

    params = params or {}
    ids = gene_ids(adata, params.get("gene_key"))
    try:
        panel_genes = datasets.panel_genes(panel)
    except OSError as e:  # never build on other genes silently: that model would give other results
        raise OSError(
            f"model='compact' takes its genes from the scBERT gene panel, which is not available: {e} "
            "Alternatively pass a model over genes of your choice: model=scbert.ScBERT.new(genes, ...)."
        ) from e
    table, _ = nomenclature("hgnc")
    alignment = align_genes(ids, panel_genes, nomenclature=table)
    in_panel = alignment.panel_index >= 0
    if measured is not None:
        wanted = align_genes(list(map(str, measured)), panel_genes, nomenclature=table).panel_index
        n_panel = int(in_panel.sum())
        in_panel &= np.isin(alignment.panel_index, wanted[wanted >= 0])
        logger.info(
            "Compact model genes chosen among the %d panel genes of adata that the query measures (of %d)",
            int(in_panel.sum()),
            n_panel,
        )
    keep = np.flatnonzero(in_panel)
    names = [panel_genes[i] for i in alignment.panel_index[keep]]
    order = alignment.panel_index[keep]
    if keep.size == 0 and measured is not None:
        raise ValueError(
            "adata and the query share no gene of the scBERT panel; check that both use the same kind of gene "
            "identifiers (gene_key), or pass a model trained on your genes."
        )
    if keep.size == 0:
        raise ValueError("None of adata's genes is in the scBERT panel; pass a model trained on your genes.")
    if keep.size > n_genes:
        cells = np.arange(adata.n_obs)
        if adata.n_obs > MAX_RANKED_CELLS:
            cells = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=MAX_RANKED_CELLS, replace=False))
        tmp = ad.AnnData(expression(adata, cells=cells, **params)[:, keep])
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        hvg = sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_genes, inplace=False)
        if labels is None:
            chosen = np.flatnonzero(hvg["highly_variable"].to_numpy())
        else:
            ranked = np.asarray(labels)[cells]
            markers = marker_genes(tmp.X, ranked, per_type=COMPACT_MARKERS, at_most=n_genes // 2)
            by_dispersion = np.argsort(-hvg["dispersions_norm"].fillna(-np.inf).to_numpy(), kind="stable")
            rest = by_dispersion[~np.isin(by_dispersion, markers)][: n_genes - markers.size]
            chosen = np.concatenate([markers, rest])
            logger.info(
                "Compact model genes: %d markers of the %d types, the most variable after them",
                markers.size,
                len(np.unique(ranked[ranked >= 0])),
            )
    else:
        chosen = np.arange(keep.size)
    chosen = chosen[np.argsort(order[chosen], kind="stable")]
    logger.info("Compact model over %d genes (of %d candidates), highly variable first", chosen.size, keep.size)
    return [names[i] for i in chosen]


#: Cells' worth of the other cells' variance added to a type's own when ranking its marker genes.
PRIOR_CELLS = 10


def marker_genes(X: sp.spmatrix, labels: np.ndarray, *, per_type: int, at_most: int) -> np.ndarray:
    """Columns of ``X`` (cells x genes, log expression) that mark each type of ``labels`` (negative: left out).

    For each type, the genes with the highest Welch t statistic of the type's cells against all other
    cells; ``per_type`` of each, fewer when there are so many types that they would take more than
    ``at_most`` genes. A type's variance is shrunk towards the other cells' as if from ten more cells,
    so that the few cells of a rare type do not rank first the genes they happen to share by chance.
    Sorted column indices.
    """
    X = sp.csr_matrix(X)
    used = labels >= 0
    types = np.unique(labels[used])
    k = max(1, min(per_type, at_most // max(len(types), 1)))
    chosen: set[int] = set()
    for t in types:
        a, b = X[labels == t], X[used & (labels != t)]
        if b.shape[0] == 0:
            continue
        (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
        va = (a.shape[0] * va + PRIOR_CELLS * vb) / (a.shape[0] + PRIOR_CELLS)
        score = (ma - mb) / np.sqrt(va / a.shape[0] + vb / b.shape[0] + 1e-6)
        chosen.update(np.argsort(-score, kind="stable")[:k].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def _mean_var(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and unbiased variance (0 for a single row) of a sparse matrix."""
    n = X.shape[0]
    mean = np.asarray(X.mean(0)).ravel()
    sq = np.asarray(X.multiply(X).mean(0)).ravel()
    var = np.maximum(sq - mean**2, 0.0) * (n / (n - 1) if n > 1 else 0.0)
    return mean, var


def resolve_model(
    model: str | os.PathLike | ScBERT,
    adata: AnnData,
    *,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    measured: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
) -> ScBERT:
    """Turn the ``model`` argument of a tool into an :class:`~scbert_tl.ScBERT` the tool may change.

    An :class:`~scbert_tl.ScBERT` is copied, so the caller's object is left as it was. ``measured``
    (gene identifiers of a query) restricts a new compact model's genes to them, and ``labels`` (the
    training cells' type codes) puts each type's marker genes among them (:func:`compact_genes`); any
    other model has its genes already, and ``measured`` is an error there.
    """
    if measured is not None and not (isinstance(model, str) and model == "compact"):
        raise ValueError(
            "genes_measured_in chooses the genes of a new model (model='compact'); this model's genes are fixed. "
            "Leave it out: genes a query lacks are fed as the model's `unmeasured` says."
        )
    if isinstance(model, str) and model == "compact":
        m = new_compact(compact_genes(adata, seed=seed, params=params, measured=measured, labels=labels), seed)
        if measured is not None:
            m.provenance["genes_measured_in"] = len(set(map(str, measured)))
        return m
    return existing_model(model)


def new_compact(genes: Sequence[str], seed: int) -> ScBERT:
    """A new compact model (:data:`COMPACT`) over ``genes``, with a pretraining head."""
    m = ScBERT.new(genes, seed=seed, lm_head=True, gene_emb_trainable=True, **COMPACT)
    m.provenance["source"] = "compact"
    return m


def existing_model(model: str | os.PathLike | ScBERT, *, new: str = "'compact'") -> ScBERT:
    """A trained model from a tool's ``model`` argument, for the tool to change: an ScBERT (copied), a registry name, or a path.

    ``new`` names the arguments that make a new model instead (for the error message).
    """
    if isinstance(model, ScBERT):
        return copy.deepcopy(model)
    if isinstance(model, str) and model in PRETRAINED:
        return ScBERT.from_pretrained(model)
    if isinstance(model, str | os.PathLike) and Path(model).expanduser().exists():
        return ScBERT.load(model)
    raise ValueError(
        f"model={model!r} is not a model: pass {new} (a new CPU-sized model), a registry name "
        f"({', '.join(sorted(PRETRAINED))}), an ScBERT, or the path of a saved model."
    )


def model_for_inference(model: str | os.PathLike | ScBERT, adata: AnnData) -> ScBERT:
    """The model for a tool that only reads it: an :class:`~scbert_tl.ScBERT` is used as it is."""
    if isinstance(model, ScBERT):
        return model
    if isinstance(model, str) and model == "compact":
        raise ValueError("model='compact' is an untrained architecture; pass a fine-tuned or pretrained model.")
    if isinstance(model, str | os.PathLike) and model not in PRETRAINED and not Path(model).expanduser().exists():
        raise FileNotFoundError(
            f"No model at {model}: pass a trained ScBERT, the folder ScBERT.save wrote (or a .pth checkpoint), "
            f"or a registry name ({', '.join(sorted(PRETRAINED))})."
        )
    return resolve_model(model, adata)
