"""``scbert.tl.annotate``: predicted cell types, confidences and class probabilities."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..pp._bin import tokens_for
from ..train import run_batches
from ..train._inference import check_compute
from ._finetune import UNKNOWN
from ._resolve import model_for_inference

if TYPE_CHECKING:
    import os

    from anndata import AnnData

    from .._scbert import ScBERT
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)


def _probabilities(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(network(x).float(), dim=-1)


def annotate(
    adata: AnnData,
    model: str | os.PathLike | ScBERT,
    *,
    unknown_threshold: float = 0.5,
    key_added: str = "scbert",
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict cell types; cells the model is not confident about are called ``"unknown"``.

    The query's genes are aligned to the model's panel whatever their order or coverage
    (:func:`scbert_tl.pp.bin` runs first when needed; the coverage is logged and kept in
    ``adata.uns[key_added]["coverage"]``).

    Parameters
    ----------
    adata
        Cells to annotate (raw counts or log-normalised; see :func:`scbert_tl.pp.bin`).
    model
        A fine-tuned :class:`~scbert_tl.ScBERT` or the path of a saved one.
    unknown_threshold
        Cells whose highest class probability is below this are called ``"unknown"`` (0 = never).
    key_added
        Name of the ``obs`` column and prefix of the other slots.
    batch_size
        Cells per forward pass (default: :attr:`scbert.settings.batch_size <scbert_tl._settings.ScBERTSettings.batch_size>`).
    gene_key, layer, use_raw
        Input choices of :func:`scbert_tl.pp.bin`, used when ``adata`` is binned for the model
        (default: those of the last ``pp.bin`` call, else ``adata.X`` and ``adata.var_names``).
    device
        Compute device (default: the setting).
    precision
        Autocast precision (default: bf16 on CUDA, float32 on CPU).
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy with ``copy=True``. Writes:

    ``adata.obs[key_added]``
        Predicted type (categorical: the model's classes and ``"unknown"``).
    ``adata.obs[f"{key_added}_confidence"]``
        Probability of the most likely class.
    ``adata.obsm[f"{key_added}_probabilities"]``
        Probability of every class, columns in the order of ``adata.uns[key_added]["classes"]``.
    ``adata.uns[key_added]``
        ``"classes"``, and the parameters under ``["params"]["annotate"]`` (the record of
        :func:`scbert_tl.pp.bin` at the same key is kept).
    """
    if not 0 <= unknown_threshold <= 1:
        raise ValueError(f"unknown_threshold must be between 0 and 1, got {unknown_threshold}.")
    check_compute(device, precision, batch_size)  # before anything is written
    if copy:
        adata = adata.copy()
    m = model_for_inference(model, adata)
    if m.classes is None or m.network.classifier is None:
        raise ValueError(
            "This model has no classifier (it is pretrained only); fine-tune it first: "
            "model = scbert.tl.finetune(reference, 'cell_type', model=model)."
        )
    tokens = tokens_for(adata, m, gene_key=gene_key, layer=layer, use_raw=use_raw)
    (probs,) = run_batches(
        m.network, tokens, _probabilities, batch_size=batch_size, device=device, precision=precision, desc="annotate"
    )
    best = probs.argmax(1)
    confidence = probs[np.arange(probs.shape[0]), best]
    names = np.asarray(m.classes, dtype=object)[best]
    names[confidence < unknown_threshold] = UNKNOWN
    for key in (key_added, f"{key_added}_confidence"):
        if key in adata.obs:
            logger.info("annotate: replacing adata.obs[%r]", key)
    adata.obs[key_added] = pd.Categorical(names, categories=[*m.classes, UNKNOWN])
    adata.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
    adata.obsm[f"{key_added}_probabilities"] = probs.astype(np.float32)
    record = dict(adata.uns.get(key_added, {}))
    record["classes"] = list(m.classes)
    record["params"] = {
        **dict(record.get("params", {})),
        "annotate": {
            "unknown_threshold": unknown_threshold,
            "model": str(m.provenance.get("source", "")),
            "label_key": str(m.provenance.get("label_key", "")),
        },
    }
    adata.uns[key_added] = record
    n_unknown = int((confidence < unknown_threshold).sum())
    logger.info(
        "annotate: %d cells, %d (%.1f%%) called %r below confidence %.2f",
        adata.n_obs,
        n_unknown,
        100 * n_unknown / max(adata.n_obs, 1),
        UNKNOWN,
        unknown_threshold,
    )
    return adata if copy else None
