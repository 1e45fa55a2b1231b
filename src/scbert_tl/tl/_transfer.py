"""``scbert.tl.dataset_transfer``: leave one dataset out; train on the others, annotate it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._evaluate import INPUT_KEYS, base_params, gene_ids, labelled, log_normalised, predict, score_row, store, summarise

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)


def _log_normalised_copy(adata: AnnData, label_key: str, name: str, input_kwargs: dict[str, Any]) -> AnnData:
    """The cells normalised to 1e4 over their own genes and ``log1p``, with the labels and the dataset name only."""
    import anndata as ad

    from ..pp._bin import input_params

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


def _training_set(parts: list[AnnData]) -> AnnData:
    """The training datasets on the genes they share, each cell normalised to 1e4 over those genes and ``log1p``."""
    import anndata as ad
    import scanpy as sc

    shared = parts[0].var_names
    for p in parts[1:]:
        shared = shared.intersection(p.var_names, sort=False)
    if shared.size == 0:
        raise ValueError("The training datasets share no gene identifiers; pass gene symbols or a common gene_key.")
    if len(parts) == 1:
        return parts[0]
    train = ad.concat([p[:, shared] for p in parts], join="inner")
    train.X = train.X.copy()
    train.X.data = np.expm1(train.X.data)  # back to normalised values; renormalise over the shared genes
    sc.pp.normalize_total(train, target_sum=1e4)
    sc.pp.log1p(train)
    return train


def _on_genes(adata: AnnData, genes: pd.Index) -> sp.csr_matrix:
    """``adata.X`` with columns ``genes`` (zeros where ``adata`` lacks one)."""
    column = genes.get_indexer(adata.var_names)
    keep = np.flatnonzero(column >= 0)
    select = sp.csr_matrix((np.ones(keep.size), (keep, column[keep])), shape=(adata.n_vars, genes.size))
    return (sp.csr_matrix(adata.X) @ select).astype(np.float32).tocsr()


def dataset_transfer(
    adatas: Sequence[AnnData] | Mapping[str, AnnData],
    label_key: str,
    *,
    names: Sequence[str] | None = None,
    model: str | os.PathLike | ScBERT = "compact",
    baselines: Sequence[str] = ("l1_logistic",),
    validation: float = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_transfer",
) -> pd.DataFrame:
    """Leave-one-dataset-out: train on all datasets but one, annotate the one left out; each in turn.

    Every dataset is read as the tools read it (raw counts or log-normalised; the input choices of
    ``finetune_kwargs`` apply to each) and normalised to 1e4 per cell and ``log1p``. The training
    datasets are joined on the genes they share (each cell renormalised over those genes; with one
    training dataset, all of its genes). scBERT is fine-tuned on them and annotates the held-out
    dataset with its own genes, aligned to the model's panel by :func:`~scbert_tl.pp.bin`; the
    baselines read the held-out dataset on the training genes (genes it lacks are zeros). Nothing of
    the held-out dataset, labels or expression, is used for training.

    Parameters
    ----------
    adatas
        Two or more labelled datasets (a list, or a mapping from name to dataset).
    label_key
        Column of every dataset's ``obs`` with the cell types (the same names across datasets).
    names
        Names of the datasets in a list (default: ``"dataset0"``, ``"dataset1"``, ...).
    model
        Starting point of :func:`~scbert_tl.tl.finetune` (default: a new compact model).
    baselines
        ``"l1_logistic"`` and/or ``"celltypist"``, as in :func:`~scbert_tl.tl.cross_validate`.
    validation
        Fraction of the training cells held out for model selection.
    finetune_kwargs
        Further arguments of :func:`~scbert_tl.tl.finetune`.
    rng
        Seed of the training.
    key_added
        Key in every dataset's ``uns`` for the results.

    Returns
    -------
    A tidy frame, one row per method and held-out dataset: ``held_out``, ``n_train``, ``n_test``,
    ``n_unseen`` (held-out cells of types absent from training; they count as errors), ``accuracy``,
    ``macro_f1`` and ``f1:<type>`` over the training types, seconds. Also written to
    ``adata.uns[key_added]`` of every dataset with ``"results"``, ``"summary"``, ``"training"`` (the
    datasets and number of shared genes each model was trained on) and ``"params"``.
    """
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
    finetune_kwargs = dict(finetune_kwargs or {})
    input_kwargs = {k: finetune_kwargs.pop(k) for k in INPUT_KEYS if k in finetune_kwargs}
    checked = [
        labelled(a, label_key, baselines=baselines, finetune_kwargs=finetune_kwargs, baseline_input=False)
        for a in adatas
    ]
    methods = checked[0].methods
    parts = [_log_normalised_copy(a, label_key, n, input_kwargs) for a, n in zip(adatas, names, strict=True)]
    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}
    for i, held_out in enumerate(names):
        train = _training_set([p for j, p in enumerate(parts) if j != i])
        query = parts[i]
        train_sets = sorted(set(train.obs["dataset"]))
        if held_out in train_sets:  # never
            raise RuntimeError("The held-out dataset is in the training data.")
        classes = sorted(set(train.obs[label_key]))
        truth = query.obs[label_key].to_numpy()
        unseen = int((~np.isin(truth, classes)).sum())
        training[held_out] = {"datasets": train_sets, "n_genes": int(train.n_vars)}
        logger.info(
            "dataset_transfer: %s held out (%d cells, %d of types not in training); training on %s (%d cells, %d genes)",
            held_out,
            query.n_obs,
            unseen,
            train_sets,
            train.n_obs,
            train.n_vars,
        )
        query_x = _on_genes(query, train.var_names) if len(methods) > 1 else None  # for the baselines
        for method in methods:
            pred = predict(
                method,
                train,
                query.copy(),
                label_key,
                ref_x=train.X,
                query_x=query_x,
                genes=list(train.var_names),
                model=model,
                validation=validation,
                finetune_kwargs=finetune_kwargs,
                seed=rng,
            )
            row = score_row(
                pred,
                truth,
                classes,
                method=method,
                held_out=held_out,
                n_train=int(train.n_obs),
                n_test=int(query.n_obs),
                n_unseen=unseen,
            )
            rows.append(row)
            logger.info("  %s: accuracy %.3f, macro F1 %.3f", method, row["accuracy"], row["macro_f1"])
    frame = pd.DataFrame(rows)
    params = base_params(checked[0], model, rng, validation, protocol="dataset_transfer", names=names, **input_kwargs)
    for a in adatas:
        store(a, key_added, frame, params, summary=summarise(frame, ["method"]), training=training)
    return frame
