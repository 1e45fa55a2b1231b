"""The folds every protocol shares: stratified k-fold splits, the folds selected, stratified subsets."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)


def fold_splits(labels: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (shuffled, ``random_state=seed``): (training rows, test rows) per fold."""
    from sklearn.model_selection import StratifiedKFold

    if isinstance(n_splits, bool) or not isinstance(n_splits, int | np.integer) or n_splits < 2:
        raise ValueError(f"n_splits must be an integer of at least 2, got {n_splits!r}.")
    smallest = pd.Series(labels).value_counts().min()
    if smallest < n_splits:
        logger.warning("The rarest type has %d cells, fewer than n_splits=%d: some folds test none", smallest, n_splits)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the rare-type warning above says it once
        return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(labels.size), labels)]


def selected_folds(folds: Sequence[int] | None, n_splits: int) -> set[int] | None:
    """The folds to run (None = all), checked."""
    if folds is None:
        return None
    selected = {int(f) for f in ([folds] if isinstance(folds, int | np.integer) else folds)}
    if not selected or not selected <= set(range(n_splits)):
        raise ValueError(f"folds must be between 0 and {n_splits - 1}, got {sorted(selected)}.")
    return selected


def iter_folds(
    labels: np.ndarray, n_splits: int, n_repeats: int, seed: int, folds: Sequence[int] | None
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """``(repeat, fold, train, test, assignment)`` for the selected folds of every repeat (repeat ``r`` uses ``seed + r``).

    ``assignment`` holds each cell's test fold in that repeat (the same whichever folds are selected).
    """
    selected = selected_folds(folds, n_splits)
    for repeat in range(n_repeats):
        splits = fold_splits(labels, n_splits, seed + repeat)
        assignment = np.full(labels.size, -1, dtype=np.int64)
        for fold, (_, test) in enumerate(splits):
            assignment[test] = fold
        for fold, (train, test) in enumerate(splits):
            if selected is None or fold in selected:
                yield repeat, fold, train, test, assignment


def stratified_subsample(labels: np.ndarray, order: np.random.Generator | np.ndarray, fraction: float) -> np.ndarray:
    """Positions of a stratified share of ``labels``: the first ``round(fraction * n)`` (at least one) of each type.

    ``order`` is a permutation of the positions (or a generator to draw one); taking prefixes of the
    same permutation makes the subsets of growing fractions nested.
    """
    if isinstance(order, np.random.Generator):
        order = order.permutation(labels.size)
    keep = []
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        keep.append(rows[: max(1, round(fraction * rows.size))])
    return np.sort(np.concatenate(keep))


def folds_param(folds: Sequence[int] | None) -> str | list[int]:
    """The ``folds`` argument as the protocols record it: ``"all"`` or the sorted fold numbers."""
    return "all" if folds is None else sorted(int(f) for f in folds)
