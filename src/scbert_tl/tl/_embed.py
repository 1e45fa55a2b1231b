"""``scbert.tl.embed``: a cell embedding for neighbours, UMAP and clustering."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._docs import doc_params
from ._docs import FRAGMENTS
from ._predict import options_of, predict, start

if TYPE_CHECKING:
    import os

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)


@doc_params(**FRAGMENTS)
def embed(
    adata: AnnData,
    model: str | os.PathLike | ScBERT,
    *,
    representation: Literal["genes", "classifier"] = "genes",
    key_added: str = "X_scbert",
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    chunk_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed each cell: the mean of its final-layer gene vectors, or the classifier's last hidden layer.

    The result can be used like a PCA: ``sc.pp.neighbors(adata, use_rep="X_scbert")``, then
    :func:`scanpy.tl.umap` or :func:`scanpy.tl.leiden`. The mean gene vector is the embedding of the
    scBERT paper and is available for any model. A fine-tuned model's classifier never trains that
    mean directly, so it often separates cell types less well than the classifier's own last hidden
    layer (``representation="classifier"``), which is shaped by the training labels.

    Parameters
    ----------
    {doc_cells}
    representation
        ``"genes"``: mean of the final-layer vectors of the panel genes (width of the model);
        ``"classifier"``: the classifier head's last hidden layer (fine-tuned models only).
    key_added
        Key in ``adata.obsm``.
    {doc_batch_size}
    {doc_inputs}
    {doc_device}
    {doc_precision}
    chunk_size
        Cells read at a time when ``adata`` is out of core (opened with ``backed="r"``, or a dask
        array as input; see :func:`~scbert_tl.tl.annotate`). Default 8192.
    {doc_copy}

    Returns
    -------
    ``None``, or the copy with ``copy=True``. Writes ``adata.obsm[key_added]`` (cells x model width,
    float32) and nothing else (the bins of :func:`scbert_tl.pp.bin` when they were missing).
    """
    arguments = dict(locals())
    adata, m = start(adata, model, copy=copy, batch_size=batch_size, device=device, precision=precision)
    emb = predict(adata, m, representation, desc="embed", **options_of(arguments))
    if key_added in adata.obsm:
        logger.info("embed: replacing adata.obsm[%r]", key_added)
    adata.obsm[key_added] = emb.astype(np.float32)
    return adata if copy else None
