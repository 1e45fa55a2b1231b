"""Attention received per gene: the linear-time column sums against explicit matrices, the tool, the plots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl.model import (
    ScBERTConfig,
    ScBERTNetwork,
    _attention,
    _favor,
    attention_matrices,
    attention_received,
    column_sums,
)
from scbert_tl.tl._data import tokens_for

SMALL = {"dim": 24, "depth": 2, "heads": 2, "dim_head": 8}


def _network(key_stabilizer: str, *, n_genes: int = 60, seed: int = 0) -> ScBERTNetwork:
    """A small random network whose attention is far from uniform (sharpened query and key projections)."""
    torch.manual_seed(seed)
    config = ScBERTConfig(
        n_genes=n_genes, dim=32, depth=3, heads=3, dim_head=16, gene_emb_trainable=True, key_stabilizer=key_stabilizer
    )
    network = ScBERTNetwork(config).eval()
    with torch.no_grad():
        for layer in network.layers:
            layer.attn.to_qkv.weight[: 2 * 48].mul_(1.5)  # sharper, not so sharp that the features' eps dominates
    return network


def _tokens(cells: int, n_genes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.tensor([0.6, 0.15, 0.1, 0.07, 0.05, 0.03]), cells * n_genes, True, generator=g).view(
        cells, n_genes
    )


@pytest.mark.parametrize("key_stabilizer", ["cell", "head"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_column_sums_equal_explicit_matrices(key_stabilizer, chunked, monkeypatch):
    if chunked:  # several position chunks, a growing key stabiliser, key features recomputed, one cell at a time
        monkeypatch.setattr(_attention, "CPU_CHUNK_ELEMENTS", 3 * 3 * 40)
        monkeypatch.setattr(_attention, "CPU_KEEP_ELEMENTS", 0)
        monkeypatch.setattr(_favor, "ONEDNN_CONTRACTION_MIN_FLOPS", 0)  # the key context head by head where oneDNN is
    network = _network(key_stabilizer)
    tokens = _tokens(3, 60)
    fast = column_sums(network, tokens)
    explicit = attention_matrices(network, tokens)
    assert fast.dtype == torch.float32 and fast.shape == (3, 3, 3, 61)
    np.testing.assert_allclose(explicit.sum(-1).numpy(), 1, rtol=1e-5)
    reference = explicit.sum(-2)  # column sums, every cell, block and head
    assert reference.std(-1).min() > 0.1 and reference.max() > 3  # far from uniform, so the comparison means something
    rel = ((fast - reference).abs() / reference.abs()).max().item()
    assert rel <= 1e-5
    np.testing.assert_allclose(fast.sum(-1).numpy(), 61, rtol=1e-5)
    # averaged over heads and blocks, and over a subset of blocks (the encoder stops after the last one)
    torch.testing.assert_close(attention_received(network, tokens), reference.mean(dim=(1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        attention_received(network, tokens, layers=[0, -1]), reference[:, [0, 2]].mean(dim=(1, 2)), rtol=1e-5, atol=0
    )


def test_column_sums_do_not_depend_on_batch_mates():
    network = _network("cell")
    tokens = _tokens(4, 60, seed=1)
    together = attention_received(network, tokens)
    alone = torch.cat([attention_received(network, tokens[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_layer_selection_is_checked():
    network = _network("cell")
    tokens = _tokens(1, 60)
    with pytest.raises(ValueError, match="out of range"):
        column_sums(network, tokens, layers=[3])
    with pytest.raises(ValueError, match="'all'"):
        column_sums(network, tokens, layers="last")
    with pytest.raises(ValueError, match="empty"):
        column_sums(network, tokens, layers=[])
    assert column_sums(network, tokens, layers=1).shape == (1, 1, 3, 61)


# the tool, on real PBMC3k cells ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    """240 PBMC3k cells (30 per type), raw counts."""
    adata = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [
            rng.permutation(np.flatnonzero(adata.obs["cell_type"] == c))[:30]
            for c in adata.obs["cell_type"].cat.categories
        ]
    )
    return adata[np.sort(keep)].copy()


@pytest.fixture(scope="module")
def model(pbmc):
    """A small untrained model (no classifier) over 150 of the data's expressed genes and 10 it lacks."""
    counts = np.asarray(pbmc.X.sum(0)).ravel()
    genes = list(pbmc.var_names[np.argsort(-counts)[:150]]) + [f"ABSENT{i}" for i in range(10)]
    return ScBERT.new(genes, seed=0, **SMALL)


def test_attention_writes_documented_slots(pbmc, model, tmp_path):
    adata = pbmc.copy()
    scbert.tl.attention(adata, model, groupby="cell_type", n_top=5)
    record = adata.uns["scbert_attention"]
    groups = [c for c in pbmc.obs["cell_type"].cat.categories if (pbmc.obs["cell_type"] == c).any()]
    mean, top, scores = record["mean"], record["top_genes"], record["top_scores"]
    assert list(mean.index) == model.genes and list(mean.columns) == groups
    assert top.shape == scores.shape == (5, len(groups)) and list(top.columns) == groups
    assert record["n_cells"] == {g: int((pbmc.obs["cell_type"] == g).sum()) for g in groups}
    assert record["params"] == {
        "groupby": "cell_type",
        "layers": [0, 1],
        "n_top": 5,
        "per_cell": False,
        "model": "new",
    }
    assert record["measured"].sum() == 150 and not record["measured"][150:].any()
    for g in groups:
        np.testing.assert_array_equal(scores[g].to_numpy(), mean.loc[top[g], g].to_numpy())
        assert (np.diff(scores[g].to_numpy()) <= 0).all()  # sorted
        measured = mean[g][record["measured"]]
        assert scores[g].iloc[0] == measured.max() and not top[g].str.startswith("ABSENT").any()
    # the group means are the means of the per-cell values (checked on one group against the network)
    rows = np.flatnonzero(adata.obs["cell_type"] == groups[0])
    tokens = torch.from_numpy(tokens_for(adata, model).dense(rows))
    per_cell = attention_received(model.network, tokens)[:, :-1]
    np.testing.assert_allclose(mean[groups[0]].to_numpy(), per_cell.mean(0).numpy(), rtol=1e-5)
    assert "scbert_attention" not in adata.obsm
    adata.write_h5ad(tmp_path / "a.h5ad")  # every slot can be saved
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["scbert_attention"]
    pd.testing.assert_frame_equal(back["top_genes"], top)


def test_attention_default_groups_and_per_cell(pbmc, model):
    adata = pbmc[:60].copy()
    out = scbert.tl.attention(adata, model, n_top=3, per_cell=True, layers=-1, key_added="att", copy=True)
    assert "att" not in adata.uns
    record = out.uns["att"]
    assert list(record["mean"].columns) == ["all cells"] and record["params"]["groupby"] is None
    assert record["params"]["layers"] == [1]
    assert record["per_cell_genes"] == list(record["top_genes"]["all cells"])
    assert out.obsm["att"].shape == (60, 3) and out.obsm["att"].dtype == np.float32
    np.testing.assert_allclose(out.obsm["att"].mean(0), record["top_scores"]["all cells"], rtol=1e-5)
    # predictions written by tl.annotate are the default grouping; cells without a value are left out
    adata.obs["scbert"] = pd.Categorical(["B", "T", None] * 20, categories=["B", "T", "unknown"])
    scbert.tl.attention(adata, model, n_top=2)
    record = adata.uns["scbert_attention"]
    assert record["params"]["groupby"] == "scbert" and list(record["mean"].columns) == ["B", "T"]
    assert record["n_cells"] == {"B": 20, "T": 20}


def test_attention_bad_input(pbmc, model):
    adata = pbmc[:10].copy()
    with pytest.raises(KeyError, match="'nope' is not a column"):
        scbert.tl.attention(adata, model, groupby="nope")
    for n_top in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_top"):
            scbert.tl.attention(adata, model, n_top=n_top)
    with pytest.raises(ValueError, match="out of range"):
        scbert.tl.attention(adata, model, layers=[5])
    assert "scbert_attention" not in adata.uns


# plots ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attended(pbmc, model):
    adata = pbmc.copy()
    scbert.tl.attention(adata, model, groupby="cell_type", n_top=6)
    return adata


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


@pytest.mark.parametrize("kind", ["heatmap", "dotplot"])
def test_plot_shows_top_genes(attended, kind, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = attended.uns["scbert_attention"]["top_genes"]
    groups = list(top.columns[:3])
    ax = scbert.pl.attention(attended, n_genes=4, groups=groups, kind=kind, show=False)
    expected = list(dict.fromkeys(g for group in groups for g in top[group].iloc[:4]))
    assert _labels(ax.get_yticklabels()) == expected
    assert _labels(ax.get_xticklabels()) == groups
    assert ax.get_xlabel() == "cell_type"
    if kind == "heatmap":
        (image,) = ax.get_images()
        values = image.get_array()
        assert values.shape == (len(expected), 3)
        np.testing.assert_allclose(values.max(1), 1)  # scaled per gene
        np.testing.assert_allclose(values.min(1), 0)
    else:
        dots = ax.collections[0]
        assert len(dots.get_offsets()) == len(expected) * 3
    ax.figure.savefig(tmp_path / f"{kind}.png")
    assert (tmp_path / f"{kind}.png").stat().st_size > 1000
    plt.close(ax.figure)


def test_plot_into_given_axes_and_raw_values(attended):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    out = scbert.pl.attention(attended, n_genes=2, standard_scale=None, ax=ax, show=False)
    assert out is ax
    (image,) = ax.get_images()
    mean = attended.uns["scbert_attention"]["mean"]
    genes = _labels(ax.get_yticklabels())
    np.testing.assert_allclose(image.get_array(), mean.loc[genes].to_numpy(), rtol=1e-6)
    plt.close(fig)


def test_plot_bad_input(attended, pbmc):
    with pytest.raises(KeyError, match="run scbert.tl.attention"):
        scbert.pl.attention(pbmc, show=False)
    with pytest.raises(KeyError, match="not in"):
        scbert.pl.attention(attended, groups=["nope"], show=False)
    with pytest.raises(ValueError, match="kind"):
        scbert.pl.attention(attended, kind="violin", show=False)
    with pytest.raises(ValueError, match="n_genes"):
        scbert.pl.attention(attended, n_genes=0, show=False)


def test_synthetic_sparse_input_shapes():
    """Any AnnData with the model's genes works; genes are matched by name whatever their order."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    adata = ad.AnnData(
        sp.random(12, 40, density=0.3, format="csr", random_state=0, data_rvs=lambda k: rng.integers(1, 50, k)).astype(
            np.float32
        )
    )
    adata.var_names = genes[::-1]
    adata.obs["group"] = pd.Categorical(["a", "b", "c"] * 4)
    model = ScBERT.new(genes, seed=1, **SMALL)
    scbert.tl.attention(adata, model, groupby="group", n_top=40)
    record = adata.uns["scbert_attention"]
    assert record["mean"].shape == (40, 3) and record["top_genes"].shape == (40, 3)
    assert sorted(record["top_genes"]["a"]) == sorted(genes)
