"""What every protocol does around its folds: check the labelled cells, run the methods, score them, keep the record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._metrics import scores
from ..._settings import settings
from ._methods import INPUT_KEYS, Prediction, gene_ids, log_normalised, predict, resolve_baselines

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)


@dataclass
class Comparison:
    """Labelled cells checked once for a protocol, the methods it compares and how they train.

    ``model``, ``validation`` and ``rng`` are the protocol's arguments (the starting point of
    :func:`~scbert_tl.tl.finetune`, its validation share, the seed); the baselines' log-normalised
    input is made once (``lognorm``, on ``genes``).
    """

    adata: AnnData
    label_key: str
    labels: np.ndarray
    classes: list[str]
    finetune_kwargs: dict[str, Any]
    baselines: list[str]
    model: str | os.PathLike | ScBERT
    validation: float
    rng: int
    lognorm: Any = None
    genes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """The methods compared: scBERT first, then the baselines."""
        return ["scbert", *self.baselines]

    def run(
        self,
        method: str,
        train: np.ndarray,
        test: np.ndarray,
        *,
        validation: float | Sequence[str] | None = None,
        seed: int | None = None,
        novelty: bool = False,
    ) -> Prediction:
        """Train on rows ``train`` and predict rows ``test``.

        ``validation`` (default: the protocol's) and ``novelty`` are those of
        :func:`~scbert_tl.tl._evaluation._methods.predict`; ``seed`` defaults to the protocol's ``rng``.
        """
        if np.intersect1d(train, test).size:  # no protocol builds this; never let it pass
            raise RuntimeError("A cell is in both the training and the test cells.")
        is_scbert = method == "scbert"
        return predict(
            method,
            self.adata[train].copy() if is_scbert else self.adata[train],
            self.adata[test].copy() if is_scbert else self.adata[test],
            self.label_key,
            ref_x=None if is_scbert else self.lognorm[train],
            query_x=None if is_scbert else self.lognorm[test],
            genes=self.genes,
            model=self.model,
            validation=self.validation if validation is None else validation,
            finetune_kwargs=self.finetune_kwargs,
            seed=self.rng if seed is None else seed,
            novelty=novelty,
        )

    def params(self, protocol: str, **arguments: Any) -> dict[str, Any]:
        """The ``uns[key]["params"]`` record: the protocol's own arguments, the seed, the methods and the finetune options."""
        return {
            "label_key": self.label_key,
            "model": self.model if isinstance(self.model, str) else type(self.model).__name__,
            "protocol": protocol,
            **arguments,
            "validation": self.validation,
            "baselines": list(self.baselines),
            "rng": self.rng,
            "device": str(settings.resolve_device()),
            **{k: v for k, v in self.finetune_kwargs.items() if isinstance(v, int | float | str | bool)},
        }


def comparison(
    adata: AnnData,
    label_key: str,
    model: str | os.PathLike | ScBERT,
    validation: float,
    rng: int,
    baselines: Sequence[str],
    finetune_kwargs: dict[str, Any] | None,
    *,
    baseline_input: bool = True,
) -> Comparison:
    """Check the labels and the input, and make the baselines' log-normalised expression (when there are baselines).

    The arguments after ``label_key`` are the protocol's own. ``baseline_input=False``: leave the
    expression to the caller.
    """
    from ...data import class_order, input_params
    from .._finetune import check_labels_present

    if label_key not in adata.obs:
        raise KeyError(f"label_key={label_key!r} is not a column of adata.obs; columns are {list(adata.obs.columns)}.")
    if not adata.obs_names.is_unique:
        raise ValueError("adata.obs_names must be unique (adata.obs_names_make_unique()) to keep folds apart.")
    labels = adata.obs[label_key]
    check_labels_present(labels, label_key)
    labels = labels.astype(str).to_numpy()
    finetune_kwargs = dict(finetune_kwargs or {})
    for key in ("rng", "validation", "model", "split_key"):
        if key in finetune_kwargs:
            raise ValueError(f"finetune_kwargs may not set {key!r}: it is an argument of the protocol itself.")
    baselines = resolve_baselines(baselines)
    data = Comparison(adata, label_key, labels, class_order(labels), finetune_kwargs, baselines, model, validation, rng)
    if baselines and baseline_input:
        params = input_params(adata, **{k: finetune_kwargs.get(k) for k in INPUT_KEYS if k in finetune_kwargs})
        data.lognorm = log_normalised(adata, **params)
        data.genes = gene_ids(adata, params.get("gene_key"))
    return data


def score_row(prediction: Prediction, truth: np.ndarray, classes: Sequence[str], **columns: Any) -> dict[str, Any]:
    """One tidy row: the given columns, accuracy, macro F1, expected calibration error, seconds and F1 per class (``f1:<type>``).

    The expected calibration error (``ece``: 15 equal-width confidence bins)
    compares the method's probability of each predicted type with how often it is right.
    """
    from ...train._calibration import expected_calibration_error

    s = scores(truth, prediction.labels, classes)
    correct = np.asarray(prediction.labels, dtype=str) == np.asarray(truth, dtype=str)
    return {
        **columns,
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "ece": expected_calibration_error(prediction.confidence, correct),
        "seconds": prediction.seconds,
        **{f"f1:{c}": v for c, v in s["per_class_f1"].items()},
    }


def summarise(
    frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = ("accuracy", "macro_f1")
) -> pd.DataFrame:
    """Mean and standard deviation of the metrics per group, flat columns (``accuracy_mean``, ...)."""
    summary = frame.groupby(list(by), sort=False)[list(metrics)].agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    return summary.reset_index()


def store(adata: AnnData, key_added: str, frame: pd.DataFrame, params: dict[str, Any], **extra: Any) -> None:
    """Write ``{"results": frame, **extra, "params": params}`` to ``adata.uns[key_added]``."""
    if key_added in adata.uns:
        logger.info("replacing adata.uns[%r]", key_added)
    adata.uns[key_added] = {"results": frame, **extra, "params": params}
