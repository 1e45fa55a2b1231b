r"""Attention received by each position, exactly and in linear time (pure torch).

scBERT explains a prediction by the attention each gene receives: the attention matrices are averaged
over heads and layers and each column is summed. A FAVOR+ attention matrix is row-normalised,

.. math::

    A = D^{-1} Q' K'^\top, \qquad D = \operatorname{diag}(Q' K'^\top \mathbf{1}),

with query and key features ``Q'`` and ``K'`` (``positions x features``). Its column sums need no
``positions x positions`` matrix:

.. math::

    \mathbf{1}^\top A = \bigl(K' \, (Q'^\top d^{-1})\bigr)^\top, \qquad d = Q' (K'^\top \mathbf{1}),

two matrix-vector products per head. :func:`attention_received` computes them while it runs the encoder
block by block (the blocks' own modules and weights; the attention output is computed from the same
features, so the features are made once for the output and the column sums together). Column sums of
a row-normalised ``n x n`` matrix add up to ``n``: a position receiving the average attention scores 1.

:func:`attention_matrices` builds the explicit matrices (small inputs only), for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch

from .._docs import doc_params
from ._favor import FEATURE_EPS, _add_contractions, _contractions_pay, fused_linear, onednn_available

if TYPE_CHECKING:
    from ._favor import FavorAttention
    from ._network import ScBERTNetwork

Layers = Literal["all"] | int | Sequence[int]

#: Elements of one chunk's ``(cells, heads, positions, features)`` block: cache-sized on CPU, bounded on CUDA.
CPU_CHUNK_ELEMENTS = 1_400_000
CUDA_CHUNK_ELEMENTS = 1 << 26
#: Key features of one batch are kept between the two passes over keys when they fit in this many
#: elements (float32), and recomputed otherwise.
CPU_KEEP_ELEMENTS = 1 << 27
CUDA_KEEP_ELEMENTS = 1 << 28
#: Head width (plus one) from which the query products run head by head through oneDNN on CPU.
BY_HEADS_MIN_WIDTH = 33
#: The explicit reference refuses sequences longer than this.
MAX_EXPLICIT_POSITIONS = 4096

_LOG2E = 1.0 / math.log(2.0)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def resolve_layers(layers: Layers, depth: int) -> list[int]:
    """Sorted, unique block indices from ``"all"``, an index or a list of indices (negative ones count from the end).

    Raises
    ------
    ValueError
        When the selection is empty or an index is out of range.
    """
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an index or a list of indices, got {layers!r}.")
        return list(range(depth))
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError("layers is empty; pass 'all' or at least one block index.")
    out = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers must hold integer block indices, got {i!r}.")
        if not -depth <= i < depth:
            raise ValueError(f"Block index {i} is out of range for a network of {depth} blocks.")
        out.add(i % depth)
    return sorted(out)


class _Features:
    """FAVOR+ features of one block in base 2 and without the ``m^-1/2`` factor (it cancels in ``A``).

    ``exp(a) = exp2(a log2 e)``: ``log2 e`` is folded into the projection and the ``|x|^2`` term, which
    leaves the stabilisers (maxima of the projections) the same and makes the exponential cheaper. On CPU
    the projection runs through oneDNN with the matrix packed once per block, where the model's own
    attention does the same (:func:`~scbert_tl.model._favor.onednn_available`).
    """

    def __init__(self, attn: FavorAttention) -> None:
        scale = attn.dim_head**-0.25
        matrix = attn.projection_matrix.float() * (scale * _LOG2E)
        self.n_features = matrix.shape[0]
        self.matrix_t = matrix.T.contiguous()
        self.diag_coef = scale * scale / 2 * _LOG2E
        self.packed = None
        if matrix.device.type == "cpu" and onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), None)

    def dash(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim_head)`` to the projections ``(..., n_features)``."""
        if self.packed is not None and x.dtype == torch.float32:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
            return out.view(*x.shape[:-1], self.n_features)
        return torch.matmul(x, self.matrix_t)

    def by_heads(self, context: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``e -> e @ context`` for ``(cells, heads, rows, features)`` ``e``, one ``context`` matrix per cell and head.

        With oneDNN and wide heads, each cell's and head's matrix is packed once and the products run head
        by head (about twice as fast as a batched product on CPU at head width 64; for narrow heads the
        many small calls cost more than they save).
        """
        if self.packed is None or context.shape[-1] < BY_HEADS_MIN_WIDTH:
            return partial(torch.matmul, other=context)
        ops = torch.ops.mkldnn
        b, h = context.shape[:2]
        packed = [
            ops._reorder_linear_weight(c.t().contiguous(), None) for c in context.reshape(b * h, *context.shape[2:])
        ]

        def product(e: torch.Tensor) -> torch.Tensor:
            y = torch.empty(*e.shape[:-1], context.shape[-1], device=e.device)
            for i in range(b * h):
                c, j = divmod(i, h)
                y[c, j] = ops._linear_pointwise(e[c, j], packed[i], None, "none", [], "")
            return y

        return product

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        """``|x|^2 s^2 / 2`` in the same units, ``(..., 1)``."""
        return x.square().sum(dim=-1, keepdim=True).mul_(self.diag_coef)


def _stabilizer_max(dash: torch.Tensor, mode: str) -> torch.Tensor:
    """The key stabiliser of a ``(cells, heads, positions, features)`` block, shaped to broadcast."""
    per_head = dash.amax(dim=(2, 3), keepdim=True)
    if mode == "head":
        return per_head
    if mode == "cell":
        return per_head.amax(dim=1, keepdim=True)
    return per_head.amax(dim=(0, 1), keepdim=True)  # "batch"


def _chunk_rows(cells: int, heads: int, n_features: int, n: int, device: torch.device) -> int:
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, min(n, budget // max(1, cells * heads * n_features)))


def _heads(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Positions ``r0:r1`` of a ``(cells, positions, heads, d)`` tensor as float32 ``(cells, heads, r1-r0, d)``."""
    return x[:, r0:r1].transpose(1, 2).float()


def _cell_groups(b: int, per_cell: int, mode: str, device: torch.device) -> list[slice]:
    """Cells attended together: as many as keep their key features within budget.

    All of them with the ``"batch"`` stabiliser, which spans the batch.
    """
    budget = CPU_KEEP_ELEMENTS if device.type == "cpu" else CUDA_KEEP_ELEMENTS
    size = b if mode == "batch" else max(1, min(b, budget // max(1, per_cell)))
    return [slice(i, min(b, i + size)) for i in range(0, b, size)]


def _favor_with_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feats: _Features,
    mode: str,
    out: torch.Tensor,
    colsum: torch.Tensor,
) -> None:
    """FAVOR+ with column sums, for one group of cells.

    Queries, keys and values are ``(cells, positions, heads, d)``; the attention output goes into ``out``
    (same shape, float32) and the attention matrices' column sums into ``colsum`` ``(cells, heads, positions)``.
    """
    b, n, h, d = q.shape
    m = feats.n_features
    dev = q.device
    rows = _chunk_rows(b, h, m, n, dev)
    keep = b * h * n * m <= (CPU_KEEP_ELEMENTS if dev.type == "cpu" else CUDA_KEEP_ELEMENTS)

    # keys: sum_j E_j [v_j, 1] with E_j = exp(k_j W - |k_j|^2/2 - stab), the stabiliser as a running maximum
    context = torch.zeros(b, h, m, d + 1, device=dev)
    onednn = _contractions_pay(feats.packed is not None, rows, m, d + 1)
    stab = None
    kept: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        kc = _heads(k, r0, r1)
        e = feats.dash(kc)
        block = _stabilizer_max(e, mode)
        if stab is None:
            stab = block
        elif bool((block > stab).any()):
            new = torch.maximum(stab, block)
            context.mul_(torch.exp2(stab - new))
            stab = new
        e.sub_(feats.diag(kc)).sub_(stab).exp2_()
        v1 = torch.cat((_heads(v, r0, r1), torch.ones(b, h, r1 - r0, 1, device=dev)), dim=-1)
        w = r1 - r0
        _add_contractions(context.view(b * h, m, d + 1), e.view(b * h, w, m), v1.view(b * h, w, d + 1), onednn)
        if keep:
            kept.append((e, stab))
    # the features are E + eps: the eps rank-one term goes into the (small) contraction
    v_sum = torch.cat((v.float().sum(dim=1), torch.full((b, h, 1), float(n), device=dev)), dim=-1)
    context.add_(v_sum.unsqueeze(2), alpha=FEATURE_EPS)  # its last column is K'^T 1

    # queries: the output D^-1 Q' (K'^T V) and s = Q'^T d^-1
    heads_product = feats.by_heads(context)
    s = torch.zeros(b, h, m, device=dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        qc = _heads(q, r0, r1)
        e = feats.dash(qc)
        e.sub_(e.amax(dim=-1, keepdim=True).add_(feats.diag(qc))).exp2_().add_(FEATURE_EPS)
        y = heads_product(e)  # (b, h, w, d + 1): numerators, then the denominators d_i
        inv = y[..., d:].reciprocal()
        out[:, r0:r1].copy_((y[..., :d] * inv).transpose(1, 2))
        s.add_(e.mul_(inv).sum(dim=2))  # Q'^T d^-1: a product and a sum beat a batched matrix-vector product

    # keys again: the column sums K' s (kept features rescaled to the final stabiliser, or recomputed)
    s_eps = s.sum(dim=2, keepdim=True).mul_(FEATURE_EPS)  # the eps term of K' s, (b, h, 1)
    s = s.unsqueeze(2)  # (b, h, 1, m)
    for i, r0 in enumerate(range(0, n, rows)):
        r1 = min(n, r0 + rows)
        if keep:
            e, at = kept[i]
            kept[i] = None  # free as we go
            cs = torch.linalg.vecdot(e, s).mul_(torch.exp2(at - stab).squeeze(-1))
        else:
            kc = _heads(k, r0, r1)
            e = feats.dash(kc).sub_(feats.diag(kc)).sub_(stab).exp2_()
            cs = torch.linalg.vecdot(e, s)
        colsum[:, :, r0:r1] = cs.add_(s_eps)


def attend_with_column_sums(attn: FavorAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAVOR+ attention block's output and the column sums of its attention matrices.

    Parameters
    ----------
    attn
        The block's attention module (its weights, projection and key stabiliser are used).
    x
        Normalised input ``(cells, positions, dim)``.

    Returns
    -------
    The block's output ``(cells, positions, dim)`` (as ``attn(x)``), and the float32 column sums
    ``(cells, heads, positions)`` of each head's row-normalised attention matrix.
    """
    b, n, _ = x.shape
    h, d = attn.heads, attn.dim_head
    qkv = fused_linear(attn.to_qkv, x).view(b, n, 3, h, d)
    feats = _Features(attn)
    out = torch.empty(b, n, h, d, device=x.device)
    colsum = torch.empty(b, h, n, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for g in _cell_groups(b, h * n * feats.n_features, attn.key_stabilizer, x.device):
            q, k, v = qkv[g].unbind(2)
            _favor_with_column_sums(q, k, v, feats, attn.key_stabilizer, out[g], colsum[g])
    out = out.view(b, n, h * d)
    if not _autocast_enabled(x.device.type):
        out = out.to(x.dtype)
    return fused_linear(attn.to_out, out), colsum


def _block_column_sums(network: ScBERTNetwork, tokens: torch.Tensor, selected: list[int]) -> Iterator[torch.Tensor]:
    """Run the encoder as ``encode`` does, up to the last selected block; yield each selected block's column sums."""
    x = network.embed_tokens(tokens)
    for i, layer in enumerate(network.layers[: selected[-1] + 1]):
        if i not in selected:
            x = layer(x)
            continue
        y, colsum = attend_with_column_sums(layer.attn, layer.attn_norm(x))
        yield colsum
        if i < selected[-1]:
            x = x + y
            x = x + layer.ff(layer.ff_norm(x))


#: The inputs of the attention read-outs, as numpydoc entries (see :func:`scbert_tl._docs.doc_params`).
_INPUTS_DOC = """\
network
        The network.
    tokens
        ``(cells, n_genes)`` expression tokens in panel order.
    layers
        ``"all"``, a block index or a list of block indices (negative ones count from the end)."""


@torch.inference_mode()
@doc_params(inputs=_INPUTS_DOC)
def column_sums(network: ScBERTNetwork, tokens: torch.Tensor, *, layers: Layers = "all") -> torch.Tensor:
    """Column sums of every head's row-normalised FAVOR+ attention matrix, in linear time.

    The encoder runs block by block as :meth:`~scbert_tl.model.ScBERTNetwork.encode` does (each block's
    own norms, projections and feed-forward), stopping after the last selected block.

    Parameters
    ----------
    {inputs}

    Returns
    -------
    Float32 ``(cells, len(layers), heads, n_genes + 1)``: for each selected block (in increasing order)
    and head, the attention each position receives (the appended position last). Each row sums to
    ``n_genes + 1``.
    """
    selected = resolve_layers(layers, len(network.layers))
    return torch.stack(list(_block_column_sums(network, tokens, selected)), dim=1)


@torch.inference_mode()
@doc_params(inputs=_INPUTS_DOC)
def attention_received(network: ScBERTNetwork, tokens: torch.Tensor, *, layers: Layers = "all") -> torch.Tensor:
    """The attention each position receives, averaged over heads and the selected blocks (scBERT's gene importance).

    Parameters
    ----------
    {inputs}

    Returns
    -------
    Float32 ``(cells, n_genes + 1)``: column sums of the attention matrices (see :func:`column_sums`),
    averaged over heads and blocks; the appended position is last. Each row sums to ``n_genes + 1``,
    so 1 is the attention an average position receives.
    """
    selected = resolve_layers(layers, len(network.layers))
    total = None
    for colsum in _block_column_sums(network, tokens, selected):
        part = colsum.sum(dim=1)
        total = part if total is None else total.add_(part)
    return total.div_(len(selected) * network.config.heads)


@torch.inference_mode()
@doc_params(inputs=_INPUTS_DOC)
def attention_matrices(network: ScBERTNetwork, tokens: torch.Tensor, *, layers: Layers = "all") -> torch.Tensor:
    """The explicit row-normalised FAVOR+ attention matrices (reference; small inputs only: at most 4,096 positions).

    Built from each block's :meth:`~scbert_tl.model.FavorAttention.features` as ``D^-1 Q' K'^T``; the
    encoder advances with the blocks' own forward passes.

    Parameters
    ----------
    {inputs}

    Returns
    -------
    Float32 ``(cells, len(layers), heads, positions, positions)``; rows sum to 1.
    """
    n = network.config.seq_len
    if n > MAX_EXPLICIT_POSITIONS:
        raise ValueError(
            f"attention_matrices builds positions x positions matrices; {n} positions is too many "
            f"(at most {MAX_EXPLICIT_POSITIONS}). Use column_sums for long sequences."
        )
    selected = resolve_layers(layers, len(network.layers))
    out = []
    x = network.embed_tokens(tokens)
    for i, layer in enumerate(network.layers[: selected[-1] + 1]):
        if i in selected:
            with torch.autocast(x.device.type, enabled=False):
                qf, kf, _ = layer.attn.features(layer.attn_norm(x).float())
                a = torch.matmul(qf, kf.transpose(-1, -2))
                out.append(a / a.sum(dim=-1, keepdim=True))
        x = layer(x)
    return torch.stack(out, dim=1)
