"""Masked expression modelling: masking, the training loop (DDP, accumulation, checkpoints, resume), evaluation.

No AnnData here: the loop reads :class:`~scbert_tl.data.TokenSource` objects through a
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

from typing import TYPE_CHECKING, Any

from ._distributed import distributed_context, resolve_device
from ._loop import _Pretrainer
from ._runtime import cpu_runtime

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import torch

    from ..data import TokenSource
    from ..model import ScBERTNetwork
    from ._plan import Schedule
    from ._step import PretrainResult


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
        The corpus (see :class:`~scbert_tl.data.TokenSource`), in the network's panel order.
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
    with distributed_context(device) as ctx, cpu_runtime(resolve_device(device, ctx), desc=desc):
        return _Pretrainer(network, sources, ctx=ctx, **args).run()
