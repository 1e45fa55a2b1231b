"""FAVOR+ (Choromanski et al., 2021): softmax attention through positive orthogonal random features.

Two implementations of the same function live here.

* The plain one, :func:`softmax_features` and :func:`linear_attention`: a direct transcription of the
  formulas, kept as the readable reference (and for code that wants the feature matrices themselves).
* The fused one, :func:`favor_attention`, used by :class:`FavorAttention`. It walks the positions in
  chunks small enough to stay in cache and never holds a whole cell's ``(positions x features)``
  matrices. Three identities make that exact (up to float rounding):

  - the ``m^-1/2`` factor of the features cancels between numerator and denominator, so it is dropped;
  - the ``+ eps`` of the features is a rank-one term, so it is added to the two (small) contractions
    instead of to the two (large) feature matrices;
  - the key stabiliser is a running maximum: when a chunk raises it, the partial key context is
    rescaled by ``exp(old - new)``.

  Exponentials are taken as ``exp2`` with ``log2 e`` folded into the projection (on CPU about three
  times faster than ``exp``, and as accurate). Its backward pass recomputes the features chunk by chunk instead of storing them, so training keeps
  ``O(positions x head width)`` per block rather than ``O(positions x features)``; where a whole cell is one
  chunk and the features of the batch are small (the compact configuration), the forward pass keeps them
  instead and the backward pass reuses them (the same values, so the same gradients, in less time).

On CPU in float32, the matrix products with a fixed right-hand side run through oneDNN (PyTorch's
``mkldnn`` operators with a pre-packed weight) when it is available and agrees with
``torch.nn.functional.linear``; where MKL does not use AVX-512 (AMD EPYC, for one) this is about twice
as fast as the path ``torch.matmul`` takes. ``scbert.settings.onednn = False`` (or the environment
variable ``SCBERT_ONEDNN=0``) turns it off.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .._settings import settings

if TYPE_CHECKING:
    from ._config import KeyStabilizer

FEATURE_EPS = 1e-4

#: Elements of one chunk's ``(cells, heads, positions, features)`` block in the fused path. On CPU this keeps
#: a chunk (about 5 MB) in the last-level cache; on CUDA it bounds the working memory of one block.
CPU_CHUNK_ELEMENTS = 1_400_000
CUDA_CHUNK_ELEMENTS = 1 << 28
#: Whether the contractions with a fixed right-hand side use oneDNN per (cell, head) on CPU rather than one
#: batched MKL product; only when one such product is at least this many FLOPs (packing costs ~0.3 ms).
ONEDNN_QUERY_PRODUCT = True
ONEDNN_HEAD_PRODUCT_MIN_FLOPS = 1e8
#: Whether the feature contractions ``sum_j E_j^T x_j`` (key context, and its gradient) use oneDNN per
#: (cell, head) on CPU rather than MKL's batched product; only when one such product is at least this
#: many FLOPs (no packing: the features are passed as a strided weight). About 1.7x MKL at the full
#: configuration; no gain at the compact one's small products.
ONEDNN_CONTRACTION_MIN_FLOPS = 1e7
#: Training keeps a block's query and key features (and its head-major queries and keys) for the backward
#: pass instead of recomputing them when every cell is one chunk and they take at most this many bytes
#: (about 61 MB for a batch of 32 cells of the compact configuration; never at the full one).
KEEP_FEATURES_BYTES = 256 << 20


# oneDNN linear (CPU, float32) ------------------------------------------------------------------------------------

_ONEDNN: bool | None = None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def onednn_available() -> bool:
    """Whether float32 CPU products may use oneDNN: ``settings.onednn``, and probed once: present and numerically right."""
    global _ONEDNN
    if not settings.onednn:
        return False
    if _ONEDNN is None:
        _ONEDNN = _probe_onednn()
    return _ONEDNN


def _probe_onednn() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 3, generator=g)
        w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
        with torch.no_grad():
            y = _onednn_linear(x, w, b)
            y_gelu = _onednn_linear(x, w, b, gelu=True)
            y_strided = _onednn_linear(x.transpose(0, 1), w, None)
            # an unpacked, transposed weight (the feature contractions pass one)
            y_plain = torch.ops.mkldnn._linear_pointwise(x[0].t(), x[1].t(), None, "none", [], "")
        expected = F.linear(x, w, b)
        return (
            torch.allclose(y, expected, atol=1e-5)
            and torch.allclose(y_gelu, F.gelu(expected), atol=1e-5)
            and torch.allclose(y_strided, F.linear(x.transpose(0, 1), w), atol=1e-5)
            and torch.allclose(y_plain, x[0].t() @ x[1], atol=1e-5)
        )
    except Exception:  # noqa: BLE001 - any failure means "do not use it"
        return False


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False):
    """``F.linear`` (optionally followed by exact GELU) through oneDNN; packing the weight costs well under 1 ms."""
    ops = torch.ops.mkldnn
    packed = ops._reorder_linear_weight(weight, None)
    if gelu:
        return ops._linear_pointwise(x, packed, bias, "gelu", [], "none")
    return ops._linear_pointwise(x, packed, bias, "none", [], "")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not _compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not _autocast_on("cpu")
        and onednn_available()
    )


def _onednn_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad^T x`` for ``grad (rows, out)`` and ``x (rows, in)`` through oneDNN, the wider one as an unpacked weight.

    These long, thin products run at about 1.3-2x MKL's AVX2 path on AVX-512 CPUs where MKL does not use
    AVX-512 (packing a weight of a million rows would cost more than it saves).
    """
    lp = torch.ops.mkldnn._linear_pointwise
    if grad.shape[1] >= x.shape[1]:
        return lp(x.t(), grad.t(), None, "none", [], "").t().contiguous()
    return lp(grad.t(), x.t(), None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """Linear layer whose forward, input gradient and weight gradient run through oneDNN (CPU, float32)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = _onednn_linear(grad, weight.t().contiguous(), None)
            flat = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = _onednn_weight_grad(flat, x.reshape(-1, x.shape[-1]))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def fused_linear(layer: nn.Linear, x: torch.Tensor, *, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then exact GELU when ``gelu``), through oneDNN on CPU in float32 where available."""
    if _use_onednn(x, layer.weight):
        if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
            y = _OneDNNLinear.apply(x, layer.weight, layer.bias)
            return F.gelu(y) if gelu else y
        return _onednn_linear(x, layer.weight, layer.bias, gelu=gelu)
    y = layer(x)
    return F.gelu(y) if gelu else y


# plain FAVOR+ ------------------------------------------------------------------------------------------------------


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
    with torch.autocast(x.device.type, enabled=False):  # the exponent needs float32 products
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

    ``q`` and ``k`` are features ``(..., positions, n_features)``, ``v`` is ``(..., positions, dim_head)``.
    The normaliser uses the column sums of ``k`` directly, so nothing of the size of ``v`` is copied.
    """
    context = torch.matmul(k.transpose(-1, -2), v)
    denominator = torch.matmul(q, k.sum(dim=-2).unsqueeze(-1))
    return torch.matmul(q, context) / denominator


# fused FAVOR+ ------------------------------------------------------------------------------------------------------


LOG2E = 1.0 / math.log(2.0)


class _Projector:
    """The feature projection of one attention block, in base 2.

    ``exp2`` is about three times faster than ``exp`` on CPU and as accurate, so the fused path computes
    ``exp(a) = exp2(a log2 e)`` with ``log2 e`` folded into the projection and the ``|x|^2`` coefficient:
    ``__call__`` gives ``(x . s W) log2 e`` and ``diag`` gives ``|x|^2 s^2 / 2 log2 e``; maxima taken in
    these units are the same stabilisers. ``transposed`` gives ``g @ (s W)`` for the backward pass.
    oneDNN on CPU.
    """

    def __init__(self, projection: torch.Tensor, dim_head: int) -> None:
        scale = dim_head**-0.25
        projection = projection.float()
        self.forward_matrix = projection * (scale * LOG2E)
        self.backward_matrix = projection * scale
        self.diag_coef = scale * scale / 2 * LOG2E
        self.grad_coef = scale * scale
        self.onednn = projection.device.type == "cpu" and not _compiling() and onednn_available()
        self._packed: dict[str, torch.Tensor] = {}

    def _onednn(self, x: torch.Tensor, name: str, matrix: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(name)
        if packed is None:
            packed = self._packed[name] = torch.ops.mkldnn._reorder_linear_weight(matrix.contiguous(), None)
        flat = torch.ops.mkldnn._linear_pointwise(x.view(-1, x.shape[-1]), packed, None, "none", [], "")
        return flat.view(*x.shape[:-1], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim_head)`` to ``(..., n_features)``, in base-2 exponent units."""
        if self.onednn:
            return self._onednn(x, "forward", self.forward_matrix)
        return torch.matmul(x, self.forward_matrix.T)

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        """``|x|^2 s^2 / 2`` in base-2 exponent units, ``(..., 1)``."""
        return x.square().sum(dim=-1, keepdim=True).mul_(self.diag_coef)

    def transposed(self, g: torch.Tensor) -> torch.Tensor:
        """``(..., n_features)`` to ``(..., dim_head)``: ``g @ (s W)``."""
        if self.onednn:
            return self._onednn(g, "backward", self.backward_matrix.t())
        return torch.matmul(g, self.backward_matrix)

    def input_grad(self, x: torch.Tensor, grad_e: torch.Tensor) -> torch.Tensor:
        """Gradient reaching ``x`` through ``exp(x . s W - |x|^2 s^2 / 2 - stab)``, given ``grad_e = dE o E``."""
        gx = self.transposed(grad_e)
        return gx.sub_(x * grad_e.sum(dim=-1, keepdim=True).mul_(self.grad_coef))


def _add_contractions(acc: torch.Tensor, e: torch.Tensor, x: torch.Tensor, onednn: bool) -> None:
    """``acc += e^T x`` per (cell, head): ``acc (cells x heads, m, c)``, features ``e (cells x heads, w, m)``, ``x (.., w, c)``.

    With ``onednn`` each product runs as ``x^T e`` through oneDNN with ``e^T`` as an (unpacked, strided)
    weight, then is added transposed.
    """
    if not onednn:
        acc.baddbmm_(e.transpose(1, 2), x)
        return
    lp = torch.ops.mkldnn._linear_pointwise
    for acc_j, e_j, x_j in zip(acc, e, x, strict=True):
        acc_j.add_(lp(x_j.t(), e_j.t(), None, "none", [], "").t())


def _contractions_pay(onednn: bool, rows: int, m: int, c: int) -> bool:
    return onednn and 2.0 * rows * m * c >= ONEDNN_CONTRACTION_MIN_FLOPS


def _head_products_pay(rows: int, k: int, n: int) -> bool:
    return ONEDNN_QUERY_PRODUCT and 2.0 * rows * k * n >= ONEDNN_HEAD_PRODUCT_MIN_FLOPS


class _HeadProducts:
    """``x_j @ B_j (+ bias_j)`` for every (cell, head) ``j``, with right-hand sides fixed for a whole pass.

    On CPU with oneDNN each ``B_j`` is packed once and the products run one per head (two to three
    times MKL's batched product at these shapes); otherwise one batched product.
    """

    def __init__(self, rhs: torch.Tensor, bias: torch.Tensor | None, onednn: bool, rows: int) -> None:
        self.rhs, self.bias = rhs, bias
        self.onednn = onednn and _head_products_pay(rows, rhs.shape[1], rhs.shape[2])
        if self.onednn:
            pack = torch.ops.mkldnn._reorder_linear_weight
            self.packed = [pack(r.t().contiguous(), None) for r in rhs]
            self.biases = [None] * len(self.packed) if bias is None else list(bias[:, 0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(cells x heads, w, K)`` to ``(cells x heads, w, N)``."""
        if self.onednn:
            lp = torch.ops.mkldnn._linear_pointwise
            return torch.stack(
                [lp(x_j, w_j, b_j, "none", [], "") for x_j, w_j, b_j in zip(x, self.packed, self.biases, strict=True)]
            )
        if self.bias is None:
            return torch.bmm(x, self.rhs)
        return torch.baddbmm(self.bias, x, self.rhs)


def _chunk_rows(cells: int, heads: int, n_features: int, n: int, device: torch.device) -> int:
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, min(n, budget // max(1, cells * heads * n_features)))


def _cell_groups(b: int, h: int, m: int, n: int, device: torch.device) -> tuple[list[slice], int]:
    """Cells processed together, and the positions of one chunk.

    On CPU a chunk has the rows one cell would have within the budget, whatever the batch, so a cell's
    chunking (and so its rounding) does not depend on its batch-mates; as many cells go together as fit
    the budget with those rows: one at the full configuration, several for small models, whose per-cell
    products are too small to run well one by one. On CUDA the whole batch goes at once.
    """
    if device.type == "cpu":
        rows = _chunk_rows(1, h, m, n, device)
        size = max(1, CPU_CHUNK_ELEMENTS // (h * m * rows))
        return [slice(i, min(b, i + size)) for i in range(0, b, size)], rows
    return [slice(0, b)], _chunk_rows(b, h, m, n, device)


def _head_major(x: torch.Tensor, r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
    """Positions ``r0:r1`` of ``(cells, positions, heads, d)`` as a contiguous float32 ``(cells, heads, r1-r0, d)``."""
    b, _, h, d = x.shape
    out = buffer[: b * h * (r1 - r0) * d].view(b, h, r1 - r0, d)
    out.copy_(x[:, r0:r1].transpose(1, 2))
    return out


def _with_ones(v: torch.Tensor, r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
    """Positions ``r0:r1`` of values ``(cells, positions, heads, d)`` as float32 ``(cells, heads, r1-r0, d+1)``, ones last."""
    b, _, h, d = v.shape
    out = buffer[: b * h * (r1 - r0) * (d + 1)].view(b, h, r1 - r0, d + 1)
    out[..., :d].copy_(v[:, r0:r1].transpose(1, 2))
    out[..., d].fill_(1.0)
    return out


def _reduce_stabilizer(block_max: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-(cell, head) maxima ``(cells, heads, 1, 1)`` reduced to the stabiliser's own shape."""
    if mode == "head":
        return block_max
    if mode == "cell":
        return block_max.amax(dim=1, keepdim=True)
    return block_max.amax(dim=(0, 1), keepdim=True)


def _query_chunk(qc: torch.Tensor, proj: _Projector) -> torch.Tensor:
    """Query features without the ``+ eps`` and the ``m^-1/2`` factor: ``exp(w.q - |q|^2 s^2/2 - max)``."""
    e = proj(qc)
    stab = e.amax(dim=-1, keepdim=True).add_(proj.diag(qc))
    return e.sub_(stab).exp2_()


def _key_pass(k, v, proj: _Projector, mode: str, rows: int, kept: dict | None = None):
    """Key context ``sum_j E_j [v_j, 1]`` of the cells of ``k``, and ``sum_j [v_j, 1]``.

    ``E_j = exp(w.k_j - |k_j|^2 s^2/2 - stab)`` with the stabiliser taken as a running maximum: the
    partial sum is rescaled whenever a chunk raises it. With ``kept`` (only when the cells are one chunk)
    the head-major keys and their features are stored there for the backward pass.
    """
    b, n, h, d = k.shape
    m = proj.forward_matrix.shape[0]
    dev = k.device
    buf_k = torch.empty(b * h * rows * d, device=dev)
    buf_v = torch.empty(b * h * rows * (d + 1), device=dev)
    context = torch.zeros(b * h, m, d + 1, device=dev)
    v_sum = torch.zeros(b, h, 1, d + 1, device=dev)
    onednn = _contractions_pay(proj.onednn, rows, m, d + 1)
    stab = None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = r1 - r0
        kc = _head_major(k, r0, r1, buf_k)
        e, diag = proj(kc), proj.diag(kc)
        block_max = _reduce_stabilizer(e.amax(dim=(2, 3), keepdim=True), mode)
        if stab is None:
            stab = block_max
        else:
            new = torch.maximum(stab, block_max)
            context.view(b, h, m, d + 1).mul_(torch.exp2(stab - new))
            stab = new
        e.sub_(diag.add_(stab)).exp2_()
        if kept is not None:
            kept["k"], kept["e_k"] = kc, e
        v1 = _with_ones(v, r0, r1, buf_v)
        _add_contractions(context, e.view(b * h, w, m), v1.view(b * h, w, d + 1), onednn)
        v_sum += v1.sum(dim=2, keepdim=True)
    return context.view(b, h, m, d + 1), stab, v_sum


def _query_pass(q, proj: _Projector, context, out, rows: int, den=None, kept: dict | None = None) -> None:
    """``out_i = (E_i + eps) [C, z]`` split as ``C-part / z-part``, written into ``out`` (and ``den``).

    With ``kept`` (only when the cells are one chunk) the head-major queries and their features are stored there.
    """
    b, n, h, d = q.shape
    m = proj.forward_matrix.shape[0]
    buf = torch.empty(b * h * rows * d, device=q.device)
    ctx_bh = context.reshape(b * h, m, d + 1)
    q_bias = context.sum(dim=2, keepdim=True).mul_(FEATURE_EPS).view(b * h, 1, d + 1)
    onednn = proj.onednn and _head_products_pay(n, m, d + 1)
    if onednn:  # one packed (d+1) x m product per cell and head: about twice MKL's batched product here
        ops = torch.ops.mkldnn
        packed = [ops._reorder_linear_weight(c.t().contiguous(), None) for c in ctx_bh]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = r1 - r0
        qc = _head_major(q, r0, r1, buf)
        e = _query_chunk(qc, proj)
        if kept is not None:
            kept["q"], kept["e_q"] = qc, e
        if onednn:
            for j, (e_j, w_j, b_j) in enumerate(zip(e.view(b * h, w, m), packed, q_bias[:, 0], strict=True)):
                res = ops._linear_pointwise(e_j, w_j, b_j, "none", [], "")
                torch.div(res[:, :d], res[:, d:], out=out[j // h, r0:r1, j % h])
                if den is not None:
                    den[j // h, j % h, r0:r1].copy_(res[:, d:])
            continue
        res = torch.baddbmm(q_bias, e.view(b * h, w, m), ctx_bh).view(b, h, w, d + 1)
        torch.div(res[..., :d], res[..., d:], out=out[:, r0:r1].transpose(1, 2))
        if den is not None:
            den[:, :, r0:r1].copy_(res[..., d:])


def _keeps_features(b: int, n: int, h: int, d: int, m: int, rows: int, rescaled: bool) -> bool:
    """Whether the forward pass keeps the features for the backward pass (see :data:`KEEP_FEATURES_BYTES`).

    Only where they equal what the backward pass would compute: every cell one chunk (no running
    maximum) and no rescaling to a batch-wide stabiliser afterwards.
    """
    return rows >= n and not rescaled and 4 * b * h * n * 2 * (m + d) <= KEEP_FEATURES_BYTES


def _favor_forward(q, k, v, projection, key_stabilizer, *, keep_denominator=False, keep_features=False):
    """Fused FAVOR+ forward: ``out (cells, positions, heads, d)`` float32, and what the backward pass needs.

    With ``keep_features`` (training) the last item is a list with, per group of cells, a dict of the
    head-major queries and keys and their features when :func:`_keeps_features` allows it, else ``None``.
    """
    b, n, h, d = q.shape
    dev = q.device
    proj = _Projector(projection, d)
    m = proj.forward_matrix.shape[0]
    groups, rows = _cell_groups(b, h, m, n, dev)
    # with several groups, a batch-wide stabiliser is taken per cell first, then the partial sums are
    # brought to the batch maximum
    mode = "cell" if key_stabilizer == "batch" and len(groups) > 1 else key_stabilizer
    keep = keep_features and _keeps_features(b, n, h, d, m, rows, mode != key_stabilizer)
    kept = [{} if keep else None for _ in groups]
    parts = [_key_pass(k[g], v[g], proj, mode, rows, kept[i]) for i, g in enumerate(groups)]
    context = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    stab = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    v_sum = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    if mode != key_stabilizer:
        new = stab.amax(dim=(0, 1), keepdim=True)
        context.mul_(torch.exp2(stab - new))
        stab = new
    context.add_(v_sum, alpha=FEATURE_EPS)  # the keys' + eps
    out = torch.empty(b, n, h, d, device=dev)
    den = torch.empty(b, h, n, 1, device=dev) if keep_denominator else None
    for i, g in enumerate(groups):
        _query_pass(q[g], proj, context[g], out[g], rows, None if den is None else den[g], kept[i])
    return out, context, stab, den, kept


def _favor_backward(grad_out, q, k, v, projection, out, den, context, stab, grad_q, grad_k, grad_v, kept=None):
    """Gradients of the fused forward into ``grad_q``, ``grad_k``, ``grad_v`` (features recomputed chunk by chunk).

    With ``out = num / den``, ``num = Q' C`` and ``den = Q' z`` (``[C, z]`` the key context): the
    gradient of ``[num, den]`` is ``g1 = [g / den, -(g . out) / den]``; then ``dQ' = g1 [C, z]^T``,
    ``d[C, z] = Q'^T g1``, ``dK' = [v, 1] d[C, z]^T``, ``dv = K' dC``, and through
    ``phi = exp(w.x - |x|^2 s^2 / 2 - stab) + eps`` (stabilisers held constant):
    ``dx = s (dE o E) W - rowsum(dE o E) s^2 x``. ``kept``: what the forward pass kept per group of cells.
    """
    b, n, h, d = q.shape
    proj = _Projector(projection, d)
    batch_stab = stab.shape[0] == 1 and b > 1
    groups, rows = _cell_groups(b, h, proj.forward_matrix.shape[0], n, q.device)
    for i, g in enumerate(groups):
        _backward_cells(
            grad_out[g], q[g], k[g], v[g], proj, out[g], den[g], context[g], stab if batch_stab else stab[g],
            grad_q[g], grad_k[g], grad_v[g], rows, kept[i] if kept else None,
        )  # fmt: skip


def _chunk_features(kept: dict | None, name: str, x, r0: int, r1: int, buffer, features):
    """Head-major positions ``r0:r1`` of ``x`` and their features: those the forward pass kept, else ``features(chunk)``."""
    if kept:
        return kept[name], kept["e_" + name]
    chunk = _head_major(x, r0, r1, buffer)
    return chunk, features(chunk)


def _backward_cells(grad_out, q, k, v, proj, out, den, context, stab, grad_q, grad_k, grad_v, rows, kept=None):
    b, n, h, d = q.shape
    m = proj.forward_matrix.shape[0]
    dev = q.device
    buf_in = torch.empty(b * h * rows * d, device=dev)
    buf_g = torch.empty(b * h * rows * (d + 1), device=dev)
    ctx_bh = context.reshape(b * h, m, d + 1)
    grad_e_of = _HeadProducts(ctx_bh.transpose(1, 2), None, proj.onednn, n)

    grad_context = torch.zeros(b * h, m, d + 1, device=dev)
    g_sum = torch.zeros(b, h, 1, d + 1, device=dev)
    onednn = _contractions_pay(proj.onednn, rows, m, d + 1)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = r1 - r0
        qc, e = _chunk_features(kept, "q", q, r0, r1, buf_in, lambda c: _query_chunk(c, proj))
        g1 = buf_g[: b * h * w * (d + 1)].view(b, h, w, d + 1)
        torch.div(grad_out[:, r0:r1].transpose(1, 2), den[:, :, r0:r1], out=g1[..., :d])
        torch.linalg.vecdot(g1[..., :d], out[:, r0:r1].transpose(1, 2), out=g1[..., d]).neg_()
        g1_bh = g1.view(b * h, w, d + 1)
        _add_contractions(grad_context, e.view(b * h, w, m), g1_bh, onednn)
        g_sum += g1.sum(dim=2, keepdim=True)
        grad_e = grad_e_of(g1_bh).view(b, h, w, m).mul_(e)
        grad_q[:, r0:r1].copy_(proj.input_grad(qc, grad_e).transpose(1, 2))
    grad_context = grad_context.view(b, h, m, d + 1).add_(g_sum, alpha=FEATURE_EPS)

    gctx_bh = grad_context.view(b * h, m, d + 1)
    v_bias = grad_context[..., :d].sum(dim=2, keepdim=True).mul_(FEATURE_EPS).view(b * h, 1, d)
    grad_v_of = _HeadProducts(gctx_bh[..., :d], v_bias, proj.onednn, n)
    grad_e_of = _HeadProducts(gctx_bh.transpose(1, 2), None, proj.onednn, n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = r1 - r0
        kc, e = _chunk_features(kept, "k", k, r0, r1, buf_in, lambda c: proj(c).sub_(proj.diag(c).add_(stab)).exp2_())
        e_bh = e.view(b * h, w, m)
        gv = grad_v_of(e_bh)
        grad_v[:, r0:r1].copy_(gv.view(b, h, w, d).transpose(1, 2))
        v1 = _with_ones(v, r0, r1, buf_g)
        grad_e = grad_e_of(v1.view(b * h, w, d + 1)).view(b, h, w, m).mul_(e)
        grad_k[:, r0:r1].copy_(proj.input_grad(kc, grad_e).transpose(1, 2))


class _FusedFavor(torch.autograd.Function):
    """Fused FAVOR+ over a packed ``(cells, positions, 3, heads, d)`` q/k/v tensor (one gradient tensor, no stacking)."""

    @staticmethod
    def forward(ctx, qkv, projection, key_stabilizer):  # noqa: D102
        q, k, v = qkv.unbind(2)
        out, context, stab, den, ctx.kept = _favor_forward(
            q, k, v, projection, key_stabilizer, keep_denominator=True, keep_features=True
        )
        ctx.save_for_backward(qkv, projection, out, den, context, stab)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        qkv, projection, out, den, context, stab = ctx.saved_tensors
        grad = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        with torch.autocast(qkv.device.type, enabled=False):
            _favor_backward(
                grad_out.float(), *qkv.unbind(2), projection, out, den, context, stab, *grad.unbind(2), ctx.kept
            )
        ctx.kept = None
        return grad, None, None


def _attend(qkv: torch.Tensor, projection: torch.Tensor, key_stabilizer: KeyStabilizer) -> torch.Tensor:
    """Fused FAVOR+ of a packed ``(cells, positions, 3, heads, d)`` q/k/v tensor."""
    with torch.autocast(qkv.device.type, enabled=False):
        if torch.is_grad_enabled() and qkv.requires_grad:
            return _FusedFavor.apply(qkv, projection, key_stabilizer)
        with torch.no_grad():
            return _favor_forward(*qkv.unbind(2), projection, key_stabilizer)[0]


def favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, key_stabilizer: KeyStabilizer = "cell"
) -> torch.Tensor:
    """FAVOR+ attention of queries, keys and values ``(cells, positions, heads, dim_head)`` (any strides).

    Equals ``linear_attention(softmax_features(q), softmax_features(k), v)`` (heads-major there), computed
    in float32 by chunks of positions without materialising the feature matrices; differentiable with
    respect to ``q``, ``k`` and ``v``.

    Returns
    -------
    ``(cells, positions, heads, dim_head)`` float32.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _attend(torch.stack((q, k, v), dim=2), projection, key_stabilizer)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        return _favor_forward(q, k, v, projection, key_stabilizer)[0]


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ self-attention: fused q/k/v projection (no bias), output projection with bias.

    ``fused`` (default ``True``) selects ``favor_attention``; ``False`` the plain
    ``softmax_features`` + ``linear_attention`` path (same function, more memory). Under
    ``torch.compile`` the plain path is traced, whatever ``fused`` says.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, n_features: int, key_stabilizer: KeyStabilizer) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.key_stabilizer = heads, dim_head, key_stabilizer
        self.fused = True
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
        h, d = self.heads, self.dim_head
        fused = self.fused and not _compiling()  # under torch.compile, inductor fuses the plain formulas itself
        if fused:
            qkv = fused_linear(self.to_qkv, x).view(b, n, 3, h, d)
            out = _attend(qkv, self.projection_matrix, self.key_stabilizer)
        else:
            qf, kf, v = self.features(x)
            with torch.autocast(x.device.type, enabled=False):
                out = linear_attention(qf, kf, v.float()).transpose(1, 2)
        out = out.reshape(b, n, h * d)
        if not _autocast_on(x.device.type):
            out = out.to(x.dtype)
        return fused_linear(self.to_out, out) if fused else self.to_out(out)
