"""One optimiser step of masked expression modelling (micro-batches, DDP, loss scaling), the learning-rate schedule, projection redraws."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import FavorAttention
from ._distributed import DistContext, all_reduce
from ._inference import autocast
from ._masking import dense
from ._stream import REDRAW, derive_int

if TYPE_CHECKING:
    import scipy.sparse as sp

    from ..model import ScBERTNetwork
    from ._masking import Masking
    from ._plan import TrainingPlan


class MaskedLM(nn.Module):
    """The network's masked-expression forward as ``forward`` (what DDP wraps)."""

    def __init__(self, network: ScBERTNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.network.mlm_logits(tokens)


def redraw_projections(network: ScBERTNetwork, seed: int, step: int) -> None:
    """Draw new FAVOR+ projections in every attention block, seeded by ``(REDRAW, step, layer)``."""
    attns = [m for m in network.modules() if isinstance(m, FavorAttention)]
    for i, attn in enumerate(attns):
        gen = torch.Generator().manual_seed(derive_int(seed, REDRAW, step, i))
        attn.redraw_projection(generator=gen)


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


def train_step(
    model: nn.Module,
    network: ScBERTNetwork,
    batches: list[sp.csr_matrix],
    *,
    rng: np.random.Generator,
    plan: TrainingPlan,
    masking: Masking,
    max_grad_norm: float | None,
    device: torch.device,
    dtype: torch.dtype,
    ctx: DistContext,
) -> tuple[float, float]:
    """One optimiser step over ``batches`` (micro-batches); returns this rank's loss sum and chosen positions."""
    prepared = []
    for tokens in batches:
        masked, chosen = masking.tokens(tokens, rng)
        prepared.append((masked, chosen, tokens.data[chosen].astype(np.int64)))
    n_local = float(sum(int(p[1].sum()) for p in prepared))
    n_global = all_reduce([n_local], ctx, device)[0]
    # DDP averages gradients over ranks; scaling by world / n_global makes the step's gradient that of
    # the mean loss over every chosen position of every micro-batch on every rank
    scale = ctx.world_size / max(n_global, 1.0)
    loss_total = 0.0
    for i, (masked, chosen, y) in enumerate(prepared):
        last = i == len(prepared) - 1
        sync = model.no_sync() if (ctx.distributed and not last) else contextlib.nullcontext()
        x = torch.from_numpy(dense(masked))
        pick = torch.from_numpy(dense(masked, chosen.astype(np.int8)).astype(bool))
        target = torch.from_numpy(y)
        if device.type == "cuda":
            x, pick, target = (t.pin_memory().to(device, non_blocking=True) for t in (x, pick, target))
        with sync:
            with autocast(device, dtype):
                logits = model(x)[:, :-1]
            loss = F.cross_entropy(logits[pick].float(), target, reduction="sum")
            plan.backward(loss * scale)
        loss_total += loss.item()
    clip = [p for p in network.parameters() if p.grad is not None] if max_grad_norm is not None else None
    plan.step(clip, max_grad_norm)
    plan.zero_grad()
    return loss_total, n_local
