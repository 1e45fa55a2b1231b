"""The network against an independent implementation, and its invariants."""

from __future__ import annotations

import pytest
import torch

from scbert_tl.model import ScBERTConfig, ScBERTNetwork, infer_config, load_into, to_own_state_dict
from scbert_tl.model._favor import orthogonal_random_matrix

performer_pytorch = pytest.importorskip("performer_pytorch", reason="performer-pytorch (test extra) is not installed")

N_GENES = 256


def _reference(depth: int = 2, n_genes: int = N_GENES, seed: int = 0):
    torch.manual_seed(seed)
    ref = performer_pytorch.PerformerLM(
        num_tokens=7,
        max_seq_len=n_genes + 1,
        dim=200,
        depth=depth,
        heads=10,
        dim_head=64,
        local_attn_heads=0,
        rotary_position_emb=False,
        attn_out_bias=True,
    )
    with torch.no_grad():  # its position embedding stands in for gene2vec: random, last row zero as ours
        ref.pos_emb.emb.weight[-1].zero_()
    return ref.eval()


def _ours_from(ref, key_stabilizer: str) -> ScBERTNetwork:
    own, fmt = to_own_state_dict(ref.state_dict())
    assert fmt == "scbert-original"
    net = ScBERTNetwork(infer_config(own, key_stabilizer=key_stabilizer))
    load_into(net, own)
    return net.eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 6, (4, N_GENES), generator=g)
    t[t < 3] = 0  # sparse, like real cells
    return t


def test_full_config_defaults():
    c = ScBERTConfig()
    assert (c.n_genes, c.seq_len, c.num_tokens, c.mask_token) == (16906, 16907, 7, 6)
    assert (c.dim, c.depth, c.heads, c.dim_head, c.n_features, c.ff_mult) == (200, 6, 10, 64, 266, 4)
    assert 300e9 < c.flops_per_cell() < 315e9  # ~307 GFLOP per cell


def test_matches_performer_pytorch(tokens):
    ref = _reference()
    net = _ours_from(ref, "head")
    full = torch.nn.functional.pad(tokens, (0, 1))  # the appended position, token 0
    with torch.no_grad():
        expected = ref(full, return_encodings=True)
        got = net.encode(tokens)
        assert (expected - got).abs().max().item() <= 1e-5
        assert (ref.to_out(expected) - net.mlm_logits(tokens)).abs().max().item() <= 1e-5


def test_cell_stabilizer_is_batch_independent(tokens):
    net = _ours_from(_reference(), "cell")
    with torch.no_grad():
        batch = net.encode(tokens)
        for i in range(tokens.shape[0]):
            alone = net.encode(tokens[i : i + 1])
            assert (batch[i] - alone[0]).abs().max().item() <= 1e-6


def test_batch_stabilizer_depends_on_batch_mates(tokens):
    """The original's batch-wide max is what "cell" fixes; show that it really differs."""
    net = _ours_from(_reference(), "batch")
    loud = tokens.clone()
    loud[0] = 5
    with torch.no_grad():
        a = net.encode(loud)[1]
        b = net.encode(loud[1:2])[0]
    assert (a - b).abs().max().item() > 1e-6


def test_cell_equals_original_at_batch_size_one(tokens):
    ref = _reference()
    cell, batch = _ours_from(ref, "cell"), _ours_from(ref, "batch")
    with torch.no_grad():
        assert torch.equal(cell.encode(tokens[:1]), batch.encode(tokens[:1]))


def test_orthogonal_features():
    w = orthogonal_random_matrix(266, 64, generator=torch.Generator().manual_seed(0))
    assert w.shape == (266, 64)
    unit = w[:64] / w[:64].norm(dim=1, keepdim=True)  # each 64-row block is orthogonal
    assert torch.allclose(unit @ unit.T, torch.eye(64), atol=1e-5)


def test_gene_embedding_is_frozen_and_last_row_zero():
    net = ScBERTNetwork(ScBERTConfig(n_genes=10, dim=16, depth=1, heads=2, dim_head=8))
    assert not net.gene_emb.weight.requires_grad
    trainable = ScBERTNetwork(ScBERTConfig(n_genes=10, dim=16, depth=1, heads=2, dim_head=8, gene_emb_trainable=True))
    assert trainable.gene_emb.weight.requires_grad
    assert torch.all(trainable.gene_emb.weight[-1] == 0)


def test_classifier_head_shapes():
    c = ScBERTConfig(n_genes=30, dim=16, depth=1, heads=2, dim_head=8, n_classes=4, classifier_hidden=(12, 6))
    net = ScBERTNetwork(c)
    out = net(torch.zeros(3, 30, dtype=torch.int8))
    assert out.shape == (3, 4)
    assert net.classifier.fc1.in_features == 31  # every position, the appended one too


def test_wrong_token_shape_is_a_clear_error():
    net = ScBERTNetwork(ScBERTConfig(n_genes=10, dim=16, depth=1, heads=2, dim_head=8))
    with pytest.raises(ValueError, match=r"Expected tokens of shape \(batch, 10\)"):
        net.encode(torch.zeros(2, 11, dtype=torch.long))


def test_invalid_config():
    with pytest.raises(ValueError, match="key_stabilizer"):
        ScBERTConfig(key_stabilizer="global")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        ScBERTConfig(depth=0)
