"""A model's outputs for the cells of an AnnData as arrays, and the annotation they make.

:func:`predict` returns plain arrays (nothing is written into ``adata`` but the bins of
:func:`scbert_tl.pp.bin` when they are missing); :class:`Annotation` holds a classifier's
probabilities and novelty scores and writes the slots of :func:`~scbert_tl.tl.annotate`. The tools
and the evaluation protocols share both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..data import UNKNOWN
from ..train._calibration import NOVELTY_SCORE, novelty_scores, softmax
from ..train._inference import check_compute
from ..train._predict import classifier_hidden, logits, mean_encoding
from ._resolve import model_for_inference
from ._stream import check_copy, model_outputs

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from anndata import AnnData

    from .._scbert import ScBERT
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)

Output = Literal["logits", "genes", "classifier"]
#: The tools' input and compute arguments, passed on by :func:`predict`.
OPTIONS = ("gene_key", "layer", "use_raw", "batch_size", "device", "precision", "chunk_size")
_FUNCTIONS = {"logits": logits, "genes": mean_encoding, "classifier": classifier_hidden}


def require_classifier(m: ScBERT) -> None:
    """Refuse a model without a classifier (pretrained only), saying how to get one."""
    if m.classes is None or m.network.classifier is None:
        raise ValueError(
            "This model has no classifier (it is pretrained only); fine-tune it first: "
            "model = scbert.tl.finetune(reference, 'cell_type', model=model)."
        )


def output_fn(m: ScBERT, representation: str) -> Callable[[ScBERTNetwork, torch.Tensor], torch.Tensor]:
    """The network function of an embedding ``representation``, checked against the model."""
    if representation not in ("genes", "classifier"):
        raise ValueError(f"representation must be 'genes' or 'classifier', got {representation!r}.")
    if representation == "classifier" and m.network.classifier is None:
        raise ValueError("representation='classifier' needs a fine-tuned model (this one has no classifier).")
    return _FUNCTIONS[representation]


def start(
    adata: AnnData, model: Any, *, copy: bool, batch_size: int | None, device: str | None, precision: str | None
) -> tuple[AnnData, ScBERT]:
    """The start of an inference tool: its checks before anything is written, the copy when asked, and the model."""
    check_compute(device, precision, batch_size)
    check_copy(adata, copy)
    if copy:
        adata = adata.copy()
    return adata, model_for_inference(model, adata)


def predict(adata: AnnData, m: ScBERT, output: Output, *, desc: str = "scBERT", **options: Any) -> np.ndarray:
    """The model's ``output`` for every cell of ``adata`` (cells x width, float32; in memory or streamed).

    ``"logits"``: the classifier's logits; ``"genes"`` and ``"classifier"``: the embeddings of
    :func:`~scbert_tl.tl.embed`. ``options`` are the tools' input and compute arguments
    (:data:`OPTIONS`; see :func:`~scbert_tl.tl._stream.model_outputs`).
    """
    if output == "logits":
        require_classifier(m)
        fn = logits
    else:
        fn = output_fn(m, output)
    return model_outputs(adata, m, fn, desc=desc, **options)


def options_of(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`OPTIONS` among a tool's ``arguments`` (its ``locals()``), to pass on to :func:`predict`."""
    return {k: arguments[k] for k in OPTIONS if k in arguments}


def probabilities_and_scores(m: ScBERT, logits: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class probabilities (calibrated with the model's temperature) and every novelty score, from logits."""
    temperature = m.calibration["temperature"] if m.calibration else 1.0
    return softmax(logits, temperature), novelty_scores(logits, temperature)


def call_cells(
    probs: np.ndarray, scores: dict[str, np.ndarray], rule: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's most likely class, its probability, and whether the unknown ``rule`` calls the cell unknown."""
    best = probs.argmax(1)
    confidence = probs[np.arange(probs.shape[0]), best]
    if rule["score"] == NOVELTY_SCORE:
        unknown = scores[NOVELTY_SCORE] > rule["threshold"]
    else:
        unknown = confidence < rule["threshold"]
    return best, confidence, unknown


@dataclass
class Annotation:
    """A classifier's view of some cells: class probabilities (calibrated) and novelty scores.

    ``probabilities`` is cells x ``classes``; ``scores`` maps each novelty score's name to its
    value per cell (higher: less like any class).
    """

    probabilities: np.ndarray
    scores: dict[str, np.ndarray]
    classes: list[str]

    @classmethod
    def predict(cls, adata: AnnData, m: ScBERT, **options: Any) -> Annotation:
        """The annotation of the cells of ``adata`` by the fine-tuned ``m`` (``options``: those of :func:`predict`)."""
        out = predict(adata, m, "logits", desc="annotate", **options)
        return cls(*probabilities_and_scores(m, out), list(m.classes))

    @property
    def labels(self) -> np.ndarray:
        """Each cell's most likely class (no ``"unknown"`` calls)."""
        return np.asarray(self.classes, dtype=str)[self.probabilities.argmax(1)]

    def write(self, adata: AnnData, key_added: str, rule: dict[str, Any], params: dict[str, Any]) -> int:
        """Write the slots of :func:`~scbert_tl.tl.annotate`, cells called unknown by ``rule``; return their number.

        ``params`` goes to ``uns[key_added]["params"]["annotate"]`` (the record's other keys are kept).
        """
        best, confidence, unknown = call_cells(self.probabilities, self.scores, rule)
        names = np.asarray(self.classes, dtype=object)[best]
        names[unknown] = UNKNOWN
        for key in (key_added, f"{key_added}_confidence", f"{key_added}_novelty"):
            if key in adata.obs:
                logger.info("annotate: replacing adata.obs[%r]", key)
        adata.obs[key_added] = pd.Categorical(names, categories=[*self.classes, UNKNOWN])
        adata.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
        adata.obs[f"{key_added}_novelty"] = self.scores[NOVELTY_SCORE].astype(np.float32)
        adata.obsm[f"{key_added}_probabilities"] = self.probabilities.astype(np.float32)
        record = dict(adata.uns.get(key_added, {}))
        record["classes"] = list(self.classes)
        record["params"] = {**dict(record.get("params", {})), "annotate": params}
        adata.uns[key_added] = record
        return int(unknown.sum())
