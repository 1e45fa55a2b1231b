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

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .._options import PretrainOptions
from ._distributed import distributed_context, resolve_device
from ._loop import _Pretrainer
from ._runtime import cpu_runtime

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from ..data import TokenSource
    from ..model import ScBERTNetwork
    from ._step import PretrainResult


# ---------------------------------------------------------------------------------------------- the loop
def pretrain_network(
    network: ScBERTNetwork,
    sources: Sequence[TokenSource],
    options: PretrainOptions | None = None,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    device: str | torch.device | None = None,
    precision: str | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    desc: str = "pretrain",
    **changes: Any,
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
    options
        The run (default: :class:`~scbert_tl._options.PretrainOptions`'s defaults), as documented for
        :func:`scbert_tl.tl.pretrain`. Beyond that: ``batch_size=None`` takes ``settings.batch_size``
        and a resumed run reuses the checkpoint's; with ``resume`` the run's options must match the
        checkpoint's; masking is that of :func:`mask_tokens`; ``random_state`` seeds every random
        choice (see the module docstring).
    betas
        AdamW's betas.
    device, precision
        As in :mod:`scbert_tl.settings`; ``"auto"`` precision trains in bfloat16 autocast on CUDA.
        Under ``torchrun`` on CUDA each process uses ``cuda:LOCAL_RANK``.
    checkpoint_meta
        Plain data stored in the checkpoint (the ``tl`` layer keeps genes and provenance there).
    history
        Earlier history to extend (e.g. the model's); evaluations are appended.
    desc
        Progress bar label.
    changes
        Options changed from ``options`` (e.g. ``max_steps=10``).

    Returns
    -------
    A :class:`PretrainResult`; the network is trained in place and left on ``device``.
    """
    options = replace(options or PretrainOptions(), **changes)
    if options.lr is None:
        options = replace(options, lr=1e-4)
    args = {
        **options.as_dict(),
        "betas": betas,
        "device": device,
        "precision": precision,
        "checkpoint_meta": checkpoint_meta,
        "history": history,
        "desc": desc,
    }
    with distributed_context(device) as ctx, cpu_runtime(resolve_device(device, ctx), desc=desc):
        return _Pretrainer(network, sources, ctx=ctx, **args).run()
