"""``scbert.tl.pretrain``: masked expression modelling on AnnData objects or ``.h5ad`` files, and its command line."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from .._options import PretrainOptions
from .._scbert import ScBERT
from .._version import __version__
from ..train._stream import SAMPLE, derive_rng
from ._data import as_items, item_name, source_for

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Sequence

    import torch
    from anndata import AnnData

    from .._options import Schedule

logger = logging.getLogger(__name__)

_MAX_HVG_CELLS = 50_000


# ---------------------------------------------------------------------------------------------- inputs
@contextlib.contextmanager
def _main_rank_only(ctx: Any) -> Iterator[None]:
    """On ranks other than 0, silence info logs and progress bars for the duration of the call."""
    from .._settings import settings

    if ctx.is_main:
        yield
        return
    old = settings.verbosity
    settings.verbosity = min(old, 1)
    try:
        yield
    finally:
        settings.verbosity = old


# ---------------------------------------------------------------------------------------------- model
def _compact_genes(items: list[AnnData | Path], *, n_genes: int, seed: int) -> list[str]:
    """At most ``n_genes`` scBERT panel genes present in the inputs, highly variable ones (pooled sample) first, in panel order."""
    import anndata as ad
    import scanpy as sc

    from .. import datasets
    from ..data import H5adFile, bins_record, gene_ids, matrix_key, recorded_params
    from ..pp._expression import expression
    from ..pp._genes import align_genes, nomenclature

    panel = datasets.panel_genes("scbert-panglao")
    table, _ = nomenclature("hgnc")
    per_item = max(1, _MAX_HVG_CELLS // len(items))
    parts = []
    present = np.zeros(len(panel), dtype=bool)
    for i, item in enumerate(items):
        rng = derive_rng(seed, SAMPLE, i)
        if isinstance(item, Path):
            file = H5adFile(item)
            params = recorded_params(file.uns)
            var = file.raw_var if params.get("use_raw") else file.var
            rows = np.arange(file.n_obs)
            if file.n_obs > per_item:
                rows = np.sort(rng.choice(file.n_obs, size=per_item, replace=False))
            if rows.size == 0:
                raise ValueError(f"{item} has no cells.")
            sample = ad.AnnData(X=file.rows(matrix_key(params), rows).astype(np.float64), var=var)
            params = {k: v for k, v in params.items() if k == "gene_key"}
        else:
            sample, params = item, recorded_params(bins_record(item))
        if sample.n_obs == 0:
            raise ValueError(f"{item_name(item, i, len(items))} has no cells.")
        ids = gene_ids(sample, params.get("gene_key"))
        alignment = align_genes(ids, panel, nomenclature=table)
        keep = np.flatnonzero(alignment.panel_index >= 0)
        if keep.size == 0:
            raise ValueError(f"None of the genes of {item_name(item, i, len(items))} is in the scBERT panel.")
        lin = expression(sample, max_cells=per_item, rng=rng, **params)[:, keep].tocoo()
        pos = alignment.panel_index[keep]
        present[pos] = True
        parts.append(sp.csr_matrix((lin.data, (lin.row, pos[lin.col])), shape=(lin.shape[0], len(panel))))
    cols = np.flatnonzero(present)
    if cols.size > n_genes:
        pooled = ad.AnnData(sp.vstack(parts, format="csr")[:, cols].astype(np.float32))
        sc.pp.normalize_total(pooled, target_sum=1e4)
        sc.pp.log1p(pooled)
        hvg = sc.pp.highly_variable_genes(pooled, flavor="seurat", n_top_genes=n_genes, inplace=False)
        cols = cols[np.flatnonzero(hvg["highly_variable"].to_numpy())]
    logger.info("Compact model over %d panel genes (of %d present), highly variable first", cols.size, present.sum())
    return [panel[i] for i in np.sort(cols)]


def _resolve(
    model: ScBERT | str | os.PathLike | None, items: list[AnnData | Path], *, n_genes: int, seed: int
) -> ScBERT:
    from ._resolve import existing_model, new_compact

    if model is None or (isinstance(model, str) and model == "compact"):
        return new_compact(_compact_genes(items, n_genes=n_genes, seed=seed), seed)
    return existing_model(model, new="None or 'compact'")


def _from_checkpoint(state: dict[str, Any]) -> ScBERT:
    from ..model import ScBERTConfig, ScBERTNetwork

    meta = state.get("meta") or {}
    if "genes" not in meta:
        raise ValueError("The checkpoint has no gene panel; it was not written by scbert.tl.pretrain.")
    network = ScBERTNetwork(ScBERTConfig.from_dict(dict(state["config"])))
    network.load_state_dict(state["model"])
    return ScBERT.from_record(network, {**meta, "history": state.get("history")})


def _broadcast_genes(model: ScBERT, ctx: Any) -> None:
    """Make every rank use rank 0's panel (a compact panel is computed on each rank from the same data)."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    obj = [model.genes]
    dist.broadcast_object_list(obj, src=0)
    if obj[0] != model.genes:
        raise RuntimeError("Ranks disagree on the gene panel; every process must see the same data.")


# ---------------------------------------------------------------------------------------------- the tool
def pretrain(
    adata: AnnData | str | os.PathLike | Sequence[AnnData | str | os.PathLike],
    *,
    model: ScBERT | str | os.PathLike | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int | None = None,
    accumulate: int = 1,
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup: float | int = 0.05,
    schedule: Schedule = "cosine",
    max_grad_norm: float | None = 1.0,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    redraw_every: int | None = 1000,
    validation_size: float | int | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = 1000,
    resume: bool = False,
    stop_after: int | None = None,
    chunk_size: int = 2048,
    shuffle_buffer: int = 4,
    gradient_checkpointing: bool = False,
    n_genes: int = 2000,
    device: str | torch.device | None = None,
    precision: str | None = None,
    random_state: int = 0,
) -> ScBERT:
    """Pretrain scBERT by masked expression modelling on your cells.

    Non-zero expression tokens are chosen with probability ``mask_prob``; a chosen token becomes
    ``[MASK]`` with probability ``replace_prob`` (else stays); the model learns to predict the
    chosen tokens' bins (cross-entropy). Held-out cells are evaluated as training goes: masked-token
    accuracy and loss next to a trivial baseline that predicts each cell's most common visible
    non-zero bin, on the same masked positions.

    Data is streamed: cells are read ``chunk_size`` rows at a time, in a random order of chunks, and
    shuffled within ``shuffle_buffer`` chunks, so memory stays bounded whatever the corpus size.
    Pass ``.h5ad`` paths for corpora that do not fit in memory (:func:`anndata.read_h5ad` with
    ``backed="r"`` loads layers into memory; a backed object is streamed from its file instead).

    Launched with ``torchrun`` (e.g. ``torchrun --nproc_per_node 4 -m scbert_tl pretrain ...``) every
    process reads its own shard and gradients are averaged with DistributedDataParallel; only rank 0
    logs, shows progress and writes the checkpoint. The returned model is the same on every rank.

    Parameters
    ----------
    adata
        An :class:`~anndata.AnnData` (in memory or backed), an ``.h5ad`` path, or a list of them (one
        corpus). In-memory objects without bins for the model's panel are binned in place by
        :func:`scbert_tl.pp.bin` (logged); files without them are binned chunk by chunk as they are read
        (logged; run :func:`~scbert_tl.pp.bin` and write the file once to save that work every epoch).
    model
        ``None`` or ``"compact"``: a new CPU-sized model (1 layer of width 32, 2 heads of 16, 9 bins) over at
        most ``n_genes`` scBERT panel genes present in the data, highly variable ones first (ranked by
        :func:`scanpy.pp.highly_variable_genes` on a pooled sample of at most 50,000 cells); a registry
        name (``"scbert-panglao"``, the published weights); an :class:`~scbert_tl.ScBERT` (copied, not
        changed); or the path of a saved model. A model without a pretraining head gets a new one.
    epochs
        Passes over the training cells (ignored when ``max_steps`` is given).
    max_steps
        Optimiser steps of the run.
    batch_size
        Cells per micro-batch and process; default ``settings.batch_size`` (``"auto"`` sizes it to the device).
    accumulate
        Micro-batches per optimiser step (gradient accumulation).
    lr
        Peak learning rate of AdamW; default 1e-3 for a new model, 1e-4 when continuing one.
    weight_decay
        AdamW weight decay of the weight matrices (norms, biases and embeddings are not decayed).
    warmup
        Linear warm-up: steps, or a fraction (< 1) of the run.
    schedule
        ``"cosine"`` or ``"linear"`` decay to 0 after warm-up, or ``"constant"``.
    max_grad_norm
        Gradient-norm clipping (``None``: none).
    mask_prob, replace_prob
        Masking: chance a non-zero token is chosen, and chance a chosen token becomes ``[MASK]``.
    redraw_every
        Redraw the FAVOR+ random projections every this many steps (seeded, recorded; as Performer
        training does); ``None`` or 0 keeps them fixed. The last draw is saved with the model and used
        from then on.
    validation_size
        Held-out cells, never trained on: a fraction, a number, or ``None`` (5%, at most 2,000); 0 disables evaluation.
    eval_every
        Steps between evaluations (default: once per epoch; always at the end).
    checkpoint_dir
        Where the run keeps ``checkpoint.pt`` (model, optimiser, schedule, position in the data;
        written atomically). ``None``: no checkpoints.
    checkpoint_every
        Steps between checkpoints (also written at the end and when stopped by ``stop_after``).
    resume
        Continue the run in ``checkpoint_dir`` from its checkpoint, to the same result as an
        uninterrupted run (a new run when there is none yet). The model then comes from the checkpoint.
    stop_after
        Stop once this many steps are done (the schedule is unchanged); continue later with ``resume=True``.
    chunk_size
        Cells read at a time.
    shuffle_buffer
        Chunks shuffled together.
    gradient_checkpointing
        Trade compute for memory (recompute activations in the backward pass).
    n_genes
        Genes of a new compact model.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``...; default ``settings.device``.
    precision
        Autocast precision; default ``settings.precision`` (``"auto"``: bfloat16 on CUDA, float32 on CPU).
    random_state
        Seed of the new model, the held-out set, the data order, the masks and the projection redraws.

    Returns
    -------
    The pretrained :class:`~scbert_tl.ScBERT`. Its ``history`` gains one record per evaluation
    (``stage="pretrain"``, ``step``, ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``,
    ``baseline_accuracy``, ``baseline_loss``, ``lr``, ``cells_seen``) and its
    ``provenance["pretraining"]`` a record of this run (arguments, corpus, final metrics).
    In-memory inputs binned here gain the slots :func:`scbert_tl.pp.bin` writes.

    Examples
    --------
    >>> import scbert_tl as scbert
    >>> model = scbert.tl.pretrain(["a.h5ad", "b.h5ad"], epochs=5, checkpoint_dir="run1")  # doctest: +SKIP
    >>> model.save("pretrained")  # doctest: +SKIP
    """
    from ..train._distributed import distributed_context
    from ..train._pretrain import pretrain_network

    options = PretrainOptions.of(locals())
    items = as_items(adata)
    with distributed_context(device) as ctx, _main_rank_only(ctx):
        scb, lr = _start(model, items, options, n_genes=n_genes, ctx=ctx)
        options = replace(options, lr=lr)
        names = [item_name(it, i, len(items)) for i, it in enumerate(items)]
        sources = [source_for(it, scb, nm, main=ctx.is_main) for it, nm in zip(items, names, strict=True)]
        # every model field but the history (the checkpoint keeps that itself), so a resumed run is the same model
        meta = {k: v for k, v in scb.record().items() if k != "history"}
        result = pretrain_network(
            scb.network, sources, options, device=device, precision=precision, checkpoint_meta=meta, history=scb.history
        )
    scb.history = result.history
    scb.provenance = dict(result.meta.get("provenance") or scb.provenance)
    scb.provenance["pretraining"] = [*list(scb.provenance.get("pretraining", [])), _record(result, names)]
    return scb


def _start(
    model: ScBERT | str | os.PathLike | None,
    items: list[Any],
    options: PretrainOptions,
    *,
    n_genes: int,
    ctx: Any,
) -> tuple[ScBERT, float]:
    """The model to pretrain (from the checkpoint when resuming, else ``model``) and the learning rate (the options' when given)."""
    from ..train._checkpoint import CHECKPOINT_NAME, load_checkpoint

    checkpoint_dir, lr = options.checkpoint_dir, options.lr
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if options.resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        scb = _from_checkpoint(state)
        if ctx.is_main:
            logger.info("Resuming from %s (the model comes from the checkpoint).", ckpt)
        return scb, float(state["params"]["lr"]) if lr is None else lr
    if ckpt is not None and ckpt.exists():
        raise FileExistsError(
            f"{ckpt} exists from an earlier run; pass resume=True to continue it, or another checkpoint_dir."
        )
    new_model = model is None or (isinstance(model, str) and model == "compact")
    scb = _resolve(model, items, n_genes=n_genes, seed=options.random_state)
    _broadcast_genes(scb, ctx)
    if lr is None:
        lr = 1e-3 if new_model else 1e-4
    return scb, lr


def _record(result: Any, names: list[str]) -> dict[str, Any]:
    """The provenance record of one pretraining run."""
    evals = [h for h in result.history if h.get("stage") == "pretrain" and "val_accuracy" in h]
    return {
        "scbert_tl_version": __version__,
        "finished": result.finished,
        "steps": result.step,
        "total_steps": result.total_steps,
        "params": result.params,
        "inputs": names,
        "redraw_policy": (
            f"FAVOR+ projections redrawn every {result.params['redraw_every']} steps from seeded generators"
            if result.params["redraw_every"]
            else "FAVOR+ projections fixed"
        ),
        "final": {k: evals[-1][k] for k in ("step", "val_loss", "val_accuracy", "baseline_accuracy", "baseline_loss")}
        if evals
        else None,
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
    }
