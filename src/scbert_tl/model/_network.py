"""The scBERT network: token + gene embeddings, a pre-LayerNorm Performer encoder, and its heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._favor import FavorAttention, _compiling, fused_linear

if TYPE_CHECKING:
    from ._config import ScBERTConfig


class FeedForward(nn.Module):
    """``dim -> dim * mult -> dim`` with GELU (fused into the first product on CPU when ``fused``)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.w2 = nn.Linear(dim * mult, dim)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two layers."""
        if self.fused and not _compiling():
            return fused_linear(self.w2, fused_linear(self.w1, x, gelu=True))
        return self.w2(self.act(self.w1(x)))


def _residual(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + y``, in place into ``y`` when that keeps the result's dtype (inference only)."""
    return y.add_(x) if y.dtype == torch.result_type(x, y) else x + y


class PerformerBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ff(norm(x))``."""

    def __init__(self, config: ScBERTConfig) -> None:
        super().__init__()
        c = config
        self.attn_norm = nn.LayerNorm(c.dim)
        self.attn = FavorAttention(c.dim, c.heads, c.dim_head, c.n_features, c.key_stabilizer)
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, c.ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One encoder block."""
        if torch.is_grad_enabled():
            x = x + self.attn(self.attn_norm(x))
            return x + self.ff(self.ff_norm(x))
        # inference: accumulate the residuals into the fresh block outputs
        x = _residual(self.attn(self.attn_norm(x)), x)
        return _residual(self.ff(self.ff_norm(x)), x)


class ClassifierHead(nn.Module):
    """The original scBERT classifier: a shared ``dim -> 1`` map per position, then an MLP over positions.

    The original writes the first map as ``Conv2d(1, 1, (1, dim))``; a ``Linear(dim, 1)`` is the same
    function (checkpoints are converted on load).
    """

    def __init__(self, seq_len: int, dim: int, hidden: tuple[int, int], n_classes: int, dropout: float) -> None:
        super().__init__()
        self.reduce = nn.Linear(dim, 1)
        with torch.no_grad():
            # start in the ReLU's linear range: with a small random bias most positions of a new head
            # are zeroed and training can stall at the class prior (seen on pbmc68k_reduced)
            self.reduce.bias.fill_(1.0)
        self.fc1 = nn.Linear(seq_len, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_classes)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, measured: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, positions, dim)`` encodings to ``(batch, n_classes)`` logits.

        ``measured``: ``(batch, positions)`` booleans, False at positions fed as ``[MASK]``. Those add
        nothing to the MLP, and the rest are scaled by the share of positions measured (as inverted
        dropout), so its input keeps its scale when genes are missing.
        """
        x = self.act(self.reduce(x).squeeze(-1))
        if measured is not None:
            x = x * measured / measured.float().mean(1, keepdim=True)
        x = self.dropout(self.act(self.fc1(x)))
        x = self.dropout(self.act(self.fc2(x)))
        return self.fc3(x)


class ScBERTNetwork(nn.Module):
    """The scBERT network (pure torch; no AnnData).

    Input is a ``(batch, n_genes)`` integer tensor of expression tokens in panel order (any integer
    dtype; int8 keeps host-to-device transfers small). The appended position (token 0, zero gene
    embedding) is added here, so every method sees ``n_genes + 1`` positions.

    Parameters
    ----------
    config
        Architecture; see :class:`ScBERTConfig`.
    """

    def __init__(self, config: ScBERTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.token_emb = nn.Embedding(c.num_tokens, c.dim)
        self.gene_emb = nn.Embedding(c.seq_len, c.dim)
        with torch.no_grad():
            if c.gene_emb_trainable:
                nn.init.normal_(self.gene_emb.weight, std=0.02)
            else:
                self.gene_emb.weight.zero_()
            self.gene_emb.weight[-1].zero_()
        self.gene_emb.weight.requires_grad_(c.gene_emb_trainable)
        self.layers = nn.ModuleList(PerformerBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.num_tokens) if c.lm_head else None
        self.classifier = (
            ClassifierHead(c.seq_len, c.dim, c.classifier_hidden, c.n_classes, c.classifier_dropout)
            if c.n_classes
            else None
        )
        self.gradient_checkpointing = False

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + gene embedding of ``(batch, n_genes)`` tokens, with the appended position."""
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.n_genes:
            raise ValueError(f"Expected tokens of shape (batch, {c.n_genes}), got {tuple(tokens.shape)}.")
        tokens = torch.nn.functional.pad(tokens.long(), (0, 1))
        return self.token_emb(tokens) + self.gene_emb.weight

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-layer encodings ``(batch, n_genes + 1, dim)`` after the final LayerNorm."""
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``(batch, n_classes)`` when the network has a classifier, else token logits."""
        x = self.encode(tokens)
        if self.classifier is not None:
            masked = tokens == self.config.mask_token
            # only batches with [MASK] inputs take the masked path: others keep the original numerics
            measured = torch.nn.functional.pad(~masked, (0, 1), value=True) if masked.any() else None
            return self.classifier(x, measured)
        if self.lm_head is None:
            raise RuntimeError("This network has neither a classifier nor a pretraining head; use encode().")
        return self.lm_head(x)

    def mlm_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Masked-expression logits ``(batch, n_genes + 1, num_tokens)`` from the pretraining head."""
        if self.lm_head is None:
            raise RuntimeError("This network has no pretraining head (lm_head).")
        return self.lm_head(self.encode(tokens))

    def add_classifier(
        self, n_classes: int, *, hidden: tuple[int, int] | None = None, dropout: float | None = None
    ) -> None:
        """Replace (or add) the classifier head with a freshly initialised one for ``n_classes``."""
        c = self.config
        c.n_classes = n_classes
        if hidden is not None:
            c.classifier_hidden = tuple(hidden)
        if dropout is not None:
            c.classifier_dropout = dropout
        device = self.token_emb.weight.device
        self.classifier = ClassifierHead(c.seq_len, c.dim, c.classifier_hidden, n_classes, c.classifier_dropout).to(
            device
        )

    @property
    def fused_kernels(self) -> bool:
        """Whether blocks use the fused FAVOR+ and (on CPU) oneDNN paths; ``False`` gives the plain reference path."""
        return all(layer.attn.fused and layer.ff.fused for layer in self.layers)

    @fused_kernels.setter
    def fused_kernels(self, enabled: bool) -> None:
        for layer in self.layers:
            layer.attn.fused = layer.ff.fused = bool(enabled)

    def set_key_stabilizer(self, mode: str) -> None:
        """Switch every attention block's key stabiliser (``"cell"``, ``"head"`` or ``"batch"``)."""
        if mode not in ("cell", "head", "batch"):
            raise ValueError(f"key_stabilizer must be 'cell', 'head' or 'batch', got {mode!r}.")
        self.config.key_stabilizer = mode
        for layer in self.layers:
            layer.attn.key_stabilizer = mode
