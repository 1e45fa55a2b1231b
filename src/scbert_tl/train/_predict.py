"""What the inference tools compute from a batch of tokens: network functions ``f(network, tokens) -> tensor``.

:func:`~scbert_tl.train.run_batches` runs one over token sources; the ``tl`` tools turn the arrays
into AnnData slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model._attention import attention_received

if TYPE_CHECKING:
    import torch

    from ..model import ScBERTNetwork
    from ..model._attention import Layers


def logits(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    """The classifier's logits (float32)."""
    return network(x).float()


def mean_encoding(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    """The mean final-layer vector of the panel genes (not the appended position)."""
    return network.encode(x)[:, :-1].float().mean(dim=1)


def classifier_hidden(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    """The classifier head's last hidden layer (its forward pass up to there; dropout is off in eval)."""
    head = network.classifier
    h = head.act(head.reduce(network.encode(x)).squeeze(-1))
    return head.act(head.fc2(head.act(head.fc1(h)))).float()


def panel_attention(network: ScBERTNetwork, x: torch.Tensor, *, layers: Layers) -> torch.Tensor:
    """The attention each panel gene receives (not the appended position), averaged over ``layers``."""
    return attention_received(network, x, layers=layers)[:, :-1]
