"""``scbert.tl.annotate``: predicted cell types, confidences and class probabilities."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from .._docs import doc_params
from ..data import UNKNOWN
from ..train._calibration import threshold_for_rate
from ._docs import FRAGMENTS
from ._predict import Annotation, options_of, require_classifier, start

if TYPE_CHECKING:
    import os

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)

#: Share of known cells called "unknown" that ``unknown_threshold="auto"`` aims for.
DEFAULT_FALSE_UNKNOWN_RATE = 0.05


def annotate_params(m: ScBERT, unknown_threshold: float | str, rule: dict[str, Any]) -> dict[str, Any]:
    """The ``uns[key_added]["params"]["annotate"]`` record of an annotation."""
    return {
        "unknown_threshold": unknown_threshold,
        "unknown_score": rule["score"],
        "unknown_score_threshold": rule["threshold"],
        "false_unknown_rate": "" if rule["false_unknown_rate"] is None else rule["false_unknown_rate"],
        "temperature": m.calibration["temperature"] if m.calibration else 1.0,
        "model": str(m.provenance.get("source", "")),
        "label_key": str(m.provenance.get("label_key", "")),
    }


def log_calls(n_cells: int, n_unknown: int, rule: dict[str, Any]) -> None:
    """Log how many cells were called unknown, and by which rule."""
    logger.info(
        "annotate: %d cells, %d (%.1f%%) called %r (%s)",
        n_cells,
        n_unknown,
        100 * n_unknown / max(n_cells, 1),
        UNKNOWN,
        f"energy above {rule['threshold']:.3g}, the threshold for {rule['false_unknown_rate']:.0%} false unknowns "
        "on the validation cells"
        if rule["false_unknown_rate"] is not None
        else f"highest probability below {rule['threshold']:.2f}",
    )


def unknown_rule(m: ScBERT, unknown_threshold: float | str, false_unknown_rate: float | None) -> dict[str, Any]:
    """How a cell is called "unknown": its energy above a threshold, or its (calibrated) probability below one."""
    if isinstance(unknown_threshold, str):
        if unknown_threshold != "auto":
            raise ValueError(f"unknown_threshold must be 'auto' or a number in [0, 1], got {unknown_threshold!r}.")
        rate = DEFAULT_FALSE_UNKNOWN_RATE if false_unknown_rate is None else false_unknown_rate
        if m.calibration and "quantiles" in m.calibration:
            return {
                "score": m.calibration["score"],
                "threshold": threshold_for_rate(m.calibration["quantiles"], rate),
                "false_unknown_rate": rate,
            }
        logger.warning(
            "annotate: this model has no validation record (fine-tuned before scbert-tl kept one, loaded from an "
            "original checkpoint, or trained without validation cells), so unknown_threshold='auto' falls back to "
            "the highest class probability below 0.5. Fine-tune it again to get a threshold chosen on validation cells."
        )
        unknown_threshold = 0.5
    elif false_unknown_rate is not None:
        raise ValueError("false_unknown_rate applies to unknown_threshold='auto' only; pass one or the other.")
    if isinstance(unknown_threshold, bool) or not 0 <= unknown_threshold <= 1:
        raise ValueError(f"unknown_threshold must be 'auto' or a number in [0, 1], got {unknown_threshold!r}.")
    return {"score": "probability", "threshold": float(unknown_threshold), "false_unknown_rate": None}


@doc_params(**FRAGMENTS)
def annotate(
    adata: AnnData,
    model: str | os.PathLike | ScBERT,
    *,
    unknown_threshold: float | Literal["auto"] = "auto",
    false_unknown_rate: float | None = None,
    key_added: str = "scbert",
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    chunk_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict cell types; cells unlike every type the model knows are called ``"unknown"``.

    The query's genes are aligned to the model's panel whatever their order or coverage
    (:func:`scbert_tl.pp.bin` runs first when needed; the coverage is logged and kept in
    ``adata.uns[key_added]["coverage"]``). Probabilities are calibrated with the temperature
    :func:`~scbert_tl.tl.finetune` fitted on its validation cells.

    By default (``unknown_threshold="auto"``) a cell is ``"unknown"`` when its energy score (minus
    the log-sum-exp of the classifier's logits; high when no type fits the cell) exceeds the
    threshold that calls a share ``false_unknown_rate`` of the model's validation cells unknown:
    with the default 5%, about 1 in 20 cells of the known types is expected to be called unknown,
    and cells of a type absent from training far more often. With B cells left out of PBMC3k, the
    energy score told them from known cells far better than the highest class probability (AUROC
    0.96 against 0.75), and about as well with gamma cells left out of the Baron pancreas (0.97
    against 0.98; see the benchmarks page).

    Parameters
    ----------
    adata
        Cells to annotate (raw counts or log-normalised; see :func:`scbert_tl.pp.bin`).
    model
        A fine-tuned :class:`~scbert_tl.ScBERT` or the path of a saved one.
    unknown_threshold
        ``"auto"``: the energy-score threshold chosen on the model's validation cells for
        ``false_unknown_rate`` (models without that record, e.g. original checkpoints, fall back
        to 0.5 below, with a logged warning). A number in [0, 1]: cells whose highest (calibrated)
        class probability is below it are called ``"unknown"`` (0 = never).
    false_unknown_rate
        With ``"auto"``: the share of known cells one accepts to see called ``"unknown"``, as
        measured on the validation cells (default 0.05).
    key_added
        Name of the ``obs`` column and prefix of the other slots.
    batch_size
        Cells per forward pass (default: :attr:`scbert.settings.batch_size <scbert_tl._settings.ScBERTSettings.batch_size>`).
    {doc_inputs}
    {doc_device}
    {doc_precision}
    chunk_size
        Cells read at a time when ``adata`` is out of core (opened with ``backed="r"``, or a dask
        array as input): such data is read and binned a chunk at a time and never written to, so
        memory holds one chunk plus the results (see the "Large data" page). Default 8192.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy with ``copy=True``. Writes:

    ``adata.obs[key_added]``
        Predicted type (categorical: the model's classes and ``"unknown"``).
    ``adata.obs[f"{{key_added}}_confidence"]``
        Probability of the most likely class (calibrated).
    ``adata.obs[f"{{key_added}}_novelty"]``
        The energy score (higher: less like any type of the model).
    ``adata.obsm[f"{{key_added}}_probabilities"]``
        Probability of every class (calibrated), columns in the order of ``adata.uns[key_added]["classes"]``.
    ``adata.uns[key_added]``
        ``"classes"``, and the parameters under ``["params"]["annotate"]``: the rule that called
        cells unknown (``"unknown_score"``: ``"energy"`` or ``"probability"``, ``"unknown_score_threshold"``,
        ``"false_unknown_rate"``)
        and the ``"temperature"`` (the record of :func:`scbert_tl.pp.bin` at the same key is kept).
    """
    arguments = dict(locals())
    adata, m = start(adata, model, copy=copy, batch_size=batch_size, device=device, precision=precision)
    require_classifier(m)
    rule = unknown_rule(m, unknown_threshold, false_unknown_rate)
    annotation = Annotation.predict(adata, m, **options_of(arguments))
    n_unknown = annotation.write(adata, key_added, rule, annotate_params(m, unknown_threshold, rule))
    log_calls(adata.n_obs, n_unknown, rule)
    return adata if copy else None
