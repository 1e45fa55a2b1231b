"""A model run over cells read a chunk at a time: AnnData opened backed, dask-backed matrices, ``.h5ad`` files.

Binning depends on each cell alone, so the expression is read in row ranges, binned with one
:class:`~scbert_tl.pp._binning.Binning` prepared for the whole input, turned into the model's tokens and
run through the network; only a chunk of cells is in memory at a time. Batches never span two
chunks and chunks are whole batches, so every batch (and so every result, bit for bit) is the one
an in-memory run over the same cells would have computed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .._settings import settings
from ..data import (
    CHUNK_SIZE,
    TokenMatrix,
    check_fits,
    chunk_bounds,
    gene_ids,
    in_memory,
    input_params,
    is_dask,
    matrix,
    rows,
)
from ..pp._binning import prepare_binning
from ..train import auto_batch_size, run_batches
from ..train._inference import check_compute
from ..train._runtime import cpu_runtime, release_free_memory
from ._data import _report_coverage, tokens_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    import pandas as pd
    import torch
    from anndata import AnnData

    from .._scbert import ScBERT
    from ..model import ScBERTNetwork

    OutputFn = Callable[[ScBERTNetwork, torch.Tensor], torch.Tensor]

logger = logging.getLogger(__name__)


def out_of_core(adata: AnnData, **given: Any) -> bool:
    """Whether the tools should stream ``adata``: opened backed, or its input matrix is a dask array."""
    if adata.isbacked:
        return True
    params = input_params(adata, **given)
    try:
        X, _ = matrix(adata, params.get("layer"), bool(params.get("use_raw")))
    except (KeyError, ValueError):
        return False  # the in-memory path raises the clear error
    return is_dask(X)


def check_copy(adata: AnnData, copy: bool) -> None:
    """Refuse ``copy=True`` for a backed AnnData (a copy would load every cell into memory)."""
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load the whole backed AnnData into memory. Call the tool without copy= (it writes "
            "the results into adata's obs and obsm in memory and never into the file), or load the data first "
            "(adata.to_memory())."
        )


class ModelTokens:
    """Turns chunks of an input's cells into a model's tokens, with one binning prepared for the whole input.

    Parameters
    ----------
    X
        The expression matrix (in memory, backed, dask, or rows of a file); only its first cells are
        read here, to tell raw counts from normalised values.
    where
        Its name in messages.
    ids
        Its genes (symbols or Ensembl IDs), aligned to the model's panel.
    model
        The model.
    """

    def __init__(self, X: Any, where: str, ids: pd.Index, model: ScBERT) -> None:
        self.binning = prepare_binning(X, where, ids, panel=model, n_bins=model.n_bins, normalize=model.normalization)
        self.n_genes = len(model.genes)
        self.unmeasured_token = model.config.mask_token if model.unmeasured == "mask" else None
        self.panel_index = self.binning.alignment.panel_index
        empty = sp.csr_matrix((0, self.panel_index.size), dtype=np.int8)
        _report_coverage(TokenMatrix(empty, self.panel_index, self.n_genes), model.unmeasured)

    def __call__(self, raw: Any, start: int) -> TokenMatrix:
        """Tokens of the cells ``raw`` (rows of the input numbered from ``start``)."""
        chunk = self.binning(in_memory(raw), start)
        return TokenMatrix(chunk.bins, self.panel_index, self.n_genes, unmeasured_token=self.unmeasured_token)


#: The input and compute options of the tools that a model run takes (each None by default).
RUN_OPTIONS = ("gene_key", "layer", "use_raw", "batch_size", "chunk_size", "device", "precision")


def run_options(given: dict[str, Any]) -> dict[str, Any]:
    """Every one of :data:`RUN_OPTIONS`, as ``given`` or None; an unknown option is an error."""
    unknown = sorted(set(given) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}; the input and compute options are {list(RUN_OPTIONS)}.")
    return {k: given.get(k) for k in RUN_OPTIONS}


def _whole_batches(cells: int, batch_size: int) -> int:
    """``cells`` rounded up to whole batches."""
    return -(-cells // batch_size) * batch_size


def chunk_size_for(
    network: ScBERTNetwork, chunk_size: int | None, batch_size: int | None, device: Any
) -> tuple[int, int]:
    """The batch size and the chunk size (whole batches, at least ``chunk_size`` cells) of a streamed run."""
    dev, dtype = check_compute(device, None, batch_size)
    batch_size = batch_size or auto_batch_size(network.config, dev, dtype=dtype)
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of cells, got {chunk_size!r}.")
    return int(batch_size), int(_whole_batches(chunk_size, batch_size))


def run_chunks(
    network: ScBERTNetwork,
    read: Callable[[int, int], TokenMatrix],
    fns: dict[str, OutputFn],
    bounds: Iterable[tuple[int, int, int]],
    *,
    batch_size: int,
    device: str | torch.device | None = None,
    precision: str | None = None,
    bar: tqdm | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run ``fns`` over chunks ``(index, start, stop)`` of cells read by ``read``; yield each chunk's outputs as it completes."""
    names = list(fns)
    funcs = [fns[k] for k in names]

    def combined(net: ScBERTNetwork, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(f(net, x) for f in funcs)

    dev, _ = check_compute(device, precision, batch_size)
    with cpu_runtime(dev, desc="stream"):
        for i, start, stop in bounds:
            outs = run_batches(
                network, read(start, stop), combined, batch_size=batch_size, device=device, precision=precision,
                progress=False,
            )  # fmt: skip
            release_free_memory()  # memory stays that of one chunk, however many chunks
            if bar is not None:
                bar.update(stop - start)
            yield i, dict(zip(names, outs, strict=True))


def model_outputs(adata: AnnData, model: ScBERT, fn: OutputFn, *, desc: str = "scBERT", **options: Any) -> np.ndarray:
    """``fn(network, tokens)`` for every cell of ``adata`` as float32 numpy: in memory, or streamed when ``adata`` is out of core.

    ``options`` are the input and compute options of the tools (:data:`RUN_OPTIONS`). In memory,
    ``adata`` is binned for the model when needed (:func:`~scbert_tl.tl._data.tokens_for`).
    An AnnData opened backed, or whose input matrix is a dask array, is read a chunk of ``chunk_size``
    cells at a time and binned on the fly (nothing is written into it); a dask array is processed block
    by block through dask, so a dask cluster spreads the work. The results are the same either way.
    """
    o = run_options(options)
    gene_key, layer, use_raw = o["gene_key"], o["layer"], o["use_raw"]
    batch_size, device, precision = o["batch_size"], o["device"], o["precision"]
    m = model
    if not out_of_core(adata, gene_key=gene_key, layer=layer, use_raw=use_raw):
        tokens = tokens_for(adata, m, gene_key=gene_key, layer=layer, use_raw=use_raw)
        (out,) = run_batches(
            m.network, tokens, fn, batch_size=batch_size, device=device, precision=precision, desc=desc
        )
        return out
    params = input_params(adata, gene_key=gene_key, layer=layer, use_raw=use_raw)
    X, where = matrix(adata, params.get("layer"), bool(params.get("use_raw")))
    tokens = ModelTokens(X, where, gene_ids(adata, params.get("gene_key")), m)
    batch_size, chunk_size = chunk_size_for(m.network, o["chunk_size"], batch_size, device)
    if is_dask(X):
        return _through_dask(
            X, tokens, m.network, fn, batch_size=batch_size, device=device, precision=precision, desc=desc
        )
    n = X.shape[0]
    logger.info("%s: streaming %d cells from %s in chunks of %d", desc, n, where, chunk_size)
    bar = tqdm(total=n, desc=desc, unit="cells", disable=not settings.progress)
    parts = []
    try:
        for _, out in run_chunks(
            m.network,
            lambda a, b: tokens(rows(X, a, b), a),
            {"out": fn},
            chunk_bounds(n, chunk_size),
            batch_size=batch_size,
            device=device,
            precision=precision,
            bar=bar,
        ):
            if not parts:
                check_fits(n, out["out"].shape[1], desc)
            parts.append(out["out"])
    finally:
        bar.close()
    return np.concatenate(parts)


def _through_dask(
    X: Any,
    tokens: ModelTokens,
    network: ScBERTNetwork,
    fn: OutputFn,
    *,
    batch_size: int,
    device: str | None,
    precision: str | None,
    desc: str,
) -> np.ndarray:
    """Run the model over a dask array block by block (``map_blocks``), with the scheduler or cluster in use."""
    import dask
    import dask.array as da

    X = X.rechunk({1: -1})  # whole cells per block
    if any(n % batch_size for n in X.chunks[0][:-1]):
        # blocks of whole batches, as the chunks of the other streamed paths: every batch is then the one an
        # in-memory run computes (a batch of another size may take other CPU kernels and change the last bit)
        X = X.rechunk({0: _whole_batches(X.chunks[0][0], batch_size)})
    (first,) = run_batches(
        network, tokens(X[:1], 0), fn, batch_size=1, device=device, precision=precision, progress=False
    )
    width = first.shape[1]
    check_fits(X.shape[0], width, desc)

    def block(raw: Any, block_info: dict | None = None) -> np.ndarray:
        start = block_info[0]["array-location"][0][0] if block_info else 0
        (out,) = run_batches(
            network, tokens(raw, start), fn, batch_size=batch_size, device=device, precision=precision, progress=False
        )
        return out

    result = da.map_blocks(
        block, X, dtype=np.float32, chunks=(X.chunks[0], (width,)), meta=np.empty((0, 0), dtype=np.float32)
    )
    scheduler = dask.base.get_scheduler(collections=[result])
    # torch already uses every core within a block: local threads would only compete for them
    kwargs = {"scheduler": "synchronous"} if scheduler is dask.threaded.get else {}
    logger.info("Running the model over %d dask blocks of %s", len(X.chunks[0]), tokens.binning.where)
    dev, _ = check_compute(device, precision, batch_size)
    with cpu_runtime(dev, desc="dask"):
        return np.asarray(result.compute(**kwargs), dtype=np.float32)
