"""Numerics of the fast paths: fused FAVOR+, oneDNN products, reduced precision, CUDA. No timing here."""

from __future__ import annotations

import pytest
import torch

import scbert_tl.model._favor as favor
from scbert_tl.model import ScBERTConfig, ScBERTNetwork
from scbert_tl.model._favor import (
    favor_attention,
    fused_linear,
    linear_attention,
    onednn_available,
    orthogonal_random_matrix,
    softmax_features,
)
from scbert_tl.train import auto_batch_size

STABILIZERS = ["cell", "head", "batch"]


@pytest.fixture(params=["head-products", "batched-products", "cell-groups"])
def small_chunks(request, monkeypatch):
    """Force several chunks per cell, so the running key maximum and the chunk seams are exercised.

    Runs three times: with the per-(cell, head) oneDNN products and contractions forced on (where
    oneDNN exists), off, and with a budget that lets small cells go through the CPU path two at a time.
    """
    if request.param == "cell-groups":
        monkeypatch.setattr(favor, "CPU_CHUNK_ELEMENTS", 15_000)
        return
    monkeypatch.setattr(favor, "CPU_CHUNK_ELEMENTS", 2_000)
    monkeypatch.setattr(favor, "CUDA_CHUNK_ELEMENTS", 2_000)
    per_head = request.param == "head-products"
    monkeypatch.setattr(favor, "ONEDNN_QUERY_PRODUCT", per_head)
    monkeypatch.setattr(favor, "ONEDNN_HEAD_PRODUCT_MIN_FLOPS", 0 if per_head else float("inf"))
    monkeypatch.setattr(favor, "ONEDNN_CONTRACTION_MIN_FLOPS", 0 if per_head else float("inf"))


def _plain(q, k, v, projection, mode):
    """The reference composition on ``(cells, positions, heads, d)`` inputs."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    qf = softmax_features(qh, projection, is_query=True)
    kf = softmax_features(kh, projection, is_query=False, key_stabilizer=mode)
    return linear_attention(qf, kf, vh.float()).transpose(1, 2)


def _qkv(cells=3, n=211, heads=3, d=16, *, seed=0, requires_grad=False, ramp=False):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(cells, n, 3, heads, d, generator=g)
    if ramp:  # key magnitudes grow along the cell, so later chunks raise the running maximum
        qkv[:, :, 1] *= torch.linspace(0.2, 2.5, n)[None, :, None, None]
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.unbind(2)  # strided views, as the network produces them
    return qkv, q, k, v


def _cosine_per_cell(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mode", STABILIZERS)
@pytest.mark.parametrize("ramp", [False, True])
def test_fused_attention_equals_plain(mode, ramp):
    projection = orthogonal_random_matrix(37, 16, generator=torch.Generator().manual_seed(3))
    _, q, k, v = _qkv(ramp=ramp)
    with torch.no_grad():
        expected = _plain(q, k, v, projection, mode)
        got = favor_attention(q, k, v, projection, mode)
    assert favor._chunk_rows(3, 3, 37, 211, torch.device("cpu")) < 211 // 4
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mode", STABILIZERS)
def test_fused_attention_gradients_equal_plain(mode):
    projection = orthogonal_random_matrix(37, 16, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(3, 211, 3, 16, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (_plain, favor_attention):
        qkv, q, k, v = _qkv(requires_grad=True, ramp=True)
        (fn(q, k, v, projection, mode) * weights).sum().backward()
        grads.append(qkv.grad)
    scale = grads[0].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5 * scale


def test_cpu_cell_groups_keep_one_cells_chunking(monkeypatch):
    """Cells go together on CPU only with the rows one cell alone would have, so batch-mates never change a cell's chunks."""
    monkeypatch.setattr(favor, "CPU_CHUNK_ELEMENTS", 15_000)
    cpu = torch.device("cpu")
    groups, rows = favor._cell_groups(5, 3, 16, 151, cpu)
    assert rows == 151 and [g.stop - g.start for g in groups] == [2, 2, 1]
    groups, rows = favor._cell_groups(5, 3, 37, 211, cpu)
    assert rows == favor._chunk_rows(1, 3, 37, 211, cpu) < 211 and len(groups) == 5


@pytest.mark.parametrize("mode", STABILIZERS)
def test_kept_features_give_the_same_gradients(mode, monkeypatch):
    """Training keeps small cells' features for the backward pass: bit for bit the gradients of recomputing them."""
    projection = orthogonal_random_matrix(37, 16, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(3, 211, 3, 16, generator=torch.Generator().manual_seed(4))
    calls = []
    query_chunk = favor._query_chunk
    monkeypatch.setattr(favor, "_query_chunk", lambda *a: calls.append(1) or query_chunk(*a))
    grads = {}
    for keep in (0, favor.KEEP_FEATURES_BYTES):
        monkeypatch.setattr(favor, "KEEP_FEATURES_BYTES", keep)
        calls.clear()
        qkv, q, k, v = _qkv(requires_grad=True, ramp=True)
        (favor_attention(q, k, v, projection, mode) * weights).sum().backward()
        grads[keep], n_calls = qkv.grad, len(calls)
        groups, _ = favor._cell_groups(3, 3, 37, 211, torch.device("cpu"))
        assert n_calls == len(groups) * (1 if keep else 2)  # the backward pass recomputes only without keeping
    assert torch.equal(grads[0], grads[favor.KEEP_FEATURES_BYTES])


def test_fused_attention_gradcheck_double():
    """Exact gradient of the fused function, checked by finite differences (float64 inputs, float32 inside)."""
    projection = orthogonal_random_matrix(9, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    q.requires_grad_()
    out = favor_attention(q, k, v, projection, "cell")
    (grad,) = torch.autograd.grad(out.sum(), q)
    eps = 1e-3
    for idx in [(0, 0, 0, 0), (0, 3, 1, 2), (0, 5, 0, 3)]:
        plus, minus = q.detach().clone(), q.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        with torch.no_grad():
            numeric = (
                favor_attention(plus, k, v, projection, "cell").sum()
                - favor_attention(minus, k, v, projection, "cell").sum()
            ) / (2 * eps)
        assert abs(numeric.item() - grad[idx].item()) <= 2e-3 * max(1.0, abs(grad[idx].item()))


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mode", STABILIZERS)
def test_fused_network_equals_plain_network(mode):
    config = ScBERTConfig(
        n_genes=150, dim=24, depth=2, heads=3, dim_head=8, key_stabilizer=mode, gene_emb_trainable=True
    )
    torch.manual_seed(0)
    net = ScBERTNetwork(config)
    tokens = torch.randint(0, 6, (3, 150), generator=torch.Generator().manual_seed(1))
    results = {}
    for fused in (False, True):
        net.fused_kernels = fused
        assert net.fused_kernels is fused
        net.zero_grad()
        logits = net.mlm_logits(tokens)
        logits.square().mean().backward()
        with torch.no_grad():
            inference = net.mlm_logits(tokens)
        grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
        results[fused] = (logits.detach(), inference, grads)
    (plain_logits, plain_inf, plain_grads), (fused_logits, fused_inf, fused_grads) = results[False], results[True]
    assert (plain_logits - fused_logits).abs().max().item() <= 1e-5
    assert (plain_inf - fused_inf).abs().max().item() <= 1e-5
    assert (plain_inf - plain_logits).abs().max().item() <= 1e-5
    assert plain_grads.keys() == fused_grads.keys()
    for name, g in plain_grads.items():
        assert (g - fused_grads[name]).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-9, name


@pytest.mark.usefixtures("small_chunks")
def test_fused_network_is_batch_independent():
    torch.manual_seed(0)
    net = ScBERTNetwork(ScBERTConfig(n_genes=150, dim=24, depth=2, heads=3, dim_head=8)).eval()
    tokens = torch.randint(0, 6, (4, 150), generator=torch.Generator().manual_seed(1))
    tokens[0] = 5
    with torch.inference_mode():
        batch = net.encode(tokens)
        for i in range(tokens.shape[0]):
            assert (batch[i] - net.encode(tokens[i : i + 1])[0]).abs().max().item() <= 1e-6


@pytest.mark.skipif(not onednn_available(), reason="oneDNN products are not available in this torch build")
@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_equals_torch(gelu):
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 30)
    x = torch.randn(2, 50, 40)
    expected = layer(x)
    expected = torch.nn.functional.gelu(expected) if gelu else expected
    with torch.no_grad():
        assert torch.allclose(fused_linear(layer, x, gelu=gelu), expected, atol=1e-5)
    # training: forward and all gradients
    xg = x.clone().requires_grad_()
    fused_linear(layer, xg, gelu=gelu).square().sum().backward()
    got = (xg.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    y = layer(xr)
    (torch.nn.functional.gelu(y) if gelu else y).square().sum().backward()
    for a, b in zip(got, (xr.grad, layer.weight.grad, layer.bias.grad), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_softmax_features_stay_float32_under_autocast():
    """The exponent's products must not drop to bf16 under autocast (errors there are relative in the features)."""
    projection = orthogonal_random_matrix(37, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(1))
    plain = softmax_features(x, projection, is_query=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = softmax_features(x, projection, is_query=False)
    assert cast.dtype == torch.float32
    assert torch.allclose(cast, plain, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_matches_float32(fused):
    torch.manual_seed(0)
    net = ScBERTNetwork(ScBERTConfig(n_genes=300, dim=32, depth=2, heads=4, dim_head=8, gene_emb_trainable=True)).eval()
    net.fused_kernels = fused
    tokens = torch.randint(0, 6, (4, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = net.encode(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net.encode(tokens)
    assert half.shape == full.shape
    assert _cosine_per_cell(half.float(), full).min().item() >= 0.999


def test_bf16_autocast_training_step_runs():
    torch.manual_seed(0)
    net = ScBERTNetwork(ScBERTConfig(n_genes=100, dim=16, depth=1, heads=2, dim_head=8, gene_emb_trainable=True))
    tokens = torch.randint(0, 6, (2, 100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net.mlm_logits(tokens).float().square().mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_auto_batch_size_is_sane_for_the_full_config():
    full = ScBERTConfig()
    cpu = torch.device("cpu")
    infer, train = auto_batch_size(full, cpu), auto_batch_size(full, cpu, training=True)
    assert 1 <= train <= infer <= 64


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_float32():
    torch.manual_seed(0)
    config = ScBERTConfig(n_genes=2000, dim=64, depth=2, heads=4, dim_head=16, gene_emb_trainable=True)
    net = ScBERTNetwork(config).eval()
    tokens = torch.randint(0, 6, (6, 2000), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = net.encode(tokens)
        gpu = net.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu.encode(tokens.to(torch.int8).to("cuda")).float().cpu()
        gpu.fused_kernels = False
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plain = gpu.encode(tokens.to("cuda")).float().cpu()
    assert _cosine_per_cell(got, expected).min().item() >= 0.999
    assert _cosine_per_cell(plain, expected).min().item() >= 0.999


@pytest.mark.gpu
def test_cuda_fused_training_matches_plain():
    torch.manual_seed(0)
    config = ScBERTConfig(n_genes=500, dim=32, depth=2, heads=4, dim_head=8, gene_emb_trainable=True)
    net = ScBERTNetwork(config).to("cuda")
    tokens = torch.randint(0, 6, (3, 500), device="cuda")
    grads = []
    for fused in (False, True):
        net.fused_kernels = fused
        net.zero_grad()
        net.mlm_logits(tokens).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max().item() <= 1e-3 * g.abs().max().item() + 1e-8, name


@pytest.mark.gpu
def test_cuda_auto_batch_size_fits():
    full = ScBERTConfig()
    dev = torch.device("cuda")
    assert auto_batch_size(full, dev) >= auto_batch_size(full, dev, training=True) >= 1
