"""Supervised fine-tuning of the classifier: no AnnData here; :func:`scbert_tl.tl.finetune` feeds it."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._metrics import balanced_probability, macro_f1
from .._settings import settings
from ._augment import detection_rank, gene_mask
from ._inference import autocast, batch_indices, run_batches
from ._plan import TrainingPlan, parameter_groups, warmup_steps
from ._runtime import cpu_runtime

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..data import TokenMatrix
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)

Trainable = Literal["all", "original", "head"]
#: Share of the epochs that, with ``class_weight="sampled"``, shuffle the training cells as they come before the
#: class-balanced draws begin: the network first learns from every cell of the large types, then the rare ones
#: are drawn as often (PBMC3k class imbalance, rare-type F1 mean 0.892 over five seeds against 0.615 with
#: balanced draws from the start; docs: benchmarks, "Two phases of sampling").
NATURAL_SHARE = 0.5
#: Validation metrics that can select the epoch (see :func:`scbert_tl.tl.finetune`).
SELECT_ON = ("balanced_probability", "macro_f1", "loss", "accuracy")


@dataclass
class FinetuneOptions:
    """Hyper-parameters of :func:`fit_classifier` (see :func:`scbert_tl.tl.finetune` for their meaning)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    accumulate: int = 1
    patience: int = 5
    class_weight: str | None = "sampled"
    trainable: Trainable = "all"
    select_on: Literal["balanced_probability", "macro_f1", "loss", "accuracy"] = "balanced_probability"
    mask_genes: float = 0.0
    downsample: float = 0.0
    gene_bias: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate", "patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.trainable not in ("all", "original", "head"):
            raise ValueError(f"trainable must be 'all', 'original' or 'head', got {self.trainable!r}.")
        if self.class_weight not in (None, "balanced", "sampled"):
            raise ValueError(f"class_weight must be None, 'balanced' or 'sampled', got {self.class_weight!r}.")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {', '.join(map(repr, SELECT_ON))}; got {self.select_on!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.mask_genes <= 1:
            raise ValueError(f"mask_genes must be a share of the genes in [0, 1], got {self.mask_genes}.")
        if not self.downsample >= 0:
            raise ValueError(f"downsample must be a number of counts >= 0 (0: off), got {self.downsample}.")
        if not self.gene_bias >= 0:
            raise ValueError(f"gene_bias must be a standard deviation >= 0 (0: off), got {self.gene_bias}.")
        if self.gene_bias > 0 and self.downsample == 0:
            raise ValueError(
                "gene_bias acts on the cells that depth augmentation thins: pass downsample > 0 with it, or gene_bias=0."
            )


def set_trainable(network: ScBERTNetwork, trainable: Trainable) -> int:
    """Freeze what the scheme leaves fixed; return the number of trainable parameters.

    ``"all"`` trains everything but a fixed (gene2vec) gene embedding; ``"original"`` is the published
    scheme: the classifier head, the final LayerNorm and the second-to-last encoder block;
    ``"head"`` trains the classifier head alone.
    """
    if network.classifier is None:
        raise ValueError("The network has no classifier head to fine-tune.")
    for p in network.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "all":
        network.gene_emb.weight.requires_grad_(network.config.gene_emb_trainable)
    if trainable == "original":
        for module in (network.norm, network.layers[-2] if len(network.layers) > 1 else network.layers[-1]):
            for p in module.parameters():
                p.requires_grad_(True)
    for p in network.classifier.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def _logits(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    return network(x)


def evaluate(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    labels: np.ndarray,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    weight: torch.Tensor | None,
) -> dict[str, float]:
    """Loss, accuracy, macro F1 and balanced probability (:func:`~scbert_tl._metrics.balanced_probability`) on ``rows``."""
    (logits,) = run_batches(network, tokens, _logits, rows=rows, batch_size=batch_size, device=device, desc="validate")
    y = labels[rows]
    logits_t = torch.from_numpy(logits)
    loss = nn.functional.cross_entropy(logits_t, torch.from_numpy(y), weight=None if weight is None else weight.cpu())
    pred = logits.argmax(1)
    return {
        "loss": float(loss),
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred),
        "balanced_probability": balanced_probability(y, torch.softmax(logits_t.double(), dim=1).numpy()),
    }


def class_weights(
    labels: np.ndarray, train_rows: np.ndarray, n_classes: int, class_weight: str | None, device: torch.device
) -> torch.Tensor | None:
    """Per-class loss weights: ``"balanced"`` (inverse frequency in the training cells, 0 for absent classes) or None.

    ``"sampled"`` balances the classes by drawing the cells instead (:func:`epoch_rows`): no loss weights.
    """
    if class_weight != "balanced":
        return None
    counts = np.bincount(labels[train_rows], minlength=n_classes)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def epoch_sampling(class_weight: str | None, epoch: int, epochs: int) -> str | None:
    """How epoch ``epoch`` (from 1) of ``epochs`` draws its cells: ``"sampled"`` shuffles for the first :data:`NATURAL_SHARE`."""
    if class_weight == "sampled" and epoch - 1 < NATURAL_SHARE * epochs:
        return None
    return class_weight


def epoch_rows(
    train_rows: np.ndarray, labels: np.ndarray, class_weight: str | None, rng: np.random.Generator
) -> np.ndarray:
    """The training cells of one epoch, in order: a permutation, or for ``"sampled"`` as many cells drawn anew.

    ``"sampled"`` draws with replacement, every class equally likely: a rare type's few cells are seen,
    differently augmented, as often as a large type's (:func:`epoch_sampling` says which epochs do).
    """
    if class_weight != "sampled":
        return rng.permutation(train_rows)
    y = labels[train_rows]
    counts = np.bincount(y)
    p = 1.0 / (np.count_nonzero(counts) * counts[y])
    return rng.choice(train_rows, size=train_rows.size, replace=True, p=p / p.sum())


def _plan(
    network: ScBERTNetwork, o: FinetuneOptions, n_train: int, device: torch.device, dtype: torch.dtype
) -> TrainingPlan:
    """AdamW over the trainable parameters (no decay on norms, biases, embeddings), warm-up then cosine decay to 0."""
    steps_per_epoch = math.ceil(n_train / (o.batch_size * o.accumulate))
    total = steps_per_epoch * o.epochs
    return TrainingPlan(
        parameter_groups(network, o.weight_decay),
        lr=o.lr,
        weight_decay=o.weight_decay,
        total_steps=total,
        warmup_steps=warmup_steps(o.warmup, total),
        device=device,
        dtype=dtype,
    )


@dataclass
class _Epochs:
    """What one epoch of fine-tuning needs besides the network and the data (built once per run)."""

    plan: TrainingPlan
    loss_fn: nn.Module
    weight: torch.Tensor | None
    rng: np.random.Generator
    augment: torch.Generator
    rank: np.ndarray | None
    labels: torch.Tensor
    depth: Callable[[np.ndarray], np.ndarray] | None = None


def _train_epoch(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    train_rows: np.ndarray,
    o: FinetuneOptions,
    e: _Epochs,
    *,
    epoch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """One pass over the training cells, in shuffled steps of ``batch_size * accumulate``; the mean training loss."""
    network.train()
    seen, loss_sum = 0, 0.0
    step_rows = o.batch_size * o.accumulate
    order = epoch_rows(train_rows, e.labels.numpy(), epoch_sampling(o.class_weight, epoch, o.epochs), e.rng)
    for group in batch_indices(order, step_rows):
        e.plan.zero_grad()
        # drawn for the whole step, so that accumulation does not change which genes are hidden
        hidden = gene_mask(len(group), tokens.n_genes, o.mask_genes, e.augment, e.rank)
        thinned = None if e.depth is None else e.depth(group)  # likewise the cells thinned, and how
        for start in range(0, len(group), o.batch_size):
            micro = group[start : start + o.batch_size]
            x = torch.from_numpy(tokens.dense(micro) if thinned is None else thinned[start : start + len(micro)])
            if hidden is not None:
                x = x.masked_fill(hidden[start : start + len(micro)], network.config.mask_token)
            x = x.to(device, non_blocking=True)
            y = e.labels[micro].to(device)
            with autocast(device, dtype):
                logits = network(x)
            loss = e.loss_fn(logits.float(), y)
            # a weighted sum divided by the step's total weight: one big batch, however it is split
            denom = e.weight[e.labels[group].to(device)].sum() if e.weight is not None else float(len(group))
            e.plan.backward(loss / denom)
            loss_sum += float(loss.detach())
            seen += float(denom)
        e.plan.step()
        e.plan.scheduler.step()
    return loss_sum / max(seen, 1.0)


def fit_classifier(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    options: FinetuneOptions,
    *,
    device: torch.device,
    dtype: torch.dtype,
    depth: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, float]]:
    """Train ``network``'s classifier on ``train_rows``; keep the weights of the best validation epoch.

    The model is selected, and training stopped early, on ``val_rows`` alone (``select_on``, ties
    broken by the validation loss). Gradients of ``accumulate`` micro-batches are summed with each
    micro-batch's loss weighted by its share of the cells in the step, so the update equals that of
    one large batch. Randomness (shuffling, dropout, new weights) comes from ``options.seed``: runs
    on the CPU are deterministic. ``depth``, when given, makes the dense tokens of each training
    step's cells instead of ``tokens`` (depth augmentation: some cells thinned to a lower depth).

    Returns
    -------
    The history, one dict per epoch; ``network`` holds the selected weights on return.
    """
    o = options
    weight = class_weights(labels, train_rows, network.config.n_classes, o.class_weight, device)
    n_trainable = set_trainable(network, o.trainable)
    network.to(device)
    plan = _plan(network, o, len(train_rows), device, dtype)
    e = _Epochs(
        plan,
        nn.CrossEntropyLoss(weight=weight, reduction="sum"),
        weight,
        np.random.default_rng(o.seed),
        torch.Generator().manual_seed(o.seed),
        detection_rank(tokens.csr[train_rows]) if o.mask_genes > 0 else None,
        torch.from_numpy(labels),
        depth,
    )
    logger.info(
        "Fine-tuning %d trainable parameters (%s) on %d cells, selecting on %d validation cells, %s on %s",
        n_trainable,
        o.trainable,
        len(train_rows),
        len(val_rows),
        str(dtype).replace("torch.", ""),
        device,
    )
    history: list[dict[str, float]] = []
    best_score, best_state, best_epoch, stale = (-math.inf, -math.inf), None, 0, 0
    with cpu_runtime(device, desc="finetune"):
        bar = tqdm(total=o.epochs, desc="finetune", unit="epoch", disable=not settings.progress)
        for epoch in range(1, o.epochs + 1):
            t0 = time.perf_counter()
            train_loss = _train_epoch(network, tokens, train_rows, o, e, epoch=epoch, device=device, dtype=dtype)
            record = {"stage": "finetune", "epoch": epoch, "train_loss": train_loss, "lr": plan.lr}
            if len(val_rows):
                val = evaluate(
                    network, tokens, labels, val_rows, batch_size=max(o.batch_size, 64), device=device, weight=weight
                )
                record.update({f"val_{k}": v for k, v in val.items()})
                # ties (a validation set that every epoch gets right) go to the lower validation loss
                score = (-val["loss"] if o.select_on == "loss" else val[o.select_on], -val["loss"])
            else:
                score = (float(epoch), 0.0)  # nothing to select on: the last epoch
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in network.state_dict().items()})
            else:
                stale += 1
            shown = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", f"val_{o.select_on}")
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in shown})
            bar.update(1)
            logger.debug("epoch %d: %s", epoch, record)
            if o.class_weight == "sampled" and epoch_sampling(o.class_weight, epoch, o.epochs) is None:
                stale = 0  # the first phase does not count: rare types are learnt in the balanced epochs after it
            if stale >= o.patience:
                logger.info("Early stop after epoch %d: no validation improvement for %d epochs", epoch, o.patience)
                break
    bar.close()
    _finish(network, history, best_state, best_epoch, o.select_on)
    return history


def _finish(
    network: ScBERTNetwork,
    history: list[dict[str, float]],
    best_state: dict[str, torch.Tensor] | None,
    best_epoch: int,
    select_on: str,
) -> None:
    """Warn when nothing was learnt, load the selected epoch's weights, mark it, and restore the trainable defaults."""
    if len(history) > 1 and history[-1]["train_loss"] > 0.95 * history[0]["train_loss"]:
        logger.warning(
            "The training loss barely fell (%.3f -> %.3f): the classifier did not learn. Try another lr, more "
            "epochs, or a wider classifier head; check history and the validation metrics before using it.",
            history[0]["train_loss"],
            history[-1]["train_loss"],
        )
    if best_state is not None:
        network.load_state_dict(best_state)
    for record in history:
        record["selected"] = record["epoch"] == best_epoch
    for p in network.parameters():  # back to the network's defaults
        p.requires_grad_(True)
    network.gene_emb.weight.requires_grad_(network.config.gene_emb_trainable)
    network.eval()
    logger.info("Selected epoch %d of %d on validation %s", best_epoch, len(history), select_on)


def options_dict(options: FinetuneOptions) -> dict:
    """The options as a plain dict (for provenance)."""
    return asdict(options)
