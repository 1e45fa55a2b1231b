"""What every evaluation protocol shares: labelled data, stratified folds, the methods compared, scores, the record."""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._metrics import scores
from .._settings import settings

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Sequence

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)

#: Baselines the protocols can run beside scBERT (``"celltypist"`` needs the optional ``celltypist`` package).
BASELINES = ("l1_logistic", "celltypist")
#: Finetune arguments that choose the input (also used for the baselines' log-normalised expression).
INPUT_KEYS = ("gene_key", "layer", "use_raw")


def log_normalised(adata: AnnData, **input_params: Any) -> Any:
    """Cells normalised to 1e4 and ``log1p`` (natural log) over all genes, from counts or log input."""
    import anndata as ad
    import scanpy as sc

    from ..pp._expression import expression

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
        from ._finetune import finetune
        from ._predict import Annotation

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


# ------------------------------------------------------------------------------------------ data and folds
@dataclass
class Labelled:
    """Labelled cells checked once for every protocol, with the baselines' input made once."""

    adata: AnnData
    label_key: str
    labels: np.ndarray
    classes: list[str]
    finetune_kwargs: dict[str, Any]
    baselines: list[str]
    lognorm: Any = None
    genes: list[str] = field(default_factory=list)

    def run(
        self,
        method: str,
        train: np.ndarray,
        test: np.ndarray,
        *,
        model: str | os.PathLike | ScBERT,
        validation: float | Sequence[str],
        seed: int,
        ref: AnnData | None = None,
        novelty: bool = False,
    ) -> Prediction:
        """Train on rows ``train`` and predict rows ``test`` (``ref``: the training cells, if already subset).

        ``validation`` and ``novelty`` are those of :func:`predict`.
        """
        if np.intersect1d(train, test).size:  # no protocol builds this; never let it pass
            raise RuntimeError("A cell is in both the training and the test cells.")
        is_scbert = method == "scbert"
        return predict(
            method,
            (ref if ref is not None else self.adata[train].copy()) if is_scbert else self.adata[train],
            self.adata[test].copy() if is_scbert else self.adata[test],
            self.label_key,
            ref_x=None if is_scbert else self.lognorm[train],
            query_x=None if is_scbert else self.lognorm[test],
            genes=self.genes,
            model=model,
            validation=validation,
            finetune_kwargs=self.finetune_kwargs,
            seed=seed,
            novelty=novelty,
        )

    @property
    def methods(self) -> list[str]:
        """The methods compared: scBERT first, then the baselines."""
        return ["scbert", *self.baselines]


def gene_ids(adata: AnnData, gene_key: str | None = None) -> list[str]:
    """The gene identifiers the baselines use: ``adata.var[gene_key]`` or the var names."""
    return list(map(str, adata.var_names if gene_key is None else adata.var[gene_key]))


def labelled(
    adata: AnnData,
    label_key: str,
    *,
    baselines: Sequence[str],
    finetune_kwargs: dict[str, Any] | None,
    baseline_input: bool = True,
) -> Labelled:
    """Check the labels and the input, and make the baselines' log-normalised expression (when there are baselines).

    ``baseline_input=False``: leave the expression to the caller.
    """
    from ..data import class_order, input_params
    from ._finetune import check_labels_present

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
    data = Labelled(adata, label_key, labels, class_order(labels), finetune_kwargs, baselines)
    if baselines and baseline_input:
        params = input_params(adata, **{k: finetune_kwargs.get(k) for k in INPUT_KEYS if k in finetune_kwargs})
        data.lognorm = log_normalised(adata, **params)
        data.genes = gene_ids(adata, params.get("gene_key"))
    return data


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


# ------------------------------------------------------------------------------------------ scores and record
def score_row(prediction: Prediction, truth: np.ndarray, classes: Sequence[str], **columns: Any) -> dict[str, Any]:
    """One tidy row: the given columns, accuracy, macro F1, expected calibration error, seconds and F1 per class (``f1:<type>``).

    The expected calibration error (``ece``: 15 equal-width confidence bins)
    compares the method's probability of each predicted type with how often it is right.
    """
    from ..train._calibration import expected_calibration_error

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


def base_params(data: Labelled, model: Any, rng: int, validation: float, **protocol: Any) -> dict[str, Any]:
    """The ``uns[key]["params"]`` record: the protocol's own arguments, the seed, the methods and the finetune options."""
    return {
        "label_key": data.label_key,
        "model": model if isinstance(model, str) else type(model).__name__,
        **protocol,
        "validation": validation,
        "baselines": list(data.baselines),
        "rng": rng,
        "device": str(settings.resolve_device()),
        **{k: v for k, v in data.finetune_kwargs.items() if isinstance(v, int | float | str | bool)},
    }


def store(adata: AnnData, key_added: str, frame: pd.DataFrame, params: dict[str, Any], **extra: Any) -> None:
    """Write ``{"results": frame, **extra, "params": params}`` to ``adata.uns[key_added]``."""
    if key_added in adata.uns:
        logger.info("replacing adata.uns[%r]", key_added)
    adata.uns[key_added] = {"results": frame, **extra, "params": params}
