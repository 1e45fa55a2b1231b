"""The methods the protocols compare: scBERT fine-tuned on the training cells, and the baselines (L1 logistic regression, CellTypist)."""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)

#: Baselines the protocols can run beside scBERT (``"celltypist"`` needs the optional ``celltypist`` package).
BASELINES = ("l1_logistic", "celltypist")
#: Finetune arguments that choose the input (also used for the baselines' log-normalised expression).
INPUT_KEYS = ("gene_key", "layer", "use_raw")


def log_normalised(adata: AnnData, **input_params: Any) -> Any:
    """Cells normalised to 1e4 and ``log1p`` (natural log) over all genes, from counts or log input."""
    import anndata as ad
    import scanpy as sc

    from ...pp._expression import expression

    tmp = ad.AnnData(expression(adata, **input_params))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp.X


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Prediction:
    """A method's most likely type per test cell, its probability, and the seconds it took.

    ``probabilities`` (cells x ``classes``) are the method's class probabilities; ``novelty`` holds
    novelty scores of the test cells (higher = less like the training types) and
    ``validation_novelty`` the same scores of the validation cells, when the protocol asked for them.
    """

    labels: np.ndarray
    confidence: np.ndarray
    seconds: float
    probabilities: np.ndarray | None = None
    classes: list[str] | None = None
    novelty: dict[str, np.ndarray] = field(default_factory=dict)
    validation_novelty: dict[str, np.ndarray] = field(default_factory=dict)


def _l1_model(seed: int) -> Any:
    import sklearn
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 deprecated penalty= in favour of l1_ratio= (1 = the L1 penalty)
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    penalty = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(solver="saga", C=1.0, random_state=seed, **penalty)


def _fit_l1(train_x: Any, train_y: Sequence[str], seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    clf = _l1_model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, np.asarray(train_y, dtype=str))
    return clf


def l1_logistic(train_x: Any, train_y: Sequence[str], test_x: Any, *, seed: int = 0) -> np.ndarray:
    """Predictions of L1 logistic regression (``C=1``, saga), the baseline of the published re-evaluations."""
    return _fit_l1(train_x, train_y, seed).predict(test_x)


def celltypist_available() -> bool:
    """Whether the optional ``celltypist`` package can be imported."""
    return importlib.util.find_spec("celltypist") is not None


def resolve_baselines(baselines: Sequence[str]) -> list[str]:
    """Checked baseline names; CellTypist is skipped, with a logged message, when it is not installed."""
    if isinstance(baselines, str):
        baselines = [baselines]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"Unknown baselines {unknown}; available: {list(BASELINES)}.")
    out = list(dict.fromkeys(baselines))
    if "celltypist" in out and not celltypist_available():
        logger.warning(
            "The celltypist baseline is skipped: the optional package is not installed "
            "(pip install 'scbert-tl[benchmark]' or pip install celltypist)."
        )
        out.remove("celltypist")
    return out


def _celltypist(
    train_x: Any, train_y: np.ndarray, test_xs: Sequence[Any], genes: Sequence[str], seed: int
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """CellTypist trained on the training cells only: its classes, and its best match and probability matrix for each of ``test_xs``.

    CellTypist fits one-vs-rest logistic regression on scaled log-normalised expression, here by
    stochastic gradient descent (its ``use_SGD`` mode). Its best match is the class of the highest
    decision value; its probabilities are the sigmoids of the one-vs-rest decision values (they need
    not sum to one, and often all round to 0 or 1 in this mode, so their argmax is no prediction).
    """
    import contextlib
    import io

    import anndata as ad
    import celltypist

    genes = np.asarray(genes, dtype=str)
    train = ad.AnnData(train_x, obs=pd.DataFrame({"label": train_y}, index=map(str, range(train_x.shape[0]))))
    train.var_names = genes
    out = []
    # CellTypist's stochastic-gradient mode: its default solver passes an option scikit-learn 1.8 removed
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(
            train, labels="label", use_SGD=True, n_jobs=1, check_expression=False, random_state=seed
        )
        for x in test_xs:
            test = ad.AnnData(x, obs=pd.DataFrame(index=map(str, range(x.shape[0]))))
            test.var_names = genes
            result = celltypist.annotate(test, model=model, majority_voting=False)
            labels = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
            out.append((labels, result.probability_matrix))
    classes = [str(c) for c in out[0][1].columns]
    return classes, [(labels, probs[classes].to_numpy(dtype=np.float64)) for labels, probs in out]


def _of_label(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Each cell's probability of its predicted type."""
    column = pd.Index(classes).get_indexer(np.asarray(labels, dtype=str))
    return probabilities[np.arange(len(labels)), column].astype(np.float64)


def _confidence_scores(confidence: np.ndarray) -> dict[str, np.ndarray]:
    return {"probability": 1 - confidence}


def predict(
    method: str,
    ref: AnnData,
    query: AnnData,
    label_key: str,
    *,
    ref_x: Any = None,
    query_x: Any = None,
    genes: Sequence[str] | None = None,
    model: str | os.PathLike | ScBERT = "compact",
    validation: float | Sequence[str] = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    novelty: bool = False,
) -> Prediction:
    """Train ``method`` on ``ref`` (labelled) and predict ``query``; nothing of the query is used for training.

    scBERT is fine-tuned on ``ref`` (its validation cells, for model selection and calibration,
    drawn from ``ref``) and predicts ``query`` with its calibrated probabilities, without
    ``"unknown"`` calls. The baselines use the log-normalised ``ref_x`` / ``query_x`` (same genes,
    ``genes``). When ``validation`` names cells of ``ref``, every method is trained without them, and
    with ``novelty`` each returns novelty scores of the query and of those validation cells (scBERT:
    every score of :func:`~scbert_tl.tl.annotate`; the baselines: one minus their probability of the
    predicted type).
    """
    t0 = time.perf_counter()
    truth = ref.obs[label_key].astype(str).to_numpy()
    held = None if isinstance(validation, float | int) else np.asarray(ref.obs_names.isin(list(validation)))
    if novelty and (held is None or not held.any()):
        raise ValueError("Novelty scores need named validation cells (validation=<obs names of ref>).")
    fit = slice(None) if held is None else ~held
    scores: dict[str, np.ndarray] = {}
    validation_scores: dict[str, np.ndarray] = {}
    if method == "scbert":
        from .._finetune import finetune
        from .._predict import Annotation

        if held is not None:
            validation = list(ref.obs_names[held])
        m = finetune(
            ref, label_key, model=model, validation=validation, rng=seed, split_key=None, **(finetune_kwargs or {})
        )
        kwargs = {k: v for k, v in (finetune_kwargs or {}).items() if k in INPUT_KEYS}
        annotation = Annotation.predict(query, m, **kwargs)
        probs, scores, classes, labels = (
            annotation.probabilities,
            annotation.scores,
            annotation.classes,
            annotation.labels,
        )
        if novelty:
            validation_scores = Annotation.predict(ref[held].copy(), m, **kwargs).scores
    elif method == "l1_logistic":
        clf = _fit_l1(ref_x[fit], truth[fit], seed)
        probs, classes = clf.predict_proba(query_x), [str(c) for c in clf.classes_]
        labels = np.asarray(classes, dtype=str)[probs.argmax(1)]
        if novelty:
            validation_scores = _confidence_scores(clf.predict_proba(ref_x[held]).max(1))
    elif method == "celltypist":
        tests = [query_x, ref_x[held]] if novelty else [query_x]
        classes, out = _celltypist(ref_x[fit], truth[fit], tests, genes, seed)
        labels, probs = out[0]
        if novelty:
            validation_scores = _confidence_scores(_of_label(*out[1], classes))
    else:
        raise ValueError(f"Unknown method {method!r}; available: {['scbert', *BASELINES]}.")
    confidence = _of_label(labels, probs, classes)
    if novelty and method != "scbert":
        scores = _confidence_scores(confidence)
    return Prediction(
        labels,
        confidence,
        time.perf_counter() - t0,
        probabilities=probs,
        classes=classes,
        novelty=scores if novelty else {},
        validation_novelty=validation_scores,
    )


def gene_ids(adata: AnnData, gene_key: str | None = None) -> list[str]:
    """The gene identifiers the baselines use: ``adata.var[gene_key]`` or the var names."""
    return list(map(str, adata.var_names if gene_key is None else adata.var[gene_key]))
