"""Architecture configuration of an scBERT network."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

KeyStabilizer = Literal["cell", "head", "batch"]


@dataclass
class ScBERTConfig:
    """Every size of an scBERT network; the defaults are the published full configuration.

    Parameters
    ----------
    n_genes
        Panel genes. The network sees ``n_genes + 1`` positions: the panel, then one appended
        position whose token is always 0 and whose gene embedding is zero.
    n_bins
        Expression bins; tokens ``0..n_bins`` are expression, ``n_bins + 1`` is ``[MASK]``.
    dim
        Width of every position vector (200 = gene2vec).
    depth
        Number of Performer blocks.
    heads
        Attention heads per block.
    dim_head
        Width of one head.
    n_features
        FAVOR+ random features per head; ``None`` gives ``int(dim_head * ln(dim_head))`` (266 for 64).
    ff_mult
        Feed-forward expansion (hidden width ``dim * ff_mult``).
    key_stabilizer
        Where the key feature map takes its max: ``"cell"`` (one value per cell over heads,
        positions and features: outputs do not depend on batch-mates, and equal the original at
        batch size 1), ``"head"`` (per cell and head, as the ``performer-pytorch`` package), or
        ``"batch"`` (over the whole batch, as the original scBERT code).
    gene_emb_trainable
        Whether the gene (position) embedding is trained. ``False`` for gene2vec embeddings.
    lm_head
        Whether the network carries the masked-expression (pretraining) head.
    n_classes
        Classes of the classifier head; 0 means no classifier head.
    classifier_hidden
        Hidden widths of the classifier head's two hidden layers (the original: 512, 128).
    classifier_dropout
        Dropout in the classifier head.
    """

    n_genes: int = 16906
    n_bins: int = 5
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    n_features: int | None = None
    ff_mult: int = 4
    key_stabilizer: KeyStabilizer = "cell"
    gene_emb_trainable: bool = False
    lm_head: bool = True
    n_classes: int = 0
    classifier_hidden: tuple[int, int] = (512, 128)
    classifier_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_features is None:
            self.n_features = int(self.dim_head * math.log(self.dim_head))
        self.classifier_hidden = tuple(int(h) for h in self.classifier_hidden)
        for name in ("n_genes", "n_bins", "dim", "depth", "heads", "dim_head", "n_features", "ff_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ScBERTConfig.{name} must be a positive integer, got {value!r}.")
        if self.key_stabilizer not in ("cell", "head", "batch"):
            raise ValueError(f"key_stabilizer must be 'cell', 'head' or 'batch', got {self.key_stabilizer!r}.")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be >= 0, got {self.n_classes}.")
        if len(self.classifier_hidden) != 2:
            raise ValueError(f"classifier_hidden must have two widths, got {self.classifier_hidden!r}.")

    @property
    def seq_len(self) -> int:
        """Positions seen by the network (the panel plus one appended position)."""
        return self.n_genes + 1

    @property
    def num_tokens(self) -> int:
        """Vocabulary size (``n_bins + 1`` expression tokens and ``[MASK]``)."""
        return self.n_bins + 2

    @property
    def mask_token(self) -> int:
        """The ``[MASK]`` token id."""
        return self.n_bins + 1

    def flops_per_cell(self) -> float:
        """Matrix-multiply FLOPs of one encoder forward pass for one cell (2 per multiply-add)."""
        n, d, inner, m = self.seq_len, self.dim, self.heads * self.dim_head, self.n_features
        qkv = 2 * n * d * 3 * inner
        features = 2 * 2 * n * inner * m
        contractions = 2 * 2 * n * self.heads * m * (self.dim_head + 1)
        out = 2 * n * inner * d
        ff = 2 * 2 * n * d * d * self.ff_mult
        return float(self.depth * (qkv + features + contractions + out + ff))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        d = asdict(self)
        d["classifier_hidden"] = list(self.classifier_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScBERTConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown scBERT config keys {sorted(unknown)}; known keys are {sorted(names)}.")
        return cls(**d)
