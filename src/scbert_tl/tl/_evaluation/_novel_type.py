"""``scbert.tl.novel_type_detection``: leave a type out of training and see whether it is called ``"unknown"``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..._docs import doc_params
from ...train._calibration import NOVELTY_SCORE, expected_calibration_error
from .._annotate import DEFAULT_FALSE_UNKNOWN_RATE
from .._docs import FRAGMENTS
from .._finetune import stratified_split
from ._comparison import comparison, store
from ._folds import folds_param, iter_folds

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@doc_params(**FRAGMENTS)
def novel_type_detection(
    adata: AnnData,
    label_key: str,
    *,
    leave_out: str | Sequence[str] | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    validation: float = 0.1,
    false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    folds: Sequence[int] | None = (0,),
    baselines: Sequence[str] = ("l1_logistic",),
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_novel",
) -> pd.DataFrame:
    """Leave each type out of training in turn and see whether its cells are called ``"unknown"``.

    For every left-out type and fold (the folds of :func:`~scbert_tl.tl.cross_validate`), a
    stratified share ``validation`` of the training folds' cells of the other (known) types is set
    aside as validation cells, and each method is trained on the remaining known cells. It then
    predicts the test fold's known cells and every cell of the left-out (novel) type.

    Two ways of calling cells ``"unknown"`` are reported:

    - the sweep (the returned frame): a cell is ``"unknown"`` when the method's probability of its
      most likely type is below the threshold (as :func:`~scbert_tl.tl.annotate` with a number as
      ``unknown_threshold``): scBERT's calibrated probability, L1 logistic regression's highest
      class probability, CellTypist's own probability of its best match;
    - the threshold chosen on the validation cells (``adata.uns[key_added]["chosen"]``), without
      the novel type, so that a share ``false_unknown_rate`` of them is called unknown, for each
      novelty score of each method: for scBERT ``"energy"`` (what ``annotate`` uses by default),
      ``"probability"`` and ``"calibrated_probability"`` (one minus the highest probability,
      before and after temperature scaling); for the baselines ``"probability"``, chosen by the
      same rule.

    Parameters
    ----------
    adata
        Labelled cells (raw counts or log-normalised), at least three types.
    label_key
        Column of ``adata.obs`` with the cell types.
    leave_out
        The type or types to leave out, each in its own run (default: every type in turn).
    thresholds
        Probability thresholds to sweep, each in [0, 1].
    validation
        Fraction of the known training cells set aside as validation cells (scBERT's model
        selection and calibration; every method's threshold choice).
    false_unknown_rate
        Share of the validation cells the chosen thresholds call unknown.
    {doc_folds}
    {doc_baselines}
    {doc_finetune_kwargs}
    rng
        Seed of the folds, of the validation cells and of the training.
    {doc_key_added}

    Returns
    -------
    A tidy frame, one row per method, left-out type, fold and threshold: ``novel_recall`` (fraction of
    the novel cells called ``"unknown"``), ``known_accuracy`` (fraction of known test cells given
    their true type; an ``"unknown"`` call counts as an error), ``known_unknown`` (fraction of known
    cells called ``"unknown"``), ``known_accuracy_forced`` (accuracy without ``"unknown"`` calls),
    ``ece`` (expected calibration error of the known test cells' forced predictions), ``n_train`` (cells
    trained on, the validation cells not counted),
    ``n_known``, ``n_novel``, seconds. Also written to ``adata.uns[key_added]`` with ``"results"``,
    ``"chosen"`` (one row per method, score, left-out type and fold: the ``threshold`` chosen on the
    validation cells, ``validation_unknown`` (the share of them it calls unknown), ``novel_recall``,
    ``known_accuracy``, ``known_unknown`` at that threshold, ``auroc`` (area under the ROC curve of
    the score, novel against known test cells) and ``ece``), ``"novel_as"`` (what the novel cells
    were predicted as without a threshold: method, left_out, fold, predicted, n) and ``"params"``.
    """
    thresholds = _check_args(thresholds, false_unknown_rate, validation)
    data = comparison(adata, label_key, model, validation, rng, baselines, finetune_kwargs)
    leave_out = _leave_out(leave_out, data.classes, label_key)
    rows: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    novel_as: list[dict[str, Any]] = []
    runs = list(iter_folds(data.labels, n_splits, 1, rng, folds))
    for novel_type in leave_out:
        is_novel = data.labels == novel_type
        for _, fold, train, test, _ in runs:
            train = train[~is_novel[train]]
            _, val = stratified_split(data.labels[train], validation, np.random.default_rng([rng, fold]))
            val_names = list(adata.obs_names[train[val]])
            test = np.union1d(test[~is_novel[test]], np.flatnonzero(is_novel))
            novel = is_novel[test]
            truth = data.labels[test]
            logger.info(
                "novel_type_detection: %r left out, fold %d: %d training (%d of them validation), %d known and "
                "%d novel test cells",
                novel_type,
                fold,
                train.size,
                val.size,
                (~novel).sum(),
                novel.sum(),
            )
            run = {"left_out": novel_type, "fold": fold}
            for method in data.methods:
                pred = data.run(method, train, test, validation=val_names, novelty=True)
                counts = {
                    "n_train": int(train.size - val.size),
                    "n_known": int((~novel).sum()),
                    "n_novel": int(novel.sum()),
                }
                found = _method_rows(method, pred, truth, novel, run, counts, thresholds, false_unknown_rate)
                rows += found[0]
                chosen += found[1]
                novel_as += found[2]
    frame = pd.DataFrame(rows)
    params = data.params(
        "novel_type_detection",
        leave_out=leave_out,
        thresholds=thresholds,
        false_unknown_rate=false_unknown_rate,
        n_splits=n_splits,
        folds=folds_param(folds),
    )
    store(adata, key_added, frame, params, chosen=pd.DataFrame(chosen), novel_as=pd.DataFrame(novel_as))
    return frame


def _check_args(thresholds: Sequence[float], false_unknown_rate: float, validation: float) -> list[float]:
    """The thresholds, sorted; errors for values out of range."""
    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or thresholds[0] < 0 or thresholds[-1] > 1:
        raise ValueError(f"thresholds must be in [0, 1], got {thresholds}.")
    if isinstance(false_unknown_rate, bool) or not 0 < false_unknown_rate < 1:
        raise ValueError(f"false_unknown_rate must be between 0 and 1, got {false_unknown_rate!r}.")
    if isinstance(validation, bool) or not 0 < validation < 1:
        raise ValueError(
            f"validation must be a fraction in (0, 1): the thresholds are chosen on those cells; got {validation!r}."
        )
    return thresholds


def _leave_out(leave_out: str | Sequence[str] | None, classes: list[str], label_key: str) -> list[str]:
    """The types to leave out in turn (default: each), checked against the data's types."""
    if len(classes) < 3:
        raise ValueError(f"Novel-type detection needs at least three types (two stay known); got {classes}.")
    if leave_out is None:
        leave_out = list(classes)
    leave_out = [leave_out] if isinstance(leave_out, str) else [str(t) for t in leave_out]
    missing = [t for t in leave_out if t not in classes]
    if missing:
        raise KeyError(f"leave_out types {missing} are not in adata.obs[{label_key!r}]; it has {classes}.")
    return leave_out


def _method_rows(
    method: str,
    pred: Any,
    truth: np.ndarray,
    novel: np.ndarray,
    run: dict[str, Any],
    counts: dict[str, int],
    thresholds: Sequence[float],
    false_unknown_rate: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One method's rows of one run: per fixed threshold, per novelty score at the validation-chosen threshold, and what the novel cells were called."""
    rows: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    right = pred.labels == truth
    ece = expected_calibration_error(pred.confidence[~novel], right[~novel])
    for t in thresholds:
        unknown = pred.confidence < t
        rows.append(
            {
                "method": method,
                **run,
                "threshold": t,
                **_rates(unknown, right, novel),
                "known_accuracy_forced": float(right[~novel].mean()),
                "ece": ece,
                **counts,
                "seconds": pred.seconds,
            }
        )
    for score, values in pred.novelty.items():
        threshold = float(np.quantile(pred.validation_novelty[score], 1 - false_unknown_rate))
        chosen.append(
            {
                "method": method,
                "score": score,
                **run,
                "threshold": threshold,
                "validation_unknown": float((pred.validation_novelty[score] > threshold).mean()),
                **_rates(values > threshold, right, novel),
                "auroc": _auroc(values, novel),
                "ece": ece,
            }
        )
    predicted, n = np.unique(pred.labels[novel], return_counts=True)
    novel_as = [{"method": method, **run, "predicted": str(p), "n": int(k)} for p, k in zip(predicted, n, strict=True)]
    best = next((c for c in chosen if c["score"] == NOVELTY_SCORE), chosen[0])  # what annotate uses
    logger.info(
        "  %s: at the threshold for %.0f%% false unknowns on validation cells (%s), novel recall %.3f, "
        "known accuracy %.3f; ECE %.3f",
        method,
        100 * false_unknown_rate,
        best["score"],
        best["novel_recall"],
        best["known_accuracy"],
        ece,
    )
    return rows, chosen, novel_as


def _rates(unknown: np.ndarray, right: np.ndarray, novel: np.ndarray) -> dict[str, float]:
    known = ~novel
    return {
        "novel_recall": float(unknown[novel].mean()),
        "known_accuracy": float((right & ~unknown)[known].mean()),
        "known_unknown": float(unknown[known].mean()),
    }


def _auroc(score: np.ndarray, novel: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(novel, score))
