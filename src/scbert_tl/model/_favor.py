"""FAVOR+ (Choromanski et al., 2021): softmax attention through positive orthogonal random features."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ._config import KeyStabilizer

FEATURE_EPS = 1e-4


def orthogonal_random_matrix(n_rows: int, n_cols: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian orthogonal random features: blocks of orthonormal rows, each row scaled to a chi norm.

    Parameters
    ----------
    n_rows
        Number of random features.
    n_cols
        Head width.
    generator
        Source of randomness (``None`` uses torch's default generator).

    Returns
    -------
    A float32 ``(n_rows, n_cols)`` matrix.
    """
    blocks = []
    for _ in range(math.ceil(n_rows / n_cols)):
        unstructured = torch.randn(n_cols, n_cols, generator=generator)
        q, _ = torch.linalg.qr(unstructured, mode="reduced")
        blocks.append(q.T)
    matrix = torch.cat(blocks)[:n_rows]
    multiplier = torch.randn(n_rows, n_cols, generator=generator).norm(dim=1)
    return multiplier[:, None] * matrix


def softmax_features(
    x: torch.Tensor, projection: torch.Tensor, *, is_query: bool, key_stabilizer: KeyStabilizer = "cell"
) -> torch.Tensor:
    """Positive random features phi(x) approximating the softmax kernel, in float32.

    Parameters
    ----------
    x
        Queries or keys, ``(batch, heads, positions, dim_head)``.
    projection
        ``(n_features, dim_head)`` random projection.
    is_query
        Queries are stabilised per position; keys as ``key_stabilizer`` says.
    key_stabilizer
        ``"cell"``, ``"head"`` or ``"batch"`` (see :class:`~scbert_tl.model.ScBERTConfig`).

    Returns
    -------
    ``(batch, heads, positions, n_features)`` float32 features.
    """
    x = x.float()
    d = x.shape[-1]
    scale = d**-0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.matmul(x, (projection.float() * scale).T)
    diag = x.pow(2).sum(dim=-1, keepdim=True).mul_(scale * scale / 2)
    with torch.no_grad():
        if is_query:
            stab = dash.amax(dim=-1, keepdim=True)
        elif key_stabilizer == "cell":
            stab = dash.amax(dim=(1, 2, 3), keepdim=True)
        elif key_stabilizer == "head":
            stab = dash.amax(dim=(2, 3), keepdim=True)
        else:
            stab = dash.amax()
    if dash.requires_grad:
        return ratio * (torch.exp(dash - diag - stab) + FEATURE_EPS)
    # inference: reuse the one big buffer
    return dash.sub_(diag).sub_(stab).exp_().add_(FEATURE_EPS).mul_(ratio)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention ``D^-1 Q' (K'^T V)`` with ``D = diag(Q' K'^T 1)``.

    The normaliser rides along as an extra column of ones in ``v``, so numerator and denominator
    come out of the same two matrix products.
    """
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    v1 = torch.cat((v, ones), dim=-1)
    context = torch.matmul(k.transpose(-1, -2), v1)
    out = torch.matmul(q, context)
    return out[..., :-1] / out[..., -1:]


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ self-attention: fused q/k/v projection (no bias), output projection with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, n_features: int, key_stabilizer: KeyStabilizer) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.key_stabilizer = heads, dim_head, key_stabilizer
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.register_buffer("projection_matrix", orthogonal_random_matrix(n_features, dim_head))

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection (used during pretraining only)."""
        new = orthogonal_random_matrix(*self.projection_matrix.shape, generator=generator)
        self.projection_matrix.copy_(new)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split heads: three ``(batch, heads, positions, dim_head)`` views."""
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query features, key features and values for ``x`` (already normalised)."""
        q, k, v = self.qkv(x)
        qf = softmax_features(q, self.projection_matrix, is_query=True)
        kf = softmax_features(k, self.projection_matrix, is_query=False, key_stabilizer=self.key_stabilizer)
        return qf, kf, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all positions of each cell: ``(batch, positions, dim)`` in and out."""
        b, n, _ = x.shape
        qf, kf, v = self.features(x)
        out = linear_attention(qf, kf, v.float())
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else out)
