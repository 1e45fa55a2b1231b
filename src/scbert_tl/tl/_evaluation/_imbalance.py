"""``scbert.tl.class_imbalance``: the published imbalance design (large and rare types alternating), scaled to the data."""

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


def _types(labels: np.ndarray, types: Sequence[str] | None, label_key: str) -> list[str]:
    """The types of the design (default: the four largest), checked."""
    counts = pd.Series(labels).value_counts()
    if types is None:
        types = list(counts.index[:4])
    types = [str(t) for t in types]
    missing = [t for t in types if t not in counts.index]
    if missing:
        raise KeyError(f"Types {missing} are not in adata.obs[{label_key!r}]; it has {sorted(counts.index)}.")
    if len(types) < 2 or len(set(types)) != len(types):
        raise ValueError(f"types must name at least two different cell types, got {types}.")
    return types


def _design(
    labels: np.ndarray,
    runs: list[Any],
    types: list[str],
    n_large: int | None,
    n_small: int | None,
    ratio: float,
) -> tuple[dict[str, int], int, int]:
    """Training cells per type (large types at even positions, rare ones at odd), checked against every fold."""
    large = types[0::2]
    available = {t: min(int((labels[train] == t).sum()) for _, _, train, _, _ in runs) for t in types}
    if n_large is None:
        n_large = min(available[t] for t in large)
    if n_small is None:
        n_small = max(1, round(n_large / ratio))
    design = {t: int(n_large if t in large else n_small) for t in types}
    short = {t: (n, available[t]) for t, n in design.items() if n > available[t] or n < 1}
    if short:
        raise ValueError(
            "The design asks for more training cells than a type has in the training folds (or fewer than one): "
            + ", ".join(f"{t}: {n} asked, {a} available" for t, (n, a) in short.items())
            + "; pass smaller n_large / n_small."
        )
    return design, n_large, n_small


@doc_params(**FRAGMENTS)
def class_imbalance(
    adata: AnnData,
    label_key: str,
    *,
    types: Sequence[str] | None = None,
    n_large: int | None = None,
    n_small: int | None = None,
    ratio: float = 100,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    folds: Sequence[int] | None = (0,),
    baselines: Sequence[str] = ("l1_logistic",),
    validation: float = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_imbalance",
) -> pd.DataFrame:
    """Train on a few types, large and rare ones alternating, and score how well the rare ones are recognised.

    The scBERT paper trained on four types with 10,000 / 100 / 10,000 / 100 cells. Here the first
    and third of ``types`` get ``n_large`` training cells and the second and fourth ``n_small``
    (drawn at random from the training folds of :func:`~scbert_tl.tl.cross_validate`'s split),
    and every method is scored on all test-fold cells of these types. Watch the per-class F1 of
    the rare types.

    Parameters
    ----------
    {doc_labelled}
    types
        Types in design order (large, small, large, small, ...; any even or odd number of at least
        two). Default: the four most abundant types.
    n_large
        Training cells of each large type. Default: as many as every large type has in every fold
        run.
    n_small
        Training cells of each rare type. Default: ``n_large / ratio`` (at least one).
    ratio
        Large-to-small ratio used when ``n_small`` is not given (the paper's is 100).
    {doc_folds}
    {doc_baselines}
    validation
        Fraction of the training cells held out for model selection (stratified; a type of one
        cell keeps it for training).
    {doc_finetune_kwargs}
    rng
        Seed of the folds, of the drawn training cells and of the training.
    {doc_key_added}

    Returns
    -------
    A tidy frame, one row per method and fold: ``n_train``, ``n_test``, ``accuracy``, ``macro_f1``
    (over the chosen types), ``f1:<type>`` per chosen type, seconds. Also written to
    ``adata.uns[key_added]`` with ``"results"``, ``"summary"``, ``"design"`` (training cells per
    type), ``"rare"`` (the rare types), ``"training_cells"`` (obs names per fold) and ``"params"``.
    """
    data = comparison(adata, label_key, model, validation, rng, baselines, finetune_kwargs)
    types = _types(data.labels, types, label_key)
    rare = types[1::2]
    runs = list(iter_folds(data.labels, n_splits, 1, rng, folds))
    design, n_large, n_small = _design(data.labels, runs, types, n_large, n_small, ratio)
    logger.info("class_imbalance: training cells per type %s", design)
    rows: list[dict[str, Any]] = []
    training_cells: dict[str, np.ndarray] = {}
    for _, fold, train, test, _ in runs:
        draw = np.random.default_rng([rng, fold])
        sub = np.sort(np.concatenate([draw.permutation(train[data.labels[train] == t])[: design[t]] for t in types]))
        test = test[np.isin(data.labels[test], types)]
        training_cells[str(fold)] = np.asarray(adata.obs_names[sub], dtype=str)
        for method in data.methods:
            pred = data.run(method, sub, test)
            row = score_row(
                pred, data.labels[test], types, method=method, fold=fold, n_train=int(sub.size), n_test=int(test.size)
            )
            rows.append(row)
            logger.info(
                "  %s: macro F1 %.3f, rare types' F1 %s",
                method,
                row["macro_f1"],
                {t: round(row[f"f1:{t}"], 3) for t in rare},
            )
    frame = pd.DataFrame(rows)
    params = data.params(
        "class_imbalance",
        types=types,
        n_large=int(n_large),
        n_small=int(n_small),
        ratio=ratio,
        n_splits=n_splits,
        folds=folds_param(folds),
    )
    metrics = ["accuracy", "macro_f1", *(f"f1:{t}" for t in types)]
    store(
        adata,
        key_added,
        frame,
        params,
        summary=summarise(frame, ["method"], metrics),
        design=design,
        rare=rare,
        training_cells=training_cells,
    )
    return frame
