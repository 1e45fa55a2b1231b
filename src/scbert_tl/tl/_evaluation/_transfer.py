"""``scbert.tl.dataset_transfer``: train on one dataset (or several), annotate another, score at a shared label level."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._docs import doc_params
from ...data import class_order
from .._docs import FRAGMENTS
from ._comparison import comparison, score_row, store, summarise
from ._levels import shared_labels, shared_prediction, to_shared
from ._methods import INPUT_KEYS, gene_ids, log_normalised, predict

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)

#: The obs column of the shared-level labels in the log-normalised copies.
SHARED = "shared_label"


def _log_normalised_copy(adata: AnnData, label_key: str, name: str, input_kwargs: dict[str, Any]) -> AnnData:
    """The cells normalised to 1e4 over their own genes and ``log1p``, with the labels and the dataset name only."""
    import anndata as ad

    from ...data import input_params

    params = input_params(adata, **input_kwargs)
    out = ad.AnnData(
        log_normalised(adata, **params),
        obs=pd.DataFrame(
            {label_key: adata.obs[label_key].astype(str).to_numpy(), "dataset": name},
            index=[f"{name}:{c}" for c in adata.obs_names],
        ),
        var=pd.DataFrame(index=pd.Index(gene_ids(adata, params.get("gene_key")), name=None)),
    )
    if not out.var_names.is_unique:
        logger.info("dataset_transfer: %s has duplicate gene identifiers; keeping the first of each", name)
        out = out[:, ~out.var_names.duplicated()].copy()
    return out


def _on_genes(x: Any, genes: pd.Index, target: pd.Index) -> sp.csr_matrix:
    """Columns ``target`` of ``x`` (whose columns are ``genes``); zeros where ``genes`` lacks one."""
    column = target.get_indexer(genes)
    keep = np.flatnonzero(column >= 0)
    select = sp.csr_matrix((np.ones(keep.size), (keep, column[keep])), shape=(genes.size, target.size))
    return (sp.csr_matrix(x) @ select).astype(np.float32).tocsr()


def _renormalised(parts: list[AnnData], genes: pd.Index) -> sp.csr_matrix:
    """The cells of ``parts`` on ``genes``, each cell renormalised to 1e4 over those genes and ``log1p``."""
    x = sp.vstack([_on_genes(p.X, p.var_names, genes) for p in parts]).tocsr()
    x.data = np.expm1(x.data)  # back to normalised values
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    x = sp.diags(scale) @ x
    x.data = np.log1p(x.data)
    return x.astype(np.float32).tocsr()


def _training_genes(parts: list[AnnData]) -> pd.Index:
    shared = parts[0].var_names
    for p in parts[1:]:
        shared = shared.intersection(p.var_names, sort=False)
    if shared.size == 0:
        raise ValueError("The training datasets share no gene identifiers; pass gene symbols or a common gene_key.")
    return shared


# ------------------------------------------------------------------------------------------ the protocol
@doc_params(**FRAGMENTS)
def dataset_transfer(
    adatas: Sequence[AnnData] | Mapping[str, AnnData],
    label_key: str,
    *,
    names: Sequence[str] | None = None,
    reference: str | Sequence[str] | None = None,
    label_map: Mapping[str, str | None] | str | None = None,
    model: str | os.PathLike | ScBERT = "compact",
    baselines: Sequence[str] = ("l1_logistic",),
    validation: float = 0.1,
    query_genes: bool = True,
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_transfer",
) -> pd.DataFrame:
    """Train on one dataset (or several), annotate another made elsewhere, and score it, at a shared label level if needed.

    Two shapes: with ``reference``, every method is trained once on the reference dataset(s) and
    annotates each of the other datasets (the everyday use: a reference made elsewhere, a new
    query); without it, leave-one-dataset-out: each dataset in turn is annotated by methods trained
    on all the others. Nothing of an annotated dataset, neither labels nor expression, is used for
    training; only its gene names choose the genes of the baselines and of a new compact model.

    **Input.** Every dataset is read as the tools read it (raw counts or log-normalised; the input
    choices of ``finetune_kwargs`` apply to each). scBERT is fine-tuned on the training cells and
    annotates the query with the query's own genes, aligned to the model's panel by
    :func:`~scbert_tl.pp.bin`. The baselines use the genes shared by the training datasets and the
    query, each cell normalised to 1e4 over those genes and ``log1p``. A new compact model
    (``model="compact"``) takes its genes among those the query measures too (``query_genes``), so
    that no model gene is fed to it as ``[MASK]``, and is then trained without gene masking (unless
    ``finetune_kwargs`` give ``mask_genes``).

    **Labels at different resolutions.** ``label_map`` maps labels to a shared level, e.g. PBMC types
    to lineages (``{{"Naive CD4 T": "T_CD4", "Memory CD4 T": "T_CD4", "CD14+ Mono": "MNP", ...}}``).
    A single training dataset is trained on its own labels and each predicted type is mapped to its
    shared label (the probability of a shared label is the sum over the types that map to it);
    several training datasets are pooled at the shared level. The query is scored against its
    shared labels. A training type without a counterpart in the query (after mapping; e.g. platelets
    when the query has none) stays in training: it is reported in ``unmatched`` and every query cell
    predicted as it counts as an error. A query type the training lacks cannot be predicted: its
    cells count as errors too (``n_unseen``).

    Parameters
    ----------
    adatas
        Two or more labelled datasets (a list, or a mapping from name to dataset).
    label_key
        Column of every dataset's ``obs`` with its cell types (each dataset at its own resolution).
    names
        Names of the datasets in a list (default: ``"dataset0"``, ``"dataset1"``, ...).
    reference
        Name(s) of the dataset(s) to train on; every other dataset is annotated. Default: leave
        one dataset out in turn.
    label_map
        How labels map to the shared level at which queries are scored: a dict from a label (of any
        dataset) to its shared label, where labels not in the dict are their own shared label and
        ``None`` leaves the cells of that label out (out of training and of scoring, e.g. ``{{"Platelet":
        None, "?": None}}``); or the name of an obs column that holds every cell's shared label
        (missing values: left out; a dataset without the column is labelled at the shared level
        already). Default: the labels as they are.
    {doc_model}
    {doc_baselines}
    validation
        Fraction of the training cells held out for scBERT's model selection and calibration.
    query_genes
        Whether a new compact model chooses its genes among those the query measures (the
        ``genes_measured_in`` of :func:`~scbert_tl.tl.finetune`; one model per query). ``False``: among
        all genes of the training data, as without a query; the genes the query lacks are then fed as
        ``[MASK]``.
    {doc_finetune_kwargs}
    rng
        Seed of the training.
    key_added
        Key in every dataset's ``uns`` for the results.

    Returns
    -------
    A tidy frame, one row per method and query dataset: ``held_out`` (the query), ``reference``
    (the training datasets, joined by ``+``), ``n_train``, ``n_test`` (query cells scored),
    ``n_unseen`` (query cells of types the training lacks), ``n_unmatched`` (query cells predicted
    as a training type the query lacks), ``accuracy`` (over all scored query cells), ``macro_f1``
    and ``f1:<type>`` over the shared types both the training and the query have, ``ece`` (expected
    calibration error of the shared-level predictions), seconds. Also written to
    ``adata.uns[key_added]`` of every dataset with ``"results"``, ``"summary"``, ``"training"``
    (per query: the training datasets, their number of cells and shared genes, the labels trained
    on, the ``unmatched`` and ``unseen`` types and the ``label_map`` applied) and ``"params"``.
    """
    adatas, names = _named(adatas, names)
    reference = _check_reference(reference, names)
    finetune_kwargs = dict(finetune_kwargs or {})
    if "genes_measured_in" in finetune_kwargs:
        raise ValueError("finetune_kwargs may not set 'genes_measured_in': the query's genes are used (query_genes).")
    input_kwargs = {k: finetune_kwargs.pop(k) for k in INPUT_KEYS if k in finetune_kwargs}
    checked = [
        comparison(a, label_key, model, validation, rng, baselines, finetune_kwargs, baseline_input=False)
        for a in adatas
    ]
    methods = checked[0].methods
    shared = shared_labels(adatas, names, label_key, label_map)
    parts = [_log_normalised_copy(a, label_key, n, input_kwargs) for a, n in zip(adatas, names, strict=True)]
    for part, labels in zip(parts, shared, strict=True):
        part.obs[SHARED] = labels
    plan = (
        [(reference, q) for q in names if q not in reference]
        if reference is not None
        else [([n for n in names if n != q], q) for q in names]
    )
    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}
    for train_names, held_out in plan:
        setting = _setting(parts, names, train_names, held_out, label_key)
        training[held_out] = setting.record
        query_kwargs = dict(finetune_kwargs)
        if query_genes and isinstance(model, str) and model == "compact":
            query_kwargs["genes_measured_in"] = list(setting.query.var_names)
        rows += _run_methods(
            setting,
            methods,
            label_key,
            model=model,
            validation=validation,
            finetune_kwargs=query_kwargs,
            seed=rng,
        )
    frame = pd.DataFrame(rows)
    params = checked[0].params(
        "dataset_transfer",
        names=names,
        reference="leave_one_out" if reference is None else reference,
        # a JSON string: h5ad cannot store the None (left out) of a dict
        label_map=label_map if isinstance(label_map, str | None) else json.dumps(dict(label_map)),
        query_genes=query_genes,
        **input_kwargs,
    )
    for a in adatas:
        store(a, key_added, frame, params, summary=summarise(frame, ["method"]), training=training)
    return frame


def _named(
    adatas: Sequence[AnnData] | Mapping[str, AnnData], names: Sequence[str] | None
) -> tuple[list[AnnData], list[str]]:
    """The datasets and their names, checked."""
    if isinstance(adatas, Mapping):
        if names is not None:
            raise ValueError("Pass names only with a list of datasets; a mapping already names them.")
        names, adatas = [str(k) for k in adatas], list(adatas.values())
    else:
        adatas = list(adatas)
        names = [f"dataset{i}" for i in range(len(adatas))] if names is None else [str(n) for n in names]
    if len(adatas) < 2:
        raise ValueError(f"dataset_transfer needs at least two datasets, got {len(adatas)}.")
    if len(names) != len(adatas) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(adatas)} different names, got {names}.")
    return adatas, names


def _check_reference(reference: str | Sequence[str] | None, names: list[str]) -> list[str] | None:
    if reference is None:
        return None
    reference = [reference] if isinstance(reference, str) else [str(r) for r in reference]
    missing = [r for r in reference if r not in names]
    if missing or not reference:
        raise KeyError(f"reference {missing or reference} must name datasets; the datasets are {names}.")
    if set(reference) == set(names):
        raise ValueError("Every dataset is a reference; leave at least one out to annotate.")
    return reference


@dataclass
class _Setting:
    """One transfer: the training datasets' cells, the held-out dataset's, and how their labels meet."""

    train_names: list[str]
    held_out: str
    train_parts: list[AnnData]
    ref: AnnData
    query: AnnData
    fit_key: str
    mapping: dict[str, str]
    truth: np.ndarray
    scored: list[str]
    unseen: int
    unmatched: list[str]
    genes: pd.Index
    record: dict[str, Any]


def _setting(parts: list[AnnData], names: list[str], train_names: list[str], held_out: str, label_key: str) -> _Setting:
    """Cells, labels and genes of training on ``train_names`` and annotating ``held_out`` (logged)."""
    if held_out in train_names:  # never
        raise RuntimeError("The held-out dataset is in the training data.")
    train_parts = [parts[names.index(n)] for n in train_names]
    query = parts[names.index(held_out)]
    query = query[query.obs[SHARED].notna().to_numpy()]
    ref = _training_cells(train_parts, label_key)
    own_level = len(train_parts) == 1
    mapping = to_shared(ref.obs[label_key].to_numpy(), ref.obs[SHARED].to_numpy(), held_out) if own_level else {}
    truth = query.obs[SHARED].to_numpy(dtype=str)
    train_shared = class_order(ref.obs[SHARED].astype(str).to_numpy())
    query_types = class_order(truth)
    scored = [t for t in train_shared if t in query_types]
    unseen = int((~np.isin(truth, train_shared)).sum())
    unmatched = [t for t in train_shared if t not in query_types]
    if not scored:
        raise ValueError(
            f"{held_out} shares no cell type with {', '.join(train_names)} (types {query_types[:5]} against "
            f"{train_shared[:5]}); pass label_map to map the labels to a shared level."
        )
    genes = _training_genes(train_parts).intersection(query.var_names, sort=False)
    record = {
        "datasets": list(train_names),
        "n_cells": int(ref.n_obs),
        "n_genes": int(genes.size),
        "labels": "own" if own_level else "shared",
        "unmatched": unmatched,
        "unseen": [t for t in query_types if t not in train_shared],
        "label_map": {k: v for k, v in mapping.items() if v != k},
    }
    logger.info(
        "dataset_transfer: %s annotated (%d cells; %d of types not in training) by methods trained on %s "
        "(%d cells, %s labels; baselines on %d shared genes)",
        held_out,
        query.n_obs,
        unseen,
        train_names,
        ref.n_obs,
        "their own" if own_level else "shared",
        genes.size,
    )
    if unmatched:
        logger.info("  training types the query lacks (predictions of them count as errors): %s", unmatched)
    fit_key = label_key if own_level else SHARED
    return _Setting(
        list(train_names),
        held_out,
        train_parts,
        ref,
        query,
        fit_key,
        mapping,
        truth,
        scored,
        unseen,
        unmatched,
        genes,
        record,
    )


def _run_methods(s: _Setting, methods: list[str], label_key: str, **fit: Any) -> list[dict[str, Any]]:
    """Train every method on the setting's training cells, predict the held-out cells, and score them."""
    baseline_x = {}
    if len(methods) > 1:
        baseline_x = {
            "ref_x": _renormalised(_labelled_cells(s.train_parts), s.genes),
            "query_x": _renormalised([s.query], s.genes),
        }
    train = s.ref.copy()
    train.obs[label_key] = train.obs[s.fit_key].astype(str)
    rows = []
    for method in methods:
        pred = predict(method, train, s.query.copy(), label_key, genes=list(s.genes), **fit, **baseline_x)
        pred.labels, pred.confidence = shared_prediction(pred, s.mapping)
        row = score_row(
            pred,
            s.truth,
            s.scored,
            method=method,
            held_out=s.held_out,
            reference="+".join(s.train_names),
            n_train=int(s.ref.n_obs),
            n_test=int(s.query.n_obs),
            n_unseen=s.unseen,
            n_unmatched=int(np.isin(pred.labels, s.unmatched).sum()),
        )
        rows.append(row)
        logger.info(
            "  %s: accuracy %.3f, macro F1 %.3f, ECE %.3f", method, row["accuracy"], row["macro_f1"], row["ece"]
        )
    return rows


def _training_cells(parts: list[AnnData], label_key: str) -> AnnData:
    """The training datasets' cells with a shared label (the others are left out), their labels only, one AnnData."""
    import anndata as ad

    kept = _labelled_cells(parts)
    obs = pd.concat([k.obs[[label_key, SHARED, "dataset"]] for k in kept])
    if len(kept) == 1:
        return ad.AnnData(kept[0].X, obs=obs, var=kept[0].var[[]])
    genes = _training_genes(parts)
    return ad.AnnData(_renormalised(kept, genes), obs=obs, var=pd.DataFrame(index=genes))


def _labelled_cells(parts: list[AnnData]) -> list[AnnData]:
    """The cells of each dataset that have a shared label (those mapped to ``None`` are left out)."""
    return [p[p.obs[SHARED].notna().to_numpy()] for p in parts]
