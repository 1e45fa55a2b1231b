"""The training plan fine-tuning and pretraining share: AdamW, one learning-rate schedule, loss scaling for float16."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from collections.abc import Iterable

Schedule = Literal["cosine", "linear", "constant"]


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


def warmup_steps(warmup: float | int, total: int) -> int:
    """Warm-up steps: a count, or a fraction (< 1) of ``total`` rounded, at least one step when there is any warm-up."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    steps = int(round(warmup * total)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    return max(1, steps) if warmup > 0 else 0


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in AdamW groups: weight decay on weight matrices only.

    Norms, biases (parameters of fewer than two dimensions) and embedding tables are not decayed:
    decay pulls a LayerNorm's scale and an embedding row towards 0, which is no regularisation
    of the function the network computes. Without weight decay there is one group.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": trainable, "weight_decay": 0.0}]
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    plain = [p for p in trainable if p.ndim < 2 or id(p) in embeddings]
    plain_ids = {id(p) for p in plain}
    decayed = [p for p in trainable if id(p) not in plain_ids]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class TrainingPlan:
    """AdamW over ``params``, warm-up then decay over ``total_steps`` (:func:`lr_factor`), and a gradient scaler.

    The scaler is active for float16 autocast only (bfloat16 and float32 need none); with it off,
    :meth:`backward` and :meth:`step` are the plain ``loss.backward()`` and ``optimizer.step()``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | list[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        total_steps: int,
        warmup_steps: int,
        schedule: Schedule = "cosine",
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warmup_steps, schedule=schedule)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (scaled when the scaler is on)."""
        self.scaler.scale(loss).backward()

    def step(self, clip: list[torch.nn.Parameter] | None = None, max_grad_norm: float | None = None) -> None:
        """One optimiser step (after clipping the gradient norm of ``clip`` to ``max_grad_norm``); the schedule moves on separately."""
        if max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(clip, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the scaler's state only when it is on)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s keys of a checkpoint."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # other parameter groups
            raise RuntimeError(
                f"The checkpoint's optimiser state does not fit this version's ({e}): it was written by an earlier "
                "scbert-tl that applied weight decay to every parameter (one group; norms, biases and embeddings "
                "are no longer decayed). Resume it with that version, or start a new run."
            ) from e
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
