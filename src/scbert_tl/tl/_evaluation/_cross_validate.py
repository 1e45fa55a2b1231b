"""``scbert.tl.cross_validate``: stratified cross-validation of scBERT beside baselines on the same folds."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..._docs import doc_params
from .._docs import FRAGMENTS
from ._comparison import comparison, score_row, store, summarise
from ._folds import folds_param, iter_folds

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)


@doc_params(**FRAGMENTS)
def cross_validate(
    adata: AnnData,
    label_key: str,
    *,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    n_repeats: int = 1,
    baselines: Sequence[str] = ("l1_logistic",),
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
    gets its most likely type). The other protocols (:func:`~scbert_tl.tl.reference_size_curve`,
    :func:`~scbert_tl.tl.class_imbalance`, :func:`~scbert_tl.tl.novel_type_detection`) use the same
    folds for the same ``n_splits`` and ``rng``.

    Parameters
    ----------
    {doc_labelled}
    model
        Starting point of :func:`~scbert_tl.tl.finetune` in every fold (default: a new compact model).
    n_splits
        Folds.
    n_repeats
        Repetitions with different fold assignments.
    baselines
        Baselines on the same folds: ``"l1_logistic"`` (L1 logistic regression, ``C=1``, on
        log-normalised expression of all genes) and ``"celltypist"`` (CellTypist's logistic
        regression trained on the training folds; needs the optional ``celltypist`` package and is
        skipped, with a logged message, without it).
    validation
        Fraction of each training split held out for model selection.
    finetune_kwargs
        Further arguments of :func:`~scbert_tl.tl.finetune` (epochs, batch size, ...).
    folds
        Run only these folds (of every repeat), e.g. to spread one cross-validation over several
        processes; the fold assignment does not change. Default: all.
    rng
        Seed of the folds (repeat ``r`` uses ``rng + r``) and of the training.
    {doc_key_added}

    Returns
    -------
    A tidy frame, one row per method, repeat and fold: ``accuracy``, ``macro_f1``, ``ece`` (expected
    calibration error of the fold's test cells), ``f1:<type>`` per type, cell counts and seconds. Also
    written to ``adata.uns[key_added]`` with ``"results"`` (the frame), ``"summary"`` (mean and sd per
    method), ``"confusion"`` (summed over folds, per method), ``"classes"``, ``"folds"`` (each cell's
    test fold per repeat), ``"calibration"`` and ``"params"``.
    ``"calibration"`` has one row per method and repeat: the expected calibration error over all
    test cells of the folds run (each predicted by the model of its fold), steadier than the
    per-fold ``ece`` of a few hundred cells, and ``ece_noise``, the error a perfectly calibrated
    method would show with the same confidences on as many cells (each cell right with probability
    equal to its confidence): an ``ece`` near ``ece_noise`` cannot be told from perfect calibration.
    """
    data = comparison(adata, label_key, model, validation, rng, baselines, finetune_kwargs)
    classes = data.classes
    rows: list[dict[str, Any]] = []
    confusion = {m: np.zeros((len(classes), len(classes)), dtype=np.int64) for m in data.methods}
    assignment = np.full((n_repeats, adata.n_obs), -1, dtype=np.int64)
    pooled: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for repeat, fold, train, test, fold_of in iter_folds(data.labels, n_splits, n_repeats, rng, folds):
        assignment[repeat] = fold_of
        logger.info(
            "cross_validate: repeat %d, fold %d: %d training, %d test cells", repeat, fold, train.size, test.size
        )
        for method in data.methods:
            pred = data.run(method, train, test, seed=rng + repeat)
            row = score_row(
                pred,
                data.labels[test],
                classes,
                method=method,
                repeat=repeat,
                fold=fold,
                n_train=int(train.size),
                n_test=int(test.size),
            )
            confusion[method] += _confusion(data.labels[test], pred.labels, classes)
            right = np.asarray(pred.labels, dtype=str) == data.labels[test]
            pooled.setdefault((method, repeat), []).append((np.asarray(pred.confidence, dtype=np.float64), right))
            rows.append(row)
            logger.info("  %s: accuracy %.3f, macro F1 %.3f", method, row["accuracy"], row["macro_f1"])
    frame = pd.DataFrame(rows)
    store(
        adata,
        key_added,
        frame,
        data.params("cross_validate", n_splits=n_splits, n_repeats=n_repeats, folds=folds_param(folds)),
        summary=summarise(frame, ["method"]),
        confusion=confusion,
        classes=classes,
        folds=assignment,
        calibration=_pooled_calibration(pooled),
    )
    return frame


def _pooled_calibration(pooled: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]]) -> pd.DataFrame:
    """Expected calibration error over all test cells of the folds run, per method and repeat, beside its noise level."""
    from ...train._calibration import calibration_noise, expected_calibration_error

    rows = []
    for (method, repeat), parts in pooled.items():
        confidence = np.concatenate([c for c, _ in parts])
        right = np.concatenate([r for _, r in parts])
        rows.append(
            {
                "method": method,
                "repeat": repeat,
                "n_cells": int(confidence.size),
                "ece": expected_calibration_error(confidence, right),
                "ece_noise": calibration_noise(confidence),
            }
        )
    return pd.DataFrame(rows)


def _confusion(truth: np.ndarray, prediction: np.ndarray, classes: list[str]) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(truth, dtype=str), np.asarray(prediction, dtype=str), labels=classes)
