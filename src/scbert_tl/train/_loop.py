"""The pretraining loop as an object: set-up from arguments or a checkpoint, steps, evaluation, checkpoints.

See :func:`scbert_tl.train._pretrain.pretrain_network` (the entry point) for the arguments and the
randomness scheme.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .._settings import settings
from . import _step
from ._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    check_same_run,
    load_checkpoint,
    save_checkpoint,
)
from ._distributed import DistContext, all_reduce, resolve_device
from ._inference import auto_batch_size
from ._masking import Masking
from ._mlm_eval import evaluate_masked, prepare_validation
from ._plan import TrainingPlan, parameter_groups, warmup_steps
from ._step import PretrainResult, redraw_projections
from ._stream import HEAD, MASK, StreamPlan, derive_int, derive_rng

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp

    from ..data import TokenSource
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)


def _check_args(args: dict[str, Any]) -> None:
    """Reject bad loop arguments before anything is read or built."""
    if args["schedule"] not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {args['schedule']!r}.")
    for name in ("epochs", "accumulate"):
        value = args[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name in ("max_steps", "stop_after", "eval_every"):
        value = args[name]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if args["lr"] <= 0:
        raise ValueError(f"lr must be positive, got {args['lr']}.")


class _Pretrainer:
    """One pretraining run: set up from the arguments (or a checkpoint), then :meth:`run`.

    The state a step changes (step, epoch, cells seen, history) lives on the object, so the
    checkpoint and the evaluation read it where the loop left it.
    """

    def __init__(self, network: ScBERTNetwork, sources: Sequence[TokenSource], *, ctx: DistContext, **args: Any):
        _check_args(args)
        self.network, self.ctx, self.a = network, ctx, args
        self.seed = int(args["random_state"])
        self.dev = resolve_device(args["device"], ctx)
        self.dtype = settings.resolve_dtype(self.dev, args["precision"])
        directory = args["checkpoint_dir"]
        self.ckpt_path = Path(directory) / CHECKPOINT_NAME if directory is not None else None
        self.state = self._read_checkpoint()
        self.batch_size = self._batch_size()
        self.plan = StreamPlan(
            sources,
            chunk_size=args["chunk_size"],
            shuffle_buffer=args["shuffle_buffer"],
            validation_size=args["validation_size"],
            seed=self.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        if self.plan.n_genes != network.config.n_genes:
            raise ValueError(
                f"The sources have {self.plan.n_genes} panel genes but the network has {network.config.n_genes}."
            )
        self._schedule_steps()
        self.params = self._params()

    def _read_checkpoint(self) -> dict[str, Any] | None:
        resume, path = self.a["resume"], self.ckpt_path
        if resume and path is None:
            raise ValueError("resume=True needs checkpoint_dir (where the run writes its checkpoint).")
        if path is not None and path.exists():
            if not resume:
                raise FileExistsError(
                    f"{path} exists from an earlier run; pass resume=True to continue it, or another checkpoint_dir."
                )
            return load_checkpoint(path)
        if resume and self.ctx.is_main:
            logger.info("No checkpoint in %s yet; starting a new run.", self.a["checkpoint_dir"])
        return None

    def _batch_size(self) -> int:
        batch_size = self.a["batch_size"]
        if self.state is not None and batch_size is None:
            batch_size = int(self.state["params"]["batch_size"])
        if batch_size is None:
            batch_size = auto_batch_size(self.network.config, self.dev, training=True)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        return batch_size

    def _schedule_steps(self) -> None:
        a = self.a
        self.n_batches = self.plan.batches_per_epoch(self.batch_size)
        self.steps_per_epoch = math.ceil(self.n_batches / a["accumulate"])
        self.total_steps = a["max_steps"] if a["max_steps"] is not None else a["epochs"] * self.steps_per_epoch
        self.warmup_steps = warmup_steps(a["warmup"], self.total_steps)
        self.redraw_every = int(a["redraw_every"] or 0)
        self.eval_every = self.steps_per_epoch if a["eval_every"] is None else a["eval_every"]

    def _params(self) -> dict[str, Any]:
        """The resolved arguments: provenance, and what a resumed run must match (``TRAJECTORY_KEYS``)."""
        a, max_grad_norm = self.a, self.a["max_grad_norm"]
        return {
            "random_state": self.seed,
            "world_size": self.ctx.world_size,
            "batch_size": self.batch_size,
            "accumulate": a["accumulate"],
            "epochs": a["epochs"] if a["max_steps"] is None else None,
            "max_steps": a["max_steps"],
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "lr": float(a["lr"]),
            "weight_decay": float(a["weight_decay"]),
            "betas": [float(b) for b in a["betas"]],
            "warmup_steps": self.warmup_steps,
            "schedule": a["schedule"],
            "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
            "mask_prob": float(a["mask_prob"]),
            "replace_prob": float(a["replace_prob"]),
            "redraw_every": self.redraw_every,
            "chunk_size": a["chunk_size"],
            "shuffle_buffer": a["shuffle_buffer"],
            "n_validation": int(self.plan.validation.size),
            "n_train": self.plan.n_train,
            "eval_every": self.eval_every,
            "checkpoint_every": a["checkpoint_every"],
            "gradient_checkpointing": bool(a["gradient_checkpointing"]),
            "device": str(self.dev),
            "precision": str(self.dtype).removeprefix("torch."),
            "data": self.plan.describe(),
        }

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare_network(self) -> None:
        """Pretraining head, frozen classifier, optimiser, schedule and loss scaling."""
        network, c, a = self.network, self.network.config, self.a
        if network.lm_head is None:
            with torch.random.fork_rng(devices=[]):  # seeded like everything else, the global state untouched
                torch.manual_seed(derive_int(self.seed, HEAD))
                network.lm_head = nn.Linear(c.dim, c.num_tokens)
            c.lm_head = True
            if self.ctx.is_main:
                logger.info("The network had no pretraining head; added a new one.")
        network.to(self.dev).train()
        self.frozen = []
        if network.classifier is not None:
            self.frozen = [p for p in network.classifier.parameters() if p.requires_grad]
            for p in self.frozen:
                p.requires_grad_(False)
        self.old_ckpt = network.gradient_checkpointing
        network.gradient_checkpointing = bool(a["gradient_checkpointing"])
        self.training = TrainingPlan(
            parameter_groups(network, a["weight_decay"]),
            lr=a["lr"],
            weight_decay=a["weight_decay"],
            betas=tuple(a["betas"]),
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            schedule=a["schedule"],
            device=self.dev,
            dtype=self.dtype,
        )

    def _restore(self) -> None:
        """Position, history and optimiser state: a fresh run's, or the checkpoint's."""
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.history = list(self.a["history"] or [])
        self.meta = dict(self.a["checkpoint_meta"] or {})
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        state = self.state
        if state is not None:
            check_same_run(state["params"], self.params, self.ckpt_path)
            self.network.load_state_dict(state["model"])
            self.training.load_state_dict(state)
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.step_in_epoch = int(state["step_in_epoch"])
            self.history, self.meta = list(state["history"]), dict(state.get("meta") or {})
            self.started = state["started"]
            if self.ctx.is_main:
                logger.info(
                    "Resuming %s at step %d of %d (epoch %d).", self.ckpt_path, self.step, self.total_steps, self.epoch
                )
        history = self.history
        self.cells_seen = int(history[-1]["cells_seen"]) if history and "cells_seen" in history[-1] else 0
        if state is not None:
            self.cells_seen = int(state.get("cells_seen", self.cells_seen))

    def _wrap(self) -> None:
        """The module the steps run (DDP under torchrun) and the held-out masks."""
        self.model: nn.Module = _step.MaskedLM(self.network)
        if self.ctx.distributed:
            # buffers (the FAVOR+ projections) are drawn identically on every rank; DDP's default buffer sync
            # from rank 0 costs little next to the gradient all-reduce and keeps them equal regardless
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
            )
        a = self.a
        self.masking = Masking(self.network.config.mask_token, a["mask_prob"], a["replace_prob"])
        self.validation = prepare_validation(self.plan, self.seed, self.masking) if self.plan.validation.size else None
        if self.ctx.is_main:
            logger.info(
                "Pretraining on %d cells (%d held out) in %d process(es): %d steps of %d x %d x %d cells, %s schedule, lr %.2g.",
                self.plan.n_train,
                self.plan.validation.size,
                self.ctx.world_size,
                self.total_steps,
                self.batch_size,
                a["accumulate"],
                self.ctx.world_size,
                a["schedule"],
                a["lr"],
            )

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> PretrainResult:
        """Train to the end (or to ``stop_after``); the network is left in eval mode on the device."""
        self._prepare_network()
        self._restore()
        self._wrap()
        stop_after = self.a["stop_after"]
        stop_at = min(self.total_steps, stop_after) if stop_after is not None else self.total_steps
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.a["desc"],
            unit="step",
            disable=not (settings.progress and self.ctx.is_main),
        )
        self.window = np.zeros(2)  # loss sum, positions since the last evaluation (this rank)
        self.t0, self.cells_here = time.perf_counter(), 0
        stopped_early = False
        try:
            while self.step < stop_at:
                self._epoch(stop_at)
            if self.step < self.total_steps:
                stopped_early = True
                self._stop_early()
        finally:
            self.bar.close()
            self.plan.close()
            self.network.gradient_checkpointing = self.old_ckpt
            for p in self.frozen:
                p.requires_grad_(True)
            self.network.eval()
        if self.ctx.distributed:
            dist.barrier()
        self.params["started"] = self.started
        self.params["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        return PretrainResult(
            history=self.history,
            params=self.params,
            step=self.step,
            total_steps=self.total_steps,
            finished=not stopped_early,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            meta=self.meta,
        )

    def _epoch(self, stop_at: int) -> None:
        """Optimiser steps until the end of the epoch (or ``stop_at``)."""
        a, accumulate = self.a, self.a["accumulate"]
        stream = self.plan.iter_batches(
            self.epoch, self.batch_size, start=self.step_in_epoch * accumulate, stop=self.n_batches
        )
        try:
            while self.step < stop_at:
                n_micro = min(accumulate, self.n_batches - self.step_in_epoch * accumulate)
                batches = [next(stream)[1] for _ in range(n_micro)]
                loss_sum, n_pos = _step.train_step(
                    self.model,
                    self.network,
                    batches,
                    rng=derive_rng(self.seed, MASK, self.ctx.rank, self.step),
                    plan=self.training,
                    masking=self.masking,
                    max_grad_norm=a["max_grad_norm"],
                    device=self.dev,
                    dtype=self.dtype,
                    ctx=self.ctx,
                )
                if self._after_step(batches, loss_sum, n_pos):
                    break
        finally:
            stream.close()

    def _after_step(self, batches: list[sp.csr_matrix], loss_sum: float, n_pos: float) -> bool:
        """Schedule, counters, redraws, evaluation, checkpoint and bar after a step; True at the end of an epoch."""
        self.training.scheduler.step()
        self.step += 1
        self.step_in_epoch += 1
        cells = sum(b.shape[0] for b in batches)
        self.cells_here += cells
        self.cells_seen += cells * self.ctx.world_size
        self.window += (loss_sum, n_pos)
        step = self.step
        if self.redraw_every and step % self.redraw_every == 0:
            redraw_projections(self.network, self.seed, step)
        if step % self.eval_every == 0 or step == self.total_steps:
            total = all_reduce(self.window.tolist(), self.ctx, self.dev)
            self.evaluate(total[0] / max(total[1], 1.0))
            self.window[:] = 0
        end_of_epoch = self.step_in_epoch == self.steps_per_epoch
        if end_of_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        checkpoint_every = self.a["checkpoint_every"]
        if (checkpoint_every and step % checkpoint_every == 0) or step == self.total_steps:
            self.checkpoint()
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{loss_sum / max(n_pos, 1):.3f}",
            cells_s=f"{self.cells_here * self.ctx.world_size / max(time.perf_counter() - self.t0, 1e-9):.1f}",
            refresh=False,
        )
        return end_of_epoch

    def _stop_early(self) -> None:
        checkpoint_every = self.a["checkpoint_every"]
        if self.ckpt_path is not None and not (checkpoint_every and self.step % checkpoint_every == 0):
            self.checkpoint()
        if self.ctx.is_main:
            logger.info("Stopped after step %d of %d (stop_after); resume=True continues.", self.step, self.total_steps)

    # ------------------------------------------------------------------------------------------ records
    def checkpoint(self) -> None:
        """Write the checkpoint (rank 0, when a folder was given)."""
        if self.ckpt_path is None or not self.ctx.is_main:
            return
        save_checkpoint(
            self.ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "config": self.network.config.to_dict(),
                **self.training.state_dict(),
                "step": self.step,
                "cells_seen": self.cells_seen,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "position": self.plan.position(self.epoch, self.step_in_epoch * self.a["accumulate"], self.batch_size),
                "rng": {"random_state": self.seed, "scheme": "SeedSequence spawn keys; see scbert_tl.train._pretrain"},
                "params": self.params,
                "history": self.history,
                "meta": self.meta,
                "started": self.started,
                "saved": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        logger.debug("Checkpoint at step %d written to %s", self.step, self.ckpt_path)

    def evaluate(self, train_loss: float) -> None:
        """Append a history record: the training loss since the last one and, with held-out cells, their scores."""
        record: dict[str, Any] = {
            "stage": "pretrain",
            "step": self.step,
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
            "train_loss": train_loss,
            "lr": self.training.lr,
            "cells_seen": self.cells_seen,
        }
        if self.validation is not None:
            record.update(
                evaluate_masked(
                    self.network,
                    self.validation,
                    batch_size=self.batch_size,
                    device=self.dev,
                    dtype=self.dtype,
                    ctx=self.ctx,
                )
            )
            if self.ctx.is_main:
                logger.info(
                    "step %d: held-out masked accuracy %.4f (baseline %.4f), loss %.4f (baseline %.4f); train loss %.4f",
                    self.step,
                    record["val_accuracy"],
                    record["baseline_accuracy"],
                    record["val_loss"],
                    record["baseline_loss"],
                    train_loss,
                )
        self.history.append(record)
