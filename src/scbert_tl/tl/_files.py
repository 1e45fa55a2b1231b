"""Annotate or embed the cells of an ``.h5ad`` file into an output file, streamed (what ``scbert annotate`` and ``scbert embed`` run).

Memory holds one chunk of cells, the model and a few numbers per cell (labels, confidences), not
the file: probabilities and embeddings go straight into the output file a chunk at a time. The run
resumes after an interruption and splits across ``torchrun`` processes
(:mod:`scbert_tl.tl._job`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._scbert import ScBERT
from ..data import UNKNOWN, create_obsm, update_uns, write_obs_column
from ..train._calibration import NOVELTY_SCORE
from ..train._predict import logits, mean_encoding
from ._annotate import annotate_params, log_calls, unknown_rule
from ._job import FileJob, run_file_job
from ._predict import call_cells, output_fn, probabilities_and_scores, require_classifier

if TYPE_CHECKING:
    import os

    import h5py

logger = logging.getLogger(__name__)


def _load(model: str | os.PathLike | ScBERT) -> ScBERT:
    return model if isinstance(model, ScBERT) else ScBERT.load(model)


def annotate_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | ScBERT,
    *,
    embed_key: str | None = None,
    **options: Any,
) -> pd.Series | None:
    """Annotate the cells of the ``.h5ad`` file ``path`` into ``out`` (a copy of it with the slots of :func:`~scbert_tl.tl.annotate`).

    ``embed_key`` also writes the mean-gene embedding of :func:`~scbert_tl.tl.embed` to ``obsm``.
    ``options`` are ``unknown_threshold``, ``false_unknown_rate`` and ``key_added`` of
    :func:`~scbert_tl.tl.annotate` (same defaults) and the input and compute options of
    :class:`~scbert_tl.tl._job.FileJob`. Returns the count of cells per label in the process that wrote
    the output, else None.
    """
    unknown_threshold = options.pop("unknown_threshold", "auto")
    false_unknown_rate = options.pop("false_unknown_rate", None)
    key_added = options.pop("key_added", "scbert")
    m = _load(model)
    require_classifier(m)
    rule = unknown_rule(m, unknown_threshold, false_unknown_rate)
    fns = {"logits": logits}
    if embed_key is not None:
        fns["embedding"] = mean_encoding
    classes = list(m.classes)
    counts: dict[str, pd.Series] = {}

    def write(job: FileJob, f: h5py.File) -> None:
        n, k = job.n_cells, len(classes)
        codes = np.empty(n, dtype=np.int16)
        confidence = np.empty(n, dtype=np.float32)
        novelty = np.empty(n, dtype=np.float32)
        probs_out = create_obsm(f, f"{key_added}_probabilities", (n, k))
        emb_out = None
        for start, stop, outputs in job.results():
            probs, scores = probabilities_and_scores(m, outputs["logits"])
            best, conf, unknown = call_cells(probs, scores, rule)
            codes[start:stop] = np.where(unknown, k, best)
            confidence[start:stop] = conf
            novelty[start:stop] = scores[NOVELTY_SCORE]
            probs_out[start:stop] = probs.astype(np.float32)
            if embed_key is not None:
                emb = outputs["embedding"]
                if emb_out is None:
                    emb_out = create_obsm(f, embed_key, (n, emb.shape[1]))
                emb_out[start:stop] = emb
        labels = pd.Categorical.from_codes(codes, categories=[*classes, UNKNOWN])
        write_obs_column(f, key_added, labels)
        write_obs_column(f, f"{key_added}_confidence", confidence)
        write_obs_column(f, f"{key_added}_novelty", novelty)
        update_uns(
            f, key_added, {"classes": classes, "params": {"annotate": annotate_params(m, unknown_threshold, rule)}}
        )
        log_calls(n, int((codes == k).sum()), rule)
        counts["labels"] = pd.Series(labels, name=key_added).value_counts()

    def make() -> FileJob:
        return FileJob(path, out, m, fns, desc="annotate", **options)

    run_file_job(make, write, options.get("device"))
    return counts.get("labels")


def embed_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | ScBERT,
    *,
    representation: Literal["genes", "classifier"] = "genes",
    key_added: str = "X_scbert",
    **options: Any,
) -> int | None:
    """Embed the cells of the ``.h5ad`` file ``path`` into ``out`` (a copy of it with ``obsm[key_added]``, what :func:`~scbert_tl.tl.embed` writes).

    ``options`` are the input and compute options of :class:`~scbert_tl.tl._job.FileJob`. Returns the
    number of cells in the process that wrote the output, else None.
    """
    m = _load(model)
    fn = output_fn(m, representation)
    written: dict[str, int] = {}

    def write(job: FileJob, f: h5py.File) -> None:
        emb_out = None
        for start, stop, outputs in job.results():
            emb = outputs["embedding"]
            if emb_out is None:
                emb_out = create_obsm(f, key_added, (job.n_cells, emb.shape[1]))
            emb_out[start:stop] = emb
        written["n"] = job.n_cells

    def make() -> FileJob:
        return FileJob(path, out, m, {"embedding": fn}, desc="embed", **options)

    run_file_job(make, write, options.get("device"))
    return written.get("n")
