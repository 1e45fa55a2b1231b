"""``scbert.tl.cross_validate``: stratified cross-validation of scBERT beside baselines on the same folds."""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._settings import settings

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)

BASELINES = ("l1_logistic",)


def scores(truth: Sequence[str], prediction: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class F1 and the confusion matrix (scikit-learn's definitions).

    Macro F1 averages over ``classes`` (the types of the training data), so a type never predicted
    counts as F1 0.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    truth, prediction = np.asarray(truth, dtype=str), np.asarray(prediction, dtype=str)
    labels = list(classes)
    per_class = f1_score(truth, prediction, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, prediction)),
        "macro_f1": float(f1_score(truth, prediction, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": dict(zip(labels, map(float, per_class), strict=True)),
        "confusion": confusion_matrix(truth, prediction, labels=labels),
    }


def log_normalised(adata: AnnData, **input_params: Any) -> Any:
    """Cells normalised to 1e4 and ``log1p`` (natural log) over all genes, from counts or log input."""
    import anndata as ad
    import scanpy as sc

    from ..pp._bin import expression

    tmp = ad.AnnData(expression(adata, **input_params))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp.X


def l1_logistic(train_x: Any, train_y: Sequence[str], test_x: Any, *, seed: int = 0) -> np.ndarray:
    """Predictions of L1 logistic regression (``C=1``, saga), the baseline of the published re-evaluations."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 deprecated penalty= in favour of l1_ratio= (1 = the L1 penalty)
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    penalty = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    clf = LogisticRegression(solver="saga", C=1.0, random_state=seed, **penalty)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, np.asarray(train_y, dtype=str))
    return clf.predict(test_x)


def cross_validate(
    adata: AnnData,
    label_key: str,
    *,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    n_repeats: int = 1,
    baselines: Sequence[str] = BASELINES,
    validation: float = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    folds: Sequence[int] | None = None,
    rng: int = 0,
    key_added: str = "scbert_cv",
) -> pd.DataFrame:
    """Stratified k-fold cross-validation of scBERT fine-tuning, with baselines on exactly the same folds.

    In every fold the model is fine-tuned on the training folds only; its validation cells (for
    epoch selection and early stopping) are drawn from those training folds, and the held-out
    fold is touched only to score the final predictions (``"unknown"`` is not used: each test cell
    gets its most likely type).

    Parameters
    ----------
    adata
        Labelled cells (raw counts or log-normalised).
    label_key
        Column of ``adata.obs`` with the cell types.
    model
        Starting point of :func:`~scbert_tl.tl.finetune` in every fold (default: a new compact model).
    n_splits
        Folds.
    n_repeats
        Repetitions with different fold assignments.
    baselines
        Baselines on the same folds: ``"l1_logistic"`` (L1 logistic regression on log-normalised
        expression of all genes).
    validation
        Fraction of each training split held out for model selection.
    finetune_kwargs
        Further arguments of :func:`~scbert_tl.tl.finetune` (epochs, batch size, ...).
    folds
        Run only these folds (of every repeat), e.g. to spread one cross-validation over several
        processes; the fold assignment does not change. Default: all.
    rng
        Seed of the folds (repeat ``r`` uses ``rng + r``) and of the training.
    key_added
        Key in ``adata.uns`` for the results.

    Returns
    -------
    A tidy frame, one row per method, repeat and fold: ``accuracy``, ``macro_f1``, ``f1:<type>`` per
    type, cell counts and seconds. Also written to ``adata.uns[key_added]`` with ``"summary"`` (mean
    and sd per method), ``"confusion"`` (summed over folds, per method), ``"folds"`` (each cell's test
    fold per repeat) and ``"params"``.
    """
    from sklearn.model_selection import StratifiedKFold

    from . import annotate, finetune

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"Unknown baselines {sorted(unknown)}; available: {list(BASELINES)}.")
    if label_key not in adata.obs:
        raise KeyError(f"label_key={label_key!r} is not a column of adata.obs.")
    if not adata.obs_names.is_unique:
        raise ValueError("adata.obs_names must be unique (adata.obs_names_make_unique()) to keep folds apart.")
    labels = adata.obs[label_key]
    if labels.isna().any():
        raise ValueError(
            f"{int(labels.isna().sum())} cells have no label in adata.obs[{label_key!r}]; drop them first."
        )
    labels = labels.astype(str).to_numpy()
    classes = sorted(set(labels))
    finetune_kwargs = dict(finetune_kwargs or {})
    from ..pp._bin import input_params

    params = input_params(
        adata, **{k: finetune_kwargs.get(k) for k in ("gene_key", "layer", "use_raw") if k in finetune_kwargs}
    )
    lognorm = log_normalised(adata, **params) if baselines else None

    rows: list[dict[str, Any]] = []
    confusion = {m: np.zeros((len(classes), len(classes)), dtype=np.int64) for m in ("scbert", *baselines)}
    selected = None if folds is None else {int(f) for f in folds}
    if selected is not None and not selected <= set(range(n_splits)):
        raise ValueError(f"folds must be between 0 and {n_splits - 1}, got {sorted(selected)}.")
    folds = np.full((n_repeats, adata.n_obs), -1, dtype=np.int64)
    for repeat in range(n_repeats):
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=rng + repeat)
        for fold, (train, test) in enumerate(splitter.split(np.zeros(labels.size), labels)):
            folds[repeat, test] = fold
            if selected is not None and fold not in selected:
                continue
            if np.intersect1d(train, test).size:  # cannot happen with StratifiedKFold; never let it pass
                raise RuntimeError("A cell is in both the training and the test folds.")
            logger.info(
                "cross_validate: repeat %d, fold %d: %d training, %d test cells", repeat, fold, train.size, test.size
            )
            ref, query = adata[train].copy(), adata[test].copy()
            t0 = time.perf_counter()
            m = finetune(
                ref, label_key, model=model, validation=validation, rng=rng + repeat, split_key=None, **finetune_kwargs
            )
            annotate(query, m, unknown_threshold=0.0, key_added="scbert_cv_prediction")
            predicted = query.obs["scbert_cv_prediction"].astype(str).to_numpy()
            results = {"scbert": (predicted, time.perf_counter() - t0)}
            if "l1_logistic" in baselines:
                t0 = time.perf_counter()
                pred = l1_logistic(lognorm[train], labels[train], lognorm[test], seed=rng + repeat)
                results["l1_logistic"] = (pred, time.perf_counter() - t0)
            for method, (pred, seconds) in results.items():
                s = scores(labels[test], pred, classes)
                confusion[method] += s["confusion"]
                rows.append(
                    {
                        "method": method,
                        "repeat": repeat,
                        "fold": fold,
                        "n_train": int(train.size),
                        "n_test": int(test.size),
                        "accuracy": s["accuracy"],
                        "macro_f1": s["macro_f1"],
                        "seconds": seconds,
                        **{f"f1:{c}": v for c, v in s["per_class_f1"].items()},
                    }
                )
                logger.info("  %s: accuracy %.3f, macro F1 %.3f", method, s["accuracy"], s["macro_f1"])
    frame = pd.DataFrame(rows)
    summary = frame.groupby("method", sort=False)[["accuracy", "macro_f1"]].agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    adata.uns[key_added] = {
        "results": frame,
        "summary": summary.reset_index(),
        "confusion": confusion,
        "classes": classes,
        "folds": folds,
        "params": {
            "label_key": label_key,
            "model": model if isinstance(model, str) else type(model).__name__,
            "n_splits": n_splits,
            "n_repeats": n_repeats,
            "folds": "all" if selected is None else sorted(selected),
            "validation": validation,
            "baselines": list(baselines),
            "rng": rng,
            "device": str(settings.resolve_device()),
            **{k: v for k, v in finetune_kwargs.items() if isinstance(v, int | float | str | bool)},
        },
    }
    return frame
