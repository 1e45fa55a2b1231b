"""Masked expression modelling: masking, the training loop (DDP, accumulation, checkpoints, resume), evaluation.

No AnnData here: the loop reads :class:`~scbert_tl.train.TokenSource` objects through a
:class:`~scbert_tl.train.StreamPlan`; :func:`scbert_tl.tl.pretrain` builds both from AnnData or files.

Randomness. Every draw comes from a generator derived from ``random_state`` with
:class:`numpy.random.SeedSequence` spawn keys and never from a global RNG:

- masking at optimiser step ``s`` on rank ``r``: ``(MASK, r, s)``, drawn over the step's micro-batches in order;
- held-out masks: ``(EVAL, cell id)`` per held-out cell, the same at every evaluation and for any number of ranks;
- data order: ``(ORDER, epoch, rank)`` and ``(BLOCK, epoch, rank, block)``; held-out set ``(SPLIT,)``; shards ``(SHARD,)``;
- projection redraws: ``(REDRAW, step, layer)``; a new pretraining head: ``(HEAD,)``.

The state of every generator is therefore a function of the seed and the position (epoch, step),
which the checkpoint stores; resuming re-derives the generators there, on every rank, instead of
gathering each rank's generator state to rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._files import as_umask_allows
from .._settings import settings
from ..model import FavorAttention
from ._inference import auto_batch_size, autocast
from ._runtime import cpu_runtime
from ._stream import EVAL, HEAD, MASK, REDRAW, StreamPlan, derive_int, derive_rng

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..model import ScBERTNetwork
    from ._stream import TokenSource

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "scbert-tl-pretrain-checkpoint"
CHECKPOINT_VERSION = 1
Schedule = Literal["cosine", "linear", "constant"]

# arguments that define the trajectory: a resumed run must use the same ones
_TRAJECTORY_KEYS = (
    "random_state",
    "world_size",
    "batch_size",
    "accumulate",
    "epochs",
    "max_steps",
    "total_steps",
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
    "mask_prob",
    "replace_prob",
    "redraw_every",
    "chunk_size",
    "shuffle_buffer",
    "n_validation",
    "data",
)


# ---------------------------------------------------------------------------------------------- masking
def mask_tokens(
    tokens: sp.csr_matrix,
    rng: np.random.Generator,
    *,
    mask_token: int,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Choose positions for masked expression modelling, as in scBERT.

    Only non-zero tokens are candidates; each is chosen with probability ``mask_prob``; a chosen
    token becomes ``mask_token`` with probability ``replace_prob`` and otherwise stays as it is.

    Parameters
    ----------
    tokens
        ``(cells, genes)`` CSR int8 tokens (indices sorted).
    rng
        The generator of the draws (two uniforms per stored entry, in storage order).
    mask_token
        The ``[MASK]`` id (``config.mask_token``).
    mask_prob
        Chance that a non-zero token is chosen.
    replace_prob
        Chance that a chosen token is replaced by ``[MASK]``.

    Returns
    -------
    The input tokens (same sparsity pattern, masked values replaced) and a boolean flag per stored
    entry of ``tokens`` (``tokens.data``) that says whether it was chosen. The targets are
    ``tokens.data[chosen]``, in row-major order.
    """
    masked = tokens.copy()
    masked.data, chosen = _mask_values(tokens.data, rng, mask_token, mask_prob, replace_prob)
    return masked, chosen


def _mask_values(
    values: np.ndarray, rng: np.random.Generator, mask_token: int, mask_prob: float, replace_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < mask_prob <= 1 or not 0 <= replace_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1] and replace_prob in [0, 1]; got {mask_prob}, {replace_prob}.")
    u = rng.random(values.size)
    v = rng.random(values.size)
    chosen = (values != 0) & (u < mask_prob)
    return np.where(chosen & (v < replace_prob), np.int8(mask_token), values).astype(np.int8), chosen


def _dense(csr: sp.csr_matrix, data: np.ndarray | None = None) -> np.ndarray:
    """Dense rows of ``csr`` (optionally with other values on the same pattern)."""
    if data is not None:
        csr = sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    return csr.toarray()


def mode_baseline(inputs: torch.Tensor, n_bins: int, mask_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trivial predictor: each cell's most common visible non-zero bin.

    Parameters
    ----------
    inputs
        ``(cells, genes)`` model inputs (with ``[MASK]`` tokens, which are not counted).
    n_bins
        Expression bins (non-zero tokens are ``1..n_bins``).
    mask_token
        The ``[MASK]`` id.

    Returns
    -------
    Per cell the predicted bin (ties to the lower bin; bin 1 when nothing is visible) and the log
    probabilities ``(cells, n_bins + 1)`` of the add-one smoothed frequencies of its visible
    non-zero bins (bin 0 gets none; masked positions are never 0).
    """
    x = inputs.long()
    x = torch.where(x == mask_token, torch.zeros_like(x), x)
    counts = torch.zeros(x.shape[0], n_bins + 1, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, x, torch.ones_like(x, dtype=torch.float64))
    counts = counts[:, 1:]
    pred = counts.argmax(dim=1) + 1
    probs = (counts + 1) / (counts.sum(dim=1, keepdim=True) + n_bins)
    logp = torch.cat([torch.full_like(probs[:, :1], -math.inf), probs.log()], dim=1)
    return pred, logp


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """The place of this process in a ``torchrun`` launch (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows bars and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"Environment variable {name}={value!r} is not an integer (set by torchrun).") from e


@contextlib.contextmanager
def distributed_context(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), if any.

    Reads the environment when called (never at import). Initialises the default process group
    (NCCL when training on CUDA, Gloo on CPU) unless one exists, and destroys it on exit only when
    it was created here. Without those variables, or with ``WORLD_SIZE=1``, yields rank 0 of 1.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), False)
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistContext()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = settings.resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    if rank == 0:
        logger.info("Joined a %d-process %s group.", world, backend)
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, True)
    finally:
        dist.destroy_process_group()


def _all_reduce(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _MaskedLM(nn.Module):
    """The network's masked-expression forward as ``forward`` (what DDP wraps)."""

    def __init__(self, network: ScBERTNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.network.mlm_logits(tokens)


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, *, total: int, warmup: int, schedule: Schedule) -> float:
    """Learning-rate multiplier before optimiser step ``step`` (0-based): linear warm-up, then decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def redraw_projections(network: ScBERTNetwork, seed: int, step: int) -> None:
    """Draw new FAVOR+ projections in every attention block, seeded by ``(REDRAW, step, layer)``."""
    attns = [m for m in network.modules() if isinstance(m, FavorAttention)]
    for i, attn in enumerate(attns):
        gen = torch.Generator().manual_seed(derive_int(seed, REDRAW, step, i))
        attn.redraw_projection(generator=gen)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with :func:`torch.save` atomically: a temporary file in the same folder, then :func:`os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_umask_allows(tmp, folder=False)  # mkstemp's file is private (0o600)
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a pretraining checkpoint (``weights_only=True``: tensors and plain Python types only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise RuntimeError(f"{path} could not be read as a pretraining checkpoint ({e}).") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} is not an scbert-tl pretraining checkpoint.")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise RuntimeError(f"{path} was written by a newer scbert-tl; upgrade to resume it.")
    return state


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PretrainResult:
    """What :func:`pretrain_network` returns (the network is trained in place)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per evaluation (step, epoch, losses, accuracies, baseline, lr, cells seen)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The resolved arguments (JSON-serialisable), for provenance."""
    step: int = 0
    """Optimiser steps done."""
    total_steps: int = 0
    """Optimiser steps of the full run."""
    finished: bool = False
    """False when the run stopped early (``stop_after``) and can be resumed."""
    rank: int = 0
    world_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    """The ``checkpoint_meta`` (as read back from the checkpoint when resumed)."""


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class _Validation:
    ids: np.ndarray
    inputs: sp.csr_matrix
    targets: sp.csr_matrix
    chosen: np.ndarray  # per stored entry of targets


def _prepare_validation(
    plan: StreamPlan, seed: int, *, mask_token: int, mask_prob: float, replace_prob: float
) -> _Validation:
    ids, tokens = plan.validation_cells()
    inputs = tokens.copy()
    chosen = np.zeros(tokens.nnz, dtype=bool)
    for row, cid in enumerate(ids):
        a, b = tokens.indptr[row], tokens.indptr[row + 1]
        rng = derive_rng(seed, EVAL, int(cid))
        inputs.data[a:b], chosen[a:b] = _mask_values(tokens.data[a:b], rng, mask_token, mask_prob, replace_prob)
    return _Validation(ids, inputs, tokens, chosen)


@torch.inference_mode()
def _evaluate(
    network: ScBERTNetwork,
    val: _Validation,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    ctx: DistContext,
) -> dict[str, float]:
    c = network.config
    was_training = network.training
    network.eval()
    sums = np.zeros(6)  # loss, correct, baseline correct, baseline loss, positions, cells
    try:
        for start in range(0, val.ids.size, batch_size):
            rows = slice(start, start + batch_size)
            inputs, targets = val.inputs[rows], val.targets[rows]
            a, b = val.targets.indptr[start], val.targets.indptr[min(start + batch_size, val.ids.size)]
            flags = val.chosen[a:b]
            chosen = torch.from_numpy(_dense(targets, flags.astype(np.int8)).astype(bool)).to(device)
            y = torch.from_numpy(targets.data[flags].astype(np.int64)).to(device)
            x = torch.from_numpy(_dense(inputs)).to(device)
            with autocast(device, dtype):
                logits = network.mlm_logits(x)[:, :-1]
            picked = logits[chosen].float()
            base_pred, base_logp = mode_baseline(x, c.n_bins, c.mask_token)
            row_of = torch.nonzero(chosen)[:, 0]
            sums += [
                F.cross_entropy(picked, y, reduction="sum").item(),
                (picked.argmax(-1) == y).sum().item(),
                (base_pred[row_of] == y).sum().item(),
                -base_logp[row_of, y].sum().item(),
                y.numel(),
                x.shape[0],
            ]
    finally:
        network.train(was_training)
    loss, correct, base_correct, base_loss, n, cells = _all_reduce(sums.tolist(), ctx, device)
    n = max(n, 1.0)
    return {
        "val_loss": loss / n,
        "val_accuracy": correct / n,
        "baseline_accuracy": base_correct / n,
        "baseline_loss": base_loss / n,
        "val_masked": int(n),
        "val_cells": int(cells),
    }


# ---------------------------------------------------------------------------------------------- the loop
def pretrain_network(
    network: ScBERTNetwork,
    sources: Sequence[TokenSource],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int | None = None,
    accumulate: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
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
    device: str | torch.device | None = None,
    precision: str | None = None,
    random_state: int = 0,
    checkpoint_meta: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    desc: str = "pretrain",
) -> PretrainResult:
    """Pretrain ``network`` in place by masked expression modelling on streamed token sources.

    Works alone or under ``torchrun`` (each process reads its own shard; gradients are averaged by
    :class:`~torch.nn.parallel.DistributedDataParallel`; only rank 0 logs, shows the bar and
    writes checkpoints). The loss of an optimiser step is the mean cross-entropy over every chosen
    position of the step (all micro-batches, all ranks), so accumulation and process count change
    how the work is split, not what is optimised.

    Parameters
    ----------
    network
        The network; it gets a fresh pretraining head if it has none. A classifier head is kept and
        left untouched (frozen for the run).
    sources
        The corpus (see :class:`~scbert_tl.train.TokenSource`), in the network's panel order.
    epochs
        Passes over the training cells (ignored when ``max_steps`` is given).
    max_steps
        Optimiser steps of the run (as many epochs as that takes).
    batch_size
        Cells per micro-batch per process; ``None`` takes ``settings.batch_size`` (``"auto"``
        estimates what fits the device). A resumed run reuses the checkpoint's.
    accumulate
        Micro-batches per optimiser step (gradient accumulation; DDP skips the all-reduce on all but the last).
    lr, weight_decay, betas
        AdamW settings.
    warmup
        Linear warm-up: a number of steps, or a fraction (< 1) of the run.
    schedule
        Decay after warm-up, to 0 at the last step: ``"cosine"``, ``"linear"`` or ``"constant"``.
    max_grad_norm
        Clip the gradient norm (None: no clipping).
    mask_prob, replace_prob
        Masking (see :func:`mask_tokens`).
    redraw_every
        Redraw the FAVOR+ projections every this many optimiser steps with a seeded generator
        (the policy of Performer pretraining; 1000 as ``performer-pytorch``); ``None`` or 0 keeps them fixed.
    validation_size
        Held-out cells (see :class:`~scbert_tl.train.StreamPlan`); 0 disables evaluation.
    eval_every
        Evaluate every this many steps (and always at the end); ``None``: once per epoch.
    checkpoint_dir
        Folder of the checkpoint (``checkpoint.pt``, replaced atomically); ``None``: no checkpoints.
    checkpoint_every
        Steps between checkpoints (one is also written at the end and when ``stop_after`` stops the run).
    resume
        Continue from the checkpoint in ``checkpoint_dir`` if there is one (a fresh start otherwise).
        The run's arguments must match the checkpoint's. Without ``resume`` an existing checkpoint is an error.
    stop_after
        Stop (after writing a checkpoint) once this many optimiser steps are done in total, without
        changing the schedule; resume later. For time-limited jobs.
    chunk_size, shuffle_buffer
        Rows per read, and chunks shuffled together (memory: about ``chunk_size * shuffle_buffer`` cells).
    gradient_checkpointing
        Recompute each block's activations in the backward pass (less memory, about a third more compute).
    device, precision
        As in :mod:`scbert_tl.settings`; ``"auto"`` precision trains in bfloat16 autocast on CUDA.
        Under ``torchrun`` on CUDA each process uses ``cuda:LOCAL_RANK``.
    random_state
        Seed of every random choice (see the module docstring).
    checkpoint_meta
        Plain data stored in the checkpoint (the ``tl`` layer keeps genes and provenance there).
    history
        Earlier history to extend (e.g. the model's); evaluations are appended.
    desc
        Progress bar label.

    Returns
    -------
    A :class:`PretrainResult`; the network is trained in place and left on ``device``.
    """
    args = dict(locals())
    del args["network"], args["sources"]
    with distributed_context(device) as ctx, cpu_runtime(_resolve_device(device, ctx), desc=desc):
        return _pretrain(network, sources, ctx=ctx, **args)


def _resolve_device(device: str | torch.device | None, ctx: DistContext) -> torch.device:
    dev = settings.resolve_device(device)
    if dev.type == "cuda" and ctx.distributed:
        dev = torch.device("cuda", ctx.local_rank)
    return dev


def _pretrain(
    network: ScBERTNetwork,
    sources: Sequence[TokenSource],
    *,
    ctx: DistContext,
    epochs: int,
    max_steps: int | None,
    batch_size: int | None,
    accumulate: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup: float | int,
    schedule: Schedule,
    max_grad_norm: float | None,
    mask_prob: float,
    replace_prob: float,
    redraw_every: int | None,
    validation_size: float | int | None,
    eval_every: int | None,
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int | None,
    resume: bool,
    stop_after: int | None,
    chunk_size: int,
    shuffle_buffer: int,
    gradient_checkpointing: bool,
    device: str | torch.device | None,
    precision: str | None,
    random_state: int,
    checkpoint_meta: dict[str, Any] | None,
    history: list[dict[str, Any]] | None,
    desc: str,
) -> PretrainResult:
    c = network.config
    seed = int(random_state)
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}.")
    for name, value in (("epochs", epochs), ("accumulate", accumulate)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("max_steps", max_steps), ("stop_after", stop_after), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    dev = _resolve_device(device, ctx)
    dtype = settings.resolve_dtype(dev, precision)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path is None:
        raise ValueError("resume=True needs checkpoint_dir (where the run writes its checkpoint).")
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        if not resume:
            raise FileExistsError(
                f"{ckpt_path} exists from an earlier run; pass resume=True to continue it, or another checkpoint_dir."
            )
        state = load_checkpoint(ckpt_path)
    elif resume and ctx.is_main:
        logger.info("No checkpoint in %s yet; starting a new run.", checkpoint_dir)

    if state is not None and batch_size is None:
        batch_size = int(state["params"]["batch_size"])
    if batch_size is None:
        batch_size = auto_batch_size(c, dev, training=True)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

    plan = StreamPlan(
        sources,
        chunk_size=chunk_size,
        shuffle_buffer=shuffle_buffer,
        validation_size=validation_size,
        seed=seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    if plan.n_genes != c.n_genes:
        raise ValueError(f"The sources have {plan.n_genes} panel genes but the network has {c.n_genes}.")
    n_batches = plan.batches_per_epoch(batch_size)
    steps_per_epoch = math.ceil(n_batches / accumulate)
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    warmup_steps = int(round(warmup * total_steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    if warmup_steps < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    redraw_every = int(redraw_every or 0)
    if eval_every is None:
        eval_every = steps_per_epoch

    params: dict[str, Any] = {
        "random_state": seed,
        "world_size": ctx.world_size,
        "batch_size": batch_size,
        "accumulate": accumulate,
        "epochs": epochs if max_steps is None else None,
        "max_steps": max_steps,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "betas": [float(b) for b in betas],
        "warmup_steps": warmup_steps,
        "schedule": schedule,
        "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
        "mask_prob": float(mask_prob),
        "replace_prob": float(replace_prob),
        "redraw_every": redraw_every,
        "chunk_size": chunk_size,
        "shuffle_buffer": shuffle_buffer,
        "n_validation": int(plan.validation.size),
        "n_train": plan.n_train,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "gradient_checkpointing": bool(gradient_checkpointing),
        "device": str(dev),
        "precision": str(dtype).removeprefix("torch."),
        "data": plan.describe(),
    }

    # model, optimiser, schedule -------------------------------------------------------------------
    if network.lm_head is None:
        with torch.random.fork_rng(devices=[]):  # seeded like everything else, the global state untouched
            torch.manual_seed(derive_int(seed, HEAD))
            network.lm_head = nn.Linear(c.dim, c.num_tokens)
        c.lm_head = True
        if ctx.is_main:
            logger.info("The network had no pretraining head; added a new one.")
    network.to(dev).train()
    frozen = []
    if network.classifier is not None:
        frozen = [p for p in network.classifier.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    old_ckpt = network.gradient_checkpointing
    network.gradient_checkpointing = bool(gradient_checkpointing)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warmup_steps, schedule=schedule)
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    step, epoch, step_in_epoch = 0, 0, 0
    history = list(history or [])
    meta = dict(checkpoint_meta or {})
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if state is not None:
        _check_same_run(state["params"], params, ckpt_path)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        history, meta, started = list(state["history"]), dict(state.get("meta") or {}), state["started"]
        if ctx.is_main:
            logger.info("Resuming %s at step %d of %d (epoch %d).", ckpt_path, step, total_steps, epoch)

    model: nn.Module = _MaskedLM(network)
    if ctx.distributed:
        # buffers (the FAVOR+ projections) are drawn identically on every rank; DDP's default buffer sync
        # from rank 0 costs little next to the gradient all-reduce and keeps them equal regardless
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    validation = (
        _prepare_validation(plan, seed, mask_token=c.mask_token, mask_prob=mask_prob, replace_prob=replace_prob)
        if plan.validation.size
        else None
    )
    if ctx.is_main:
        logger.info(
            "Pretraining on %d cells (%d held out) in %d process(es): %d steps of %d x %d x %d cells, %s schedule, lr %.2g.",
            plan.n_train,
            plan.validation.size,
            ctx.world_size,
            total_steps,
            batch_size,
            accumulate,
            ctx.world_size,
            schedule,
            lr,
        )

    def checkpoint() -> None:
        if ckpt_path is None or not ctx.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "config": c.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "step": step,
                "cells_seen": cells_seen_total,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "position": plan.position(epoch, step_in_epoch * accumulate, batch_size),
                "rng": {"random_state": seed, "scheme": "SeedSequence spawn keys; see scbert_tl.train._pretrain"},
                "params": params,
                "history": history,
                "meta": meta,
                "started": started,
                "saved": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        logger.debug("Checkpoint at step %d written to %s", step, ckpt_path)

    def evaluate(train_loss: float) -> None:
        record: dict[str, Any] = {
            "stage": "pretrain",
            "step": step,
            "epoch": epoch + step_in_epoch / steps_per_epoch,
            "train_loss": train_loss,
            "lr": scheduler.get_last_lr()[0],
            "cells_seen": cells_seen_total,
        }
        if validation is not None:
            record.update(_evaluate(network, validation, batch_size=batch_size, device=dev, dtype=dtype, ctx=ctx))
            if ctx.is_main:
                logger.info(
                    "step %d: held-out masked accuracy %.4f (baseline %.4f), loss %.4f (baseline %.4f); train loss %.4f",
                    step,
                    record["val_accuracy"],
                    record["baseline_accuracy"],
                    record["val_loss"],
                    record["baseline_loss"],
                    train_loss,
                )
        history.append(record)

    cells_seen_total = int(history[-1]["cells_seen"]) if history and "cells_seen" in history[-1] else 0
    if state is not None:
        cells_seen_total = int(state.get("cells_seen", cells_seen_total))
    stop_at = min(total_steps, stop_after) if stop_after is not None else total_steps
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not (settings.progress and ctx.is_main))
    window = np.zeros(2)  # loss sum, positions since the last evaluation (this rank)
    t0, cells_here = time.perf_counter(), 0
    stopped_early = False
    try:
        while step < stop_at:
            stream = plan.iter_batches(epoch, batch_size, start=step_in_epoch * accumulate, stop=n_batches)
            try:
                while step < stop_at:
                    n_micro = min(accumulate, n_batches - step_in_epoch * accumulate)
                    batches = [next(stream)[1] for _ in range(n_micro)]
                    loss_sum, n_pos = _train_step(
                        model,
                        network,
                        batches,
                        rng=derive_rng(seed, MASK, ctx.rank, step),
                        optimizer=optimizer,
                        scaler=scaler,
                        max_grad_norm=max_grad_norm,
                        mask_prob=mask_prob,
                        replace_prob=replace_prob,
                        device=dev,
                        dtype=dtype,
                        ctx=ctx,
                    )
                    scheduler.step()
                    step += 1
                    step_in_epoch += 1
                    cells = sum(b.shape[0] for b in batches)
                    cells_here += cells
                    cells_seen_total += cells * ctx.world_size
                    window += (loss_sum, n_pos)
                    if redraw_every and step % redraw_every == 0:
                        redraw_projections(network, seed, step)
                    if step % eval_every == 0 or step == total_steps:
                        total = _all_reduce(window.tolist(), ctx, dev)
                        evaluate(total[0] / max(total[1], 1.0))
                        window[:] = 0
                    end_of_epoch = step_in_epoch == steps_per_epoch
                    if end_of_epoch:
                        epoch, step_in_epoch = epoch + 1, 0
                    if (checkpoint_every and step % checkpoint_every == 0) or step == total_steps:
                        checkpoint()
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss_sum / max(n_pos, 1):.3f}",
                        cells_s=f"{cells_here * ctx.world_size / max(time.perf_counter() - t0, 1e-9):.1f}",
                        refresh=False,
                    )
                    if end_of_epoch:
                        break
            finally:
                stream.close()
        if step < total_steps:
            stopped_early = True
            if ckpt_path is not None and not (checkpoint_every and step % checkpoint_every == 0):
                checkpoint()
            if ctx.is_main:
                logger.info("Stopped after step %d of %d (stop_after); resume=True continues.", step, total_steps)
    finally:
        bar.close()
        plan.close()
        network.gradient_checkpointing = old_ckpt
        for p in frozen:
            p.requires_grad_(True)
        network.eval()
    if ctx.distributed:
        dist.barrier()
    params["started"], params["finished"] = started, datetime.now(UTC).isoformat(timespec="seconds")
    return PretrainResult(
        history=history,
        params=params,
        step=step,
        total_steps=total_steps,
        finished=not stopped_early,
        rank=ctx.rank,
        world_size=ctx.world_size,
        meta=meta,
    )


def _train_step(
    model: nn.Module,
    network: ScBERTNetwork,
    batches: list[sp.csr_matrix],
    *,
    rng: np.random.Generator,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float | None,
    mask_prob: float,
    replace_prob: float,
    device: torch.device,
    dtype: torch.dtype,
    ctx: DistContext,
) -> tuple[float, float]:
    """One optimiser step over ``batches`` (micro-batches); returns this rank's loss sum and chosen positions."""
    c = network.config
    prepared = []
    for tokens in batches:
        masked, chosen = mask_tokens(
            tokens, rng, mask_token=c.mask_token, mask_prob=mask_prob, replace_prob=replace_prob
        )
        prepared.append((masked, chosen, tokens.data[chosen].astype(np.int64)))
    n_local = float(sum(int(p[1].sum()) for p in prepared))
    n_global = _all_reduce([n_local], ctx, device)[0]
    # DDP averages gradients over ranks; scaling by world / n_global makes the step's gradient that of
    # the mean loss over every chosen position of every micro-batch on every rank
    scale = ctx.world_size / max(n_global, 1.0)
    loss_total = 0.0
    for i, (masked, chosen, y) in enumerate(prepared):
        last = i == len(prepared) - 1
        sync = model.no_sync() if (ctx.distributed and not last) else contextlib.nullcontext()
        x = torch.from_numpy(_dense(masked))
        pick = torch.from_numpy(_dense(masked, chosen.astype(np.int8)).astype(bool))
        target = torch.from_numpy(y)
        if device.type == "cuda":
            x, pick, target = (t.pin_memory().to(device, non_blocking=True) for t in (x, pick, target))
        with sync:
            with autocast(device, dtype):
                logits = model(x)[:, :-1]
            loss = F.cross_entropy(logits[pick].float(), target, reduction="sum")
            scaler.scale(loss * scale).backward()
        loss_total += loss.item()
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in network.parameters() if p.grad is not None], max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, n_local


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path | None) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in _TRAJECTORY_KEYS
        if _plain(saved.get(k)) != _plain(now.get(k))
    ]
    if diffs:
        raise ValueError(
            f"Cannot resume {path}: this call differs from the run that wrote it ({'; '.join(diffs)}). "
            "Resume with the same data and arguments, or start a new run in another checkpoint_dir."
        )


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
