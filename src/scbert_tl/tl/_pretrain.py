"""``scbert.tl.pretrain``: masked expression modelling on AnnData objects or ``.h5ad`` files, and its command line."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._scbert import PRETRAINED, ScBERT
from ..train._stream import SAMPLE, TokenSource, check_col_map, derive_rng, to_panel_csr

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch
    from anndata import AnnData

    from ..train._pretrain import Schedule

logger = logging.getLogger(__name__)

_MAX_HVG_CELLS = 50_000


# ---------------------------------------------------------------------------------------------- inputs
def _as_items(data: Any) -> list[AnnData | Path]:
    from anndata import AnnData

    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError("No data to pretrain on: the list of inputs is empty.")
    out: list[AnnData | Path] = []
    for item in items:
        if isinstance(item, AnnData):
            out.append(item)
        elif isinstance(item, str | os.PathLike):
            path = Path(item).expanduser()
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder; expected an .h5ad file.")
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (expected an .h5ad file).")
            out.append(path)
        else:
            raise TypeError(f"Expected AnnData objects or .h5ad paths, got {type(item).__name__}.")
    return out


def _item_name(item: AnnData | Path, i: int, n: int) -> str:
    if isinstance(item, Path):
        return item.name
    if item.isbacked:
        return Path(item.filename).name
    return "adata" if n == 1 else f"adata[{i}]"


def _bin_params(uns: Any) -> dict[str, Any]:
    params = uns.get("params", {}).get("bin", {}) if isinstance(uns, dict) else {}
    return {k: params[k] for k in ("gene_key", "layer", "use_raw") if params.get(k) is not None}


class H5adFile:
    """What the pretraining needs of an ``.h5ad`` file, read with h5py: its cell count, ``var``, the ``scbert`` record, and rows of its matrices."""

    def __init__(self, path: Path) -> None:
        import h5py
        from anndata.io import read_elem

        self.path = path
        try:
            with h5py.File(path, "r") as f:
                if "obs" not in f or "var" not in f:
                    raise ValueError(f"{path} is not an AnnData .h5ad file (no obs/var groups).")
                obs = f["obs"]
                self.n_obs = int(obs[obs.attrs["_index"]].shape[0])
                self.var = read_elem(f["var"])
                self.raw_var = read_elem(f["raw/var"]) if "raw/var" in f else None
                self.uns = read_elem(f["uns/scbert"]) if "uns/scbert" in f else None
                self.layers = list(f["layers"].keys()) if "layers" in f else []
        except OSError as e:
            raise ValueError(f"{path} could not be read as an .h5ad file ({e}).") from e

    def obs_names(self) -> pd.Index:
        """The cell names."""
        import h5py
        from anndata.io import read_elem

        with h5py.File(self.path, "r") as f:
            return pd.Index(read_elem(f["obs"][f["obs"].attrs["_index"]])).astype(str)

    def rows(self, key: str, start: int | np.ndarray, stop: int | None = None) -> sp.csr_matrix:
        """Rows of the matrix at ``key`` ("X", "raw/X" or "layers/NAME"): a range, or sorted indices."""
        import h5py
        from anndata.io import sparse_dataset

        with h5py.File(self.path, "r") as f:
            if key not in f:
                raise KeyError(f"{self.path} has no {key!r}.")
            node = f[key]
            ds = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
            block = ds[start:stop] if stop is not None else ds[np.asarray(start)]
        return sp.csr_matrix(block)


def _matrix_key(params: dict[str, Any]) -> str:
    if params.get("use_raw"):
        return "raw/X"
    if params.get("layer"):
        return f"layers/{params['layer']}"
    return "X"


class _FileMatrix:
    """Rows of a matrix in an ``.h5ad`` file, by index or by a range (:func:`scbert_tl.pp._bin.bins_stale`, streamed tools)."""

    def __init__(self, file: H5adFile, params: dict[str, Any]) -> None:
        self.file, self.key = file, _matrix_key(params)
        var = file.raw_var if params.get("use_raw") else file.var
        self.shape = (file.n_obs, 0 if var is None else len(var))

    def __getitem__(self, rows: np.ndarray | slice) -> sp.csr_matrix:
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            return self.file.rows(self.key, start, max(start, stop))
        return self.file.rows(self.key, np.asarray(rows))


class BinningH5adSource(TokenSource):
    """An ``.h5ad`` file without bins for the model: chunks of its expression are binned on the fly by :func:`scbert_tl.pp.bin`.

    The expression is read where the file's last :func:`~scbert_tl.pp.bin` read it (``X`` by
    default; ``raw/X`` or a layer if recorded), a range of rows at a time.
    """

    def __init__(self, file: H5adFile, model: ScBERT, params: dict[str, Any]) -> None:
        self.file = file
        self.name = file.path.name
        self.model = model
        self.key = _matrix_key(params)
        var = file.raw_var if params.get("use_raw") else file.var
        if var is None:
            raise ValueError(f"{file.path}: the bins were made from adata.raw but the file has no raw.")
        gene_key = params.get("gene_key")
        cols = [gene_key] if gene_key is not None and gene_key in var else []
        self.var = pd.DataFrame(var[cols], index=var.index.astype(str))
        self.gene_key = gene_key if cols else None
        self.n_cells = file.n_obs
        self.n_genes = len(model.genes)
        first = self._bin(0, min(self.n_cells, 500), quiet=False)
        self.col_map = check_col_map(first.var["scbert_panel_index"].to_numpy(), len(self.var), self.n_genes, self.name)

    def _bin(self, start: int, stop: int, *, quiet: bool = True) -> AnnData:
        from anndata import AnnData

        from ..pp import bin as pp_bin

        block = self.file.rows(self.key, start, stop)
        chunk = AnnData(X=block.astype(np.float64), var=self.var.copy())
        with _quiet("scbert_tl.pp") if quiet else contextlib.nullcontext():
            try:
                pp_bin(
                    chunk,
                    panel=self.model,
                    n_bins=self.model.n_bins,
                    normalize=self.model.normalization,
                    gene_key=self.gene_key,
                )
            except (ValueError, KeyError) as e:
                raise ValueError(f"{self.name} (cells {start}..{stop - 1}): {e}") from e
        return chunk

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop``, binned."""
        return to_panel_csr(self._bin(start, stop).layers["scbert_bins"], self.col_map, self.n_genes)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger's info messages (pp.bin on every chunk would repeat the same lines)."""
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


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


def _source_for(item: AnnData | Path, model: ScBERT, name: str, *, main: bool) -> TokenSource:
    from ..pp import bin as pp_bin
    from ..pp._bin import LAYER, PANEL_INDEX, bins_stale, recorded_input
    from ..train import H5adSource, MemorySource

    n_genes = len(model.genes)
    if not isinstance(item, Path) and not item.isbacked:
        if item.n_obs == 0:
            raise ValueError(f"{name} has no cells.")
        info = item.uns.get("scbert")
        reason = (
            bins_stale(info, model, recorded_input(item), item.var_names, item.obs_names)
            if LAYER in item.layers and PANEL_INDEX in item.var
            else "are missing"
        )
        if reason is not None:
            if main:
                logger.info(
                    "%s: binning for this model's panel (%d genes) with scbert.pp.bin: the bins %s",
                    name,
                    n_genes,
                    reason,
                )
            pp_bin(item, panel=model, n_bins=model.n_bins, normalize=model.normalization, **_bin_params(info))
        return MemorySource(item.layers[LAYER], item.var[PANEL_INDEX].to_numpy(), n_genes, name=name)

    if not isinstance(item, Path) and item.is_view:
        raise ValueError(
            f"{name} is a view of a backed AnnData; pass the whole file, or an in-memory copy (view.to_memory())."
        )
    path = Path(item.filename) if not isinstance(item, Path) else item
    file = H5adFile(path)
    if file.n_obs == 0:
        raise ValueError(f"{path} has no cells.")
    reason = "are missing"
    if LAYER in file.layers and PANEL_INDEX in file.var:
        matrix = _FileMatrix(file, _bin_params(file.uns))
        reason = bins_stale(file.uns, model, matrix, file.var.index, file.obs_names())
    if reason is None:
        return H5adSource(path, file.var[PANEL_INDEX].to_numpy(), n_genes, layer=LAYER)
    if main:
        logger.info(
            "%s: its bins %s; binning each chunk on the fly with scbert.pp.bin (bin the file once and write "
            "it again to skip this work every epoch)",
            path.name,
            reason,
        )
    return BinningH5adSource(file, model, _bin_params(file.uns))


# ---------------------------------------------------------------------------------------------- model
def _compact_genes(items: list[AnnData | Path], *, n_genes: int, seed: int) -> list[str]:
    """At most ``n_genes`` scBERT panel genes present in the inputs, highly variable ones (pooled sample) first, in panel order."""
    import anndata as ad
    import scanpy as sc

    from .. import datasets
    from ..pp._bin import _gene_ids, _nomenclature, expression
    from ..pp._genes import align_genes

    panel = datasets.panel_genes("scbert-panglao")
    table, _ = _nomenclature("hgnc")
    per_item = max(1, _MAX_HVG_CELLS // len(items))
    parts = []
    present = np.zeros(len(panel), dtype=bool)
    for i, item in enumerate(items):
        rng = derive_rng(seed, SAMPLE, i)
        if isinstance(item, Path):
            file = H5adFile(item)
            params = _bin_params(file.uns)
            var = file.raw_var if params.get("use_raw") else file.var
            rows = np.arange(file.n_obs)
            if file.n_obs > per_item:
                rows = np.sort(rng.choice(file.n_obs, size=per_item, replace=False))
            if rows.size == 0:
                raise ValueError(f"{item} has no cells.")
            sample = ad.AnnData(X=file.rows(_matrix_key(params), rows).astype(np.float64), var=var)
            params = {k: v for k, v in params.items() if k == "gene_key"}
        else:
            sample, params = item, _bin_params(item.uns.get("scbert"))
        if sample.n_obs == 0:
            raise ValueError(f"{_item_name(item, i, len(items))} has no cells.")
        ids = _gene_ids(sample, params.get("gene_key"))
        alignment = align_genes(ids, panel, nomenclature=table)
        keep = np.flatnonzero(alignment.panel_index >= 0)
        if keep.size == 0:
            raise ValueError(f"None of the genes of {_item_name(item, i, len(items))} is in the scBERT panel.")
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


def _new_compact(items: list[AnnData | Path], *, n_genes: int, seed: int) -> ScBERT:
    from ._resolve import COMPACT

    genes = _compact_genes(items, n_genes=n_genes, seed=seed)
    model = ScBERT.new(genes, seed=seed, lm_head=True, gene_emb_trainable=True, **COMPACT)
    model.provenance["source"] = "compact"
    return model


def _resolve(
    model: ScBERT | str | os.PathLike | None, items: list[AnnData | Path], *, n_genes: int, seed: int
) -> ScBERT:
    if model is None or (isinstance(model, str) and model == "compact"):
        return _new_compact(items, n_genes=n_genes, seed=seed)
    if isinstance(model, ScBERT):
        return copy.deepcopy(model)
    if isinstance(model, str) and model in PRETRAINED and not Path(model).exists():
        return ScBERT.from_pretrained(model)
    if isinstance(model, str | os.PathLike) and Path(model).expanduser().exists():
        return ScBERT.load(model)
    raise ValueError(
        f"model={model!r} is not a model: pass None or 'compact' (a new CPU-sized model), a registry name "
        f"({', '.join(sorted(PRETRAINED))}), an ScBERT, or the path of a saved model."
    )


def _from_checkpoint(state: dict[str, Any]) -> ScBERT:
    from ..model import ScBERTConfig, ScBERTNetwork

    meta = state.get("meta") or {}
    if "genes" not in meta:
        raise ValueError("The checkpoint has no gene panel; it was not written by scbert.tl.pretrain.")
    network = ScBERTNetwork(ScBERTConfig.from_dict(dict(state["config"])))
    network.load_state_dict(state["model"])
    return ScBERT(
        network,
        meta["genes"],
        classes=meta.get("classes"),
        panel=meta.get("panel"),
        normalization=meta.get("normalization", "library"),
        provenance=meta.get("provenance"),
        history=state.get("history"),
    )


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
        ``None`` or ``"compact"``: a new CPU-sized model (2 layers of width 64, 4 heads of 16) over at
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
        AdamW weight decay.
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
    from ..train._pretrain import CHECKPOINT_NAME, distributed_context, load_checkpoint, pretrain_network

    items = _as_items(adata)
    with distributed_context(device) as ctx, _main_rank_only(ctx):
        ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        if resume and ckpt is not None and ckpt.exists():
            state = load_checkpoint(ckpt)
            scb = _from_checkpoint(state)
            if ctx.is_main:
                logger.info("Resuming from %s (the model comes from the checkpoint).", ckpt)
            if lr is None:
                lr = float(state["params"]["lr"])
            del state
            new_model = False
        else:
            if ckpt is not None and ckpt.exists():
                raise FileExistsError(
                    f"{ckpt} exists from an earlier run; pass resume=True to continue it, or another checkpoint_dir."
                )
            new_model = model is None or (isinstance(model, str) and model == "compact")
            scb = _resolve(model, items, n_genes=n_genes, seed=random_state)
            _broadcast_genes(scb, ctx)
        if lr is None:
            lr = 1e-3 if new_model else 1e-4
        names = [_item_name(it, i, len(items)) for i, it in enumerate(items)]
        sources = [_source_for(it, scb, nm, main=ctx.is_main) for it, nm in zip(items, names, strict=True)]
        meta = {
            "genes": scb.genes,
            "panel": scb.panel,
            "classes": scb.classes,
            "normalization": scb.normalization,
            "provenance": scb.provenance,
        }
        result = pretrain_network(
            scb.network,
            sources,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            accumulate=accumulate,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            schedule=schedule,
            max_grad_norm=max_grad_norm,
            mask_prob=mask_prob,
            replace_prob=replace_prob,
            redraw_every=redraw_every,
            validation_size=validation_size,
            eval_every=eval_every,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            stop_after=stop_after,
            chunk_size=chunk_size,
            shuffle_buffer=shuffle_buffer,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            precision=precision,
            random_state=random_state,
            checkpoint_meta=meta,
            history=scb.history,
        )
    scb.history = result.history
    scb.provenance = dict(result.meta.get("provenance") or scb.provenance)
    evals = [h for h in result.history if h.get("stage") == "pretrain" and "val_accuracy" in h]
    record = {
        "scbert_tl_version": _version(),
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
    scb.provenance["pretraining"] = [*list(scb.provenance.get("pretraining", [])), record]
    return scb


def _version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- command line
class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless its help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``scbert pretrain`` on an :mod:`argparse` sub-command set; the handler is :func:`run_pretrain_command`.

    The parser's defaults carry ``func=run_pretrain_command``, which returns the exit status.
    """
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain scBERT by masked expression modelling on .h5ad files",
        description=(
            "Pretrain scBERT by masked expression modelling on one or more .h5ad files (streamed in chunks; "
            "files without bins for the model are binned on the fly). Under torchrun every process trains on "
            "its own shard: torchrun --nproc_per_node 4 -m scbert_tl pretrain data/*.h5ad -o model"
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="H5AD", help=".h5ad files (one corpus)")
    p.add_argument("-o", "--output", required=True, help="directory to save the pretrained model in")
    p.add_argument(
        "-m", "--model", default="compact", help="'compact', a registry name (scbert-panglao), or a saved model path"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --output")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=1, help="passes over the training cells")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="cells per micro-batch per process (default: auto)")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 new, 1e-4 continued)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up steps, or a fraction (< 1) of the run")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warm-up")
    g.add_argument("--redraw-every", type=int, default=1000, help="steps between FAVOR+ projection redraws (0: fixed)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--validation-size", type=float, default=None, help="held-out cells: fraction < 1 or a count")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: each epoch)")
    g.add_argument("--checkpoint-dir", default=None, help="folder of the run's checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    g = p.add_argument_group("data and compute")
    g.add_argument("--chunk-size", type=int, default=2048, help="cells read at a time")
    g.add_argument("--shuffle-buffer", type=int, default=4, help="chunks shuffled together")
    g.add_argument("--n-genes", type=int, default=2000, help="genes of a new compact model")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: settings)")
    g.add_argument("--precision", default=None, choices=["auto", "float32", "bfloat16", "float16"], help="autocast")
    g.add_argument("--seed", type=int, default=0, help="random state")
    p.set_defaults(func=run_pretrain_command)
    return p


def run_pretrain_command(args: argparse.Namespace) -> int:
    """Run ``scbert pretrain`` from parsed arguments; returns the exit status (errors are printed, not raised)."""
    from .._scbert import check_model_target

    output = Path(args.output).expanduser()
    try:
        check_model_target(output, overwrite=args.overwrite)  # before the work, not after it
        vs = args.validation_size
        if vs is not None and vs >= 1:
            if vs != int(vs):
                raise ValueError(f"--validation-size {vs}: a count of cells must be a whole number.")
            vs = int(vs)
        warmup = int(args.warmup) if args.warmup >= 1 else args.warmup
        model = pretrain(
            list(args.inputs),
            model=args.model,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            accumulate=args.accumulate,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=warmup,
            schedule=args.schedule,
            redraw_every=args.redraw_every or None,
            validation_size=vs,
            eval_every=args.eval_every,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            stop_after=args.stop_after,
            chunk_size=args.chunk_size,
            shuffle_buffer=args.shuffle_buffer,
            gradient_checkpointing=args.gradient_checkpointing,
            n_genes=args.n_genes,
            device=args.device,
            precision=args.precision,
            random_state=args.seed,
        )
        if int(os.environ.get("RANK", "0") or 0) == 0:
            model.save(output, overwrite=args.overwrite)
            final = model.provenance["pretraining"][-1]["final"]
            if final:
                print(
                    f"held-out masked accuracy {final['val_accuracy']:.4f} (baseline {final['baseline_accuracy']:.4f}), "
                    f"loss {final['val_loss']:.4f} (baseline {final['baseline_loss']:.4f})"
                )
            print(f"saved {model!r} to {output}")
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        print(f"scbert pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0
