"""Fine-tune, annotate, embed, cross-validate and the shell command, on real PBMC3k cells with a small model."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl._cli import main
from scbert_tl.data import panel_checksum
from scbert_tl.train._augment import gene_mask
from scbert_tl.train._finetune import epoch_rows, epoch_sampling

SMALL = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "classifier_hidden": (256, 64), "classifier_dropout": 0.1}


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    """600 PBMC3k cells (stratified), raw counts."""
    adata = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [
            rng.permutation(np.flatnonzero(adata.obs["cell_type"] == c))[:90]
            for c in adata.obs["cell_type"].cat.categories
        ]
    )
    return adata[np.sort(keep)].copy()


@pytest.fixture(scope="module")
def genes(pbmc):
    """300 highly variable genes of the data, as a small model's panel."""
    tmp = pbmc.copy()
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    sc.pp.highly_variable_genes(tmp, n_top_genes=300, flavor="cell_ranger")
    return list(tmp.var_names[tmp.var["highly_variable"]])


@pytest.fixture(scope="module")
def split(pbmc):
    rng = np.random.default_rng(1)
    test = np.zeros(pbmc.n_obs, dtype=bool)
    test[rng.permutation(pbmc.n_obs)[: pbmc.n_obs // 4]] = True
    return pbmc[~test].copy(), pbmc[test].copy()


@pytest.fixture(scope="module")
def finetuned(split, genes):
    ref, _ = split
    return scbert.tl.finetune(ref, "cell_type", model=ScBERT.new(genes, seed=0, **SMALL), epochs=6, batch_size=16)


def test_finetune_then_annotate_on_real_cells(finetuned, split):
    ref, query = split
    assert finetuned.classes == [c for c in ref.obs["cell_type"].cat.categories if c in set(ref.obs["cell_type"])]
    assert 1 <= finetuned.provenance["selected_epoch"] <= 6 and len(finetuned.history) >= 1
    assert sum(h["selected"] for h in finetuned.history) == 1
    assert (ref.obs["scbert_split"] == "validation").sum() == finetuned.provenance["n_validation"] > 0
    scbert.tl.annotate(query, finetuned, unknown_threshold=0.0)
    assert list(query.obs["scbert"].cat.categories) == [*finetuned.classes, "unknown"]
    probs = query.obsm["scbert_probabilities"]
    assert probs.shape == (query.n_obs, len(finetuned.classes))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(query.obs["scbert_confidence"], probs.max(1), atol=1e-6)
    accuracy = (query.obs["scbert"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.7  # 300 genes, one small block, six epochs on 450 cells
    assert query.uns["scbert"]["classes"] == finetuned.classes
    assert query.uns["scbert"]["params"]["annotate"]["unknown_threshold"] == 0.0
    assert "bin" in query.uns["scbert"]["params"]  # pp.bin's record at the same key is kept


def test_bins_under_another_key_are_used_and_kept(finetuned, split, caplog):
    _, query = split
    adata = ad.AnnData(query.X.copy(), obs=query.obs[["cell_type"]].copy(), var=query.var[[]].copy())
    scbert.pp.bin(adata, panel=finetuned, n_bins=finetuned.n_bins, normalize=finetuned.normalization, key_added="x")
    assert "x_n_genes" in adata.obs and "scbert" not in adata.uns
    with caplog.at_level("INFO", logger="scbert_tl"):
        scbert.tl.annotate(adata, finetuned)
        scbert.tl.embed(adata, finetuned)
    assert "Binning adata" not in caplog.text  # found under uns["x"]: not binned again
    assert adata.uns["x"]["panel_checksum"] == panel_checksum(finetuned.genes)
    assert set(adata.uns["scbert"]) == {"classes", "params"}  # annotate's own record, at its own key
    # a second pp.bin at another key moves the record: one bins record describes the one bins layer
    scbert.pp.bin(adata, panel=finetuned, n_bins=finetuned.n_bins, normalize=finetuned.normalization)
    assert "x" not in adata.uns and "panel_checksum" in adata.uns["scbert"]


def test_annotate_and_bin_at_one_key_keep_each_others_fields(finetuned, split):
    _, query = split
    adata = ad.AnnData(query.X.copy(), obs=query.obs[["cell_type"]].copy(), var=query.var[[]].copy())
    scbert.tl.annotate(adata, finetuned)  # bins first (record at "scbert"), then writes its own fields there
    bins = {k: v for k, v in adata.uns["scbert"].items() if k not in ("classes", "params")}
    assert "panel_checksum" in bins and adata.uns["scbert"]["classes"] == finetuned.classes
    scbert.tl.annotate(adata, finetuned, unknown_threshold=0.5)
    record = adata.uns["scbert"]
    assert {k: v for k, v in record.items() if k not in ("classes", "params")}.keys() == bins.keys()
    assert record["params"]["annotate"]["unknown_threshold"] == 0.5 and "bin" in record["params"]
    scbert.pp.bin(adata, panel=finetuned, n_bins=finetuned.n_bins, normalize=finetuned.normalization)
    assert adata.uns["scbert"]["classes"] == finetuned.classes  # pp.bin keeps annotate's fields
    assert adata.uns["scbert"]["params"]["annotate"]["unknown_threshold"] == 0.5


def test_unknown_threshold_calls_low_confidence_cells_unknown(finetuned, split):
    _, query = split
    out = scbert.tl.annotate(query, finetuned, unknown_threshold=0.9, copy=True)
    low = out.obs["scbert_confidence"] < 0.9
    assert (out.obs["scbert"][low] == "unknown").all() and (out.obs["scbert"][~low] != "unknown").all()
    assert "scbert_probabilities" not in query.obsm or query is not out


def test_saved_model_predicts_the_same(finetuned, split, tmp_path):
    _, query = split
    a = scbert.tl.annotate(query, finetuned, copy=True)
    finetuned.save(tmp_path / "m")
    b = scbert.tl.annotate(query, ScBERT.load(tmp_path / "m"), copy=True)
    np.testing.assert_array_equal(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"])
    assert ScBERT.load(tmp_path / "m").history == finetuned.history
    assert ScBERT.load(tmp_path / "m").unmeasured == finetuned.unmeasured == "mask"


def test_gene_order_and_missing_genes_do_not_change_predictions(finetuned, split):
    _, query = split
    present = [g for g in finetuned.genes if g in query.var_names][:-20]  # 20 model genes missing
    extra = [g for g in query.var_names if g not in set(finetuned.genes)]  # not in the model panel
    aligned = query[:, present + extra].copy()  # panel genes first, in the model's order
    rng = np.random.default_rng(3)
    shuffled = query[:, list(rng.permutation(present + extra))].copy()
    a = scbert.tl.annotate(aligned, finetuned, copy=True)
    b = scbert.tl.annotate(shuffled, finetuned, copy=True)
    np.testing.assert_allclose(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], atol=1e-6)
    assert b.uns["scbert"]["coverage"]["panel_genes_matched"] == len(present)


def test_a_query_missing_most_model_genes_reads_them_as_unknown(finetuned, split, caplog):
    """Fine-tuned with gene masking (a new model's default), the model reads genes a query lacks as unknown."""
    _, query = split
    assert finetuned.unmeasured == "mask"
    detected = np.asarray((query.X > 0).sum(0)).ravel()
    reduced = query[:, np.sort(np.argsort(-detected, kind="stable")[:5000])].copy()  # its most detected genes
    n_kept = len(set(reduced.var_names) & set(finetuned.genes))
    assert n_kept < 0.4 * len(finetuned.genes)

    def accuracy(data):
        out = scbert.tl.annotate(data, finetuned, unknown_threshold=0.0, copy=True)
        return (out.obs["scbert"].astype(str) == out.obs["cell_type"].astype(str)).mean()

    full = accuracy(query)
    with caplog.at_level("WARNING"):
        masked = accuracy(reduced)
    assert f"measures {n_kept} of the model's {len(finetuned.genes)} genes" in caplog.text and "[MASK]" in caplog.text
    assert masked >= full - 0.1, (full, masked)  # measured: 0.811 with all genes, 0.775 with 111 of 300


def test_a_compact_model_can_take_its_genes_among_those_a_query_measures(split, caplog):
    from scbert_tl.tl._finetune import _options
    from scbert_tl.tl._resolve import compact_genes

    ref, query = split
    detected = np.asarray((query.X > 0).sum(0)).ravel()
    reduced = query[:, np.sort(np.argsort(-detected, kind="stable")[:5000])].copy()  # its most detected genes
    anywhere = compact_genes(ref)
    assert len(set(anywhere) - set(reduced.var_names)) > 100  # without the query, many genes it lacks
    trained = ref.copy()
    model = scbert.tl.finetune(trained, "cell_type", model="compact", genes_measured_in=reduced, epochs=1)
    assert set(model.genes) <= set(reduced.var_names) and len(model.genes) == 2000
    # the training cells' types (not the validation cells') choose the marker genes
    codes = trained.obs["cell_type"].map({c: i for i, c in enumerate(model.classes)}).to_numpy(dtype=np.int64)
    codes[(trained.obs["scbert_split"] == "validation").to_numpy()] = -1
    assert model.genes == compact_genes(ref, measured=list(reduced.var_names), labels=codes)
    assert model.provenance["genes_measured_in"] == reduced.n_vars
    # the query measures every gene: no gene masking by default (it cost Segerstolpe -> Baron 0.01-0.02), unless asked
    assert model.provenance["options"]["mask_genes"] == 0.0 and model.unmeasured == "zero"
    unset = dict.fromkeys(("epochs", "lr", "patience", "trainable", "mask_genes", "downsample"))
    assert _options(model, n_train=100, query_known=True, **{**unset, "mask_genes": 0.5}).mask_genes == 0.5
    assert _options(model, n_train=100, query_known=False, **unset).mask_genes == 1.0
    with caplog.at_level("WARNING"):
        out = scbert.tl.annotate(reduced, model, copy=True)
    assert out.uns["scbert"]["coverage"]["panel_genes_matched"] == 2000 and "[MASK]" not in caplog.text
    with pytest.raises(ValueError, match="genes are fixed"):
        scbert.tl.finetune(ref.copy(), "cell_type", model=model, genes_measured_in=reduced, epochs=1)
    with pytest.raises(TypeError, match="list of gene identifiers"):
        scbert.tl.finetune(ref.copy(), "cell_type", model="compact", genes_measured_in="CD3E", epochs=1)
    with pytest.raises(ValueError, match="share no gene of the scBERT panel"):
        scbert.tl.finetune(ref.copy(), "cell_type", model="compact", genes_measured_in=["NOT_A_GENE"], epochs=1)


def test_compact_genes_of_labelled_cells_hold_markers_the_most_variable_miss(pbmc):
    from scbert_tl.tl._resolve import compact_genes

    codes = pbmc.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    variable = compact_genes(pbmc, n_genes=1000)
    labelled = compact_genes(pbmc, n_genes=1000, labels=codes)
    assert len(labelled) == 1000
    missed = {"CCR7", "MS4A1", "CD8A", "CD79B"} - set(variable)  # naive T, B and CD8 T markers
    assert missed and missed <= set(labelled)


def test_marker_genes_rank_each_type_against_the_rest_and_skip_left_out_cells():
    import scipy.sparse as sp

    from scbert_tl.tl._resolve import marker_genes

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, -1], [200, 2, 100, 50])
    X = rng.poisson(1.0, size=(labels.size, 40)).astype(np.float32)
    X[labels == 1, 7] += 6  # two cells of a rare type mark gene 7
    X[labels == 2, 3] += 4
    X[labels == -1, 30] += 9  # cells left out: their gene is no marker
    X = sp.csr_matrix(np.log1p(X))
    assert {3, 7} <= set(marker_genes(X, labels, per_type=1, at_most=10).tolist())
    assert 30 not in marker_genes(X, labels, per_type=5, at_most=40)
    assert marker_genes(X, labels, per_type=50, at_most=6).size <= 6  # at most 2 of each of 3 types


def test_gene_mask_hides_genes_at_random_or_the_least_detected():
    generator = torch.Generator().manual_seed(0)
    rank = torch.arange(100)  # gene 0 is the most detected
    hidden = gene_mask(3000, 100, 1.0, generator, rank)
    share = hidden.float().mean(1)
    none = (share == 0).float().mean()
    suffix = torch.stack([(h == (rank >= 100 - int(h.sum()))).all() for h in hidden]) & (share > 0)
    assert 0.3 < none < 0.4  # a third keep all their genes (and a few draw a share near 0)
    assert 0.28 < suffix.float().mean() < 0.36  # a third lose exactly their least detected genes
    assert share.max() > 0.9 and gene_mask(3000, 100, 0.3, generator, rank).float().mean(1).max() < 0.4
    assert gene_mask(5, 100, 0.0, generator) is None


def test_sampled_epochs_draw_every_class_equally_often():
    labels = np.repeat([0, 1, 2], [500, 4, 96])
    train = np.flatnonzero(np.arange(labels.size) % 10 != 0)  # a validation share is never drawn
    rng = np.random.default_rng(0)
    shuffled = epoch_rows(train, labels, "balanced", rng)
    assert np.array_equal(np.sort(shuffled), train)
    drawn = np.concatenate([epoch_rows(train, labels, "sampled", rng) for _ in range(20)])
    assert drawn.size == 20 * train.size and np.isin(drawn, train).all()
    share = np.bincount(labels[drawn]) / drawn.size
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)  # the 4 cells of class 1 (3 in training) as often as 500
    assert np.unique(drawn[labels[drawn] == 1]).size == 3


def test_sampled_training_shuffles_its_first_half_of_epochs():
    """With "sampled", the first half of the epochs (rounded up) shuffle the cells; the rest draw classes equally."""
    assert [epoch_sampling("sampled", k, 6) for k in range(1, 7)] == [None] * 3 + ["sampled"] * 3
    assert [epoch_sampling("sampled", k, 19) for k in range(1, 20)].count(None) == 10
    assert epoch_sampling("sampled", 1, 1) is None
    assert all(epoch_sampling(w, k, 6) == w for w in ("balanced", None) for k in range(1, 7))


def test_embed_feeds_scanpy(finetuned, split):
    _, query = split
    scbert.tl.embed(query, finetuned)
    assert query.obsm["X_scbert"].shape == (query.n_obs, SMALL["dim"])
    scbert.tl.embed(query, finetuned, representation="classifier", key_added="X_scbert_head")
    assert query.obsm["X_scbert_head"].shape == (query.n_obs, SMALL["classifier_hidden"][1])
    sc.pp.neighbors(query, use_rep="X_scbert_head")
    sc.tl.umap(query)
    assert query.obsm["X_umap"].shape == (query.n_obs, 2)


def test_finetune_is_deterministic_on_cpu(split, genes):
    ref, _ = split
    small = ref[:150].copy()
    m1 = scbert.tl.finetune(
        small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), epochs=1, batch_size=16, rng=5
    )
    m2 = scbert.tl.finetune(
        small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), epochs=1, batch_size=16, rng=5
    )
    for (k, v), w in zip(m1.network.state_dict().items(), m2.network.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_a_new_model_takes_fewer_epochs_on_more_cells(split, genes, monkeypatch):
    """About 12,000 cells seen, between 6 and 20 epochs; given epochs win."""
    from scbert_tl.tl import _resolve
    from scbert_tl.train import _finetune as _finetune_train

    sizes = (1, 335, 400, 632, 1600, 1700, 1899, 100_000)
    assert [_resolve.new_model_epochs(n) for n in sizes] == [20, 20, 20, 19, 8, 7, 6, 6]
    ref, _ = split
    small = ref[:150].copy()
    monkeypatch.setattr(_resolve, "NEW_MODEL_CELLS_SEEN", 7 * 134)  # 134 training cells (16 validation): 7 epochs
    kw = {"batch_size": 32, "patience": 10, "rng": 0}
    sampling = []
    rows = _finetune_train.epoch_rows
    monkeypatch.setattr(_finetune_train, "epoch_rows", lambda *a: sampling.append(a[2]) or rows(*a))
    m = scbert.tl.finetune(small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), **kw)
    assert m.provenance["n_train"] == 134
    assert m.provenance["options"]["epochs"] == 7 and len(m.history) == 7
    assert sampling == [None] * 4 + ["sampled"] * 3  # the default "sampled": 4 of 7 epochs as the cells come
    given = scbert.tl.finetune(small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), epochs=2, **kw)
    assert given.provenance["options"]["epochs"] == 2 and len(given.history) == 2


def test_early_stopping_waits_for_the_balanced_epochs(split, genes, monkeypatch):
    """With "sampled", epochs of the first phase do not count towards patience: rare types are learnt after it."""
    from scbert_tl.train import _finetune as _finetune_train

    small = split[0][:150].copy()
    evaluate, rows, sampling = _finetune_train.evaluate, _finetune_train.epoch_rows, []
    flat = {"balanced_probability": 0.5, "macro_f1": 0.5, "accuracy": 0.5, "loss": 1.0}  # never improves
    monkeypatch.setattr(_finetune_train, "evaluate", lambda *a, **k: {**evaluate(*a, **k), **flat})
    monkeypatch.setattr(_finetune_train, "epoch_rows", lambda *a: sampling.append(a[2]) or rows(*a))
    kw = {"epochs": 7, "patience": 1, "batch_size": 32, "rng": 0}
    m = scbert.tl.finetune(small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), **kw)
    assert sampling == [None] * 4 + ["sampled"] and len(m.history) == 5  # stopped after one balanced epoch
    sampling.clear()
    m = scbert.tl.finetune(small, "cell_type", model=ScBERT.new(genes, seed=1, **SMALL), class_weight=None, **kw)
    assert sampling == [None, None] and len(m.history) == 2  # without the phases, patience counts from the start


def test_gradient_accumulation_equals_one_big_batch(split, genes):
    ref, _ = split
    small = ref[:96].copy()
    kw = {"epochs": 1, "validation": 0.0, "class_weight": "balanced", "rng": 2}
    base = ScBERT.new(genes, seed=1, **{**SMALL, "classifier_dropout": 0.0})
    big = scbert.tl.finetune(small, "cell_type", model=base, batch_size=32, accumulate=1, **kw)
    acc = scbert.tl.finetune(small, "cell_type", model=base, batch_size=8, accumulate=4, **kw)
    for (k, v), w in zip(big.network.state_dict().items(), acc.network.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, atol=2e-5, rtol=1e-4, msg=k)


def test_epochs_that_tie_on_the_metric_are_told_apart_by_the_validation_loss(monkeypatch):
    """A validation set every epoch gets right: the epoch with the lowest loss is kept, not the first."""
    from scbert_tl.data import TokenMatrix
    from scbert_tl.train import _finetune as ft

    losses = iter([0.30, 0.10, 0.20])
    monkeypatch.setattr(
        ft,
        "evaluate",
        lambda *a, **k: {"loss": next(losses), "accuracy": 1.0, "macro_f1": 1.0, "balanced_probability": 1.0},
    )
    monkeypatch.setattr(ft, "_train_epoch", lambda *a, **k: 1.0)
    model = ScBERT.new([f"G{i}" for i in range(20)], seed=0, **SMALL)
    model.network.add_classifier(2)
    tokens = TokenMatrix(np.ones((6, 20), dtype=np.int8), np.arange(20), 20)

    def selected(options):
        history = ft.fit_classifier(
            model.network,
            tokens,
            np.array([0, 1] * 3),
            np.arange(4),
            np.arange(4, 6),
            options,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        return [h["selected"] for h in history]

    assert selected(ft.FinetuneOptions(epochs=3, patience=3)) == [False, True, False]
    # select_on="loss" follows the loss, whatever the macro F1 says
    metrics = iter([(0.30, 1.0), (0.20, 0.5), (0.10, 0.4)])
    monkeypatch.setattr(
        ft, "evaluate", lambda *a, **k: dict(zip(("loss", "macro_f1"), next(metrics), strict=True), accuracy=0.5)
    )
    assert selected(ft.FinetuneOptions(epochs=3, patience=3, select_on="loss")) == [False, False, True]
    metrics = iter([(0.30, 1.0), (0.20, 0.5), (0.10, 0.4)])
    assert selected(ft.FinetuneOptions(epochs=3, patience=3, select_on="macro_f1")) == [True, False, False]
    # the default: the balanced probability, whatever macro F1 and the loss say
    metrics = iter([(0.10, 1.0, 0.6), (0.30, 0.5, 0.8), (0.20, 0.9, 0.7)])
    names = ("loss", "macro_f1", "balanced_probability")
    monkeypatch.setattr(ft, "evaluate", lambda *a, **k: dict(zip(names, next(metrics), strict=True), accuracy=0.5))
    assert selected(ft.FinetuneOptions(epochs=3, patience=3)) == [False, True, False]


def test_balanced_probability_weighs_every_class_the_same():
    from scbert_tl._metrics import balanced_probability

    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    # class 0: (0.9 + 0.7 + 0.5) / 3 = 0.7; class 1: 0.8; mean 0.75 (the cell mean would be 0.725)
    assert balanced_probability(np.array([0, 0, 0, 1]), p) == pytest.approx(0.75)
    assert balanced_probability(np.array([1, 1, 1, 1]), p) == pytest.approx(0.425)  # absent classes do not count


def test_original_freezing_scheme_trains_only_head_norm_and_second_to_last_block(split, genes):
    ref, _ = split
    base = ScBERT.new(genes, seed=1, **{**SMALL, "depth": 3})
    m = scbert.tl.finetune(ref[:80].copy(), "cell_type", model=base, epochs=1, trainable="original", validation=0.0)
    after, before = m.network.state_dict(), base.network.state_dict()
    changed = {
        k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("layers.") else "")
        for k in before
        if not torch.equal(before[k], after[k])
    }
    assert changed == {"layers.1", "norm"}  # and the new classifier head, which the base did not have
    assert base.network.classifier is None  # the caller's model is not changed


# ------------------------------------------------------------------------------------------ bad input
def test_finetune_bad_labels(split, genes):
    ref, _ = split
    model = ScBERT.new(genes, seed=0, **SMALL)
    with pytest.raises(KeyError, match="label_key='celltype' is not a column"):
        scbert.tl.finetune(ref, "celltype", model=model)
    one = ref.copy()
    one.obs["one"] = "T"
    with pytest.raises(ValueError, match="needs at least two"):
        scbert.tl.finetune(one, "one", model=model)
    nan = ref.copy()
    nan.obs["lab"] = nan.obs["cell_type"].astype(object)
    nan.obs.iloc[:3, nan.obs.columns.get_loc("lab")] = np.nan
    with pytest.raises(ValueError, match="3 cells have no label"):
        scbert.tl.finetune(nan, "lab", model=model)


def test_model_without_gene_overlap(split):
    _, query = split
    model = ScBERT.new([f"NOT_A_GENE_{i}" for i in range(50)], seed=0, **SMALL)
    model.network.add_classifier(2)
    model.classes = ["a", "b"]
    with pytest.raises(ValueError, match="None of the .* genes of adata"):
        scbert.tl.annotate(query.copy(), model)


def test_annotate_needs_a_classifier(split, genes):
    _, query = split
    with pytest.raises(ValueError, match="no classifier"):
        scbert.tl.annotate(query.copy(), ScBERT.new(genes, **SMALL))


# ------------------------------------------------------------------------------------------ evaluation
def test_cross_validation_folds_never_leak(pbmc, genes, monkeypatch):
    from scbert_tl.tl import _finetune

    adata = pbmc[::3].copy()
    fits = []  # (training cells, validation cells) of every fine-tuning run
    finetune = _finetune.finetune

    def recording(ref, *args, **kwargs):
        m = finetune(ref, *args, **{**kwargs, "split_key": "spy_split"})
        fits.append((set(ref.obs_names), set(ref.obs_names[ref.obs["spy_split"] == "validation"])))
        return m

    monkeypatch.setattr(_finetune, "finetune", recording)
    frame = scbert.tl.cross_validate(
        adata,
        "cell_type",
        model=ScBERT.new(genes, seed=0, **SMALL),
        n_splits=3,
        finetune_kwargs={"epochs": 1, "batch_size": 32},
    )
    folds = adata.uns["scbert_cv"]["folds"][0]
    assert set(folds) == {0, 1, 2}  # every cell is tested exactly once
    assert len(fits) == 3
    for fold, (train, validation) in enumerate(fits):
        test = set(adata.obs_names[folds == fold])
        assert not train & test and train | test == set(adata.obs_names)  # no cell in both
        assert validation and validation < train  # model selection only on training cells
    assert set(frame["method"]) == {"scbert", "l1_logistic"} and len(frame) == 6
    assert (frame["n_train"] + frame["n_test"] == adata.n_obs).all()
    confusion = adata.uns["scbert_cv"]["confusion"]["scbert"]
    assert confusion.sum() == adata.n_obs
    summary = adata.uns["scbert_cv"]["summary"].set_index("method")
    l1 = frame.query("method == 'l1_logistic'")["accuracy"]
    assert summary.loc["l1_logistic", "accuracy_mean"] == pytest.approx(l1.mean())
    assert summary.loc["l1_logistic", "accuracy_std"] == pytest.approx(l1.std())
    calibration = adata.uns["scbert_cv"]["calibration"].set_index("method")
    assert (calibration["n_cells"] == adata.n_obs).all()  # every test cell of the three folds, once
    assert ((calibration["ece"] >= 0) & (calibration["ece"] <= 1) & (calibration["ece_noise"] > 0)).all()
    one = scbert.tl.cross_validate(
        adata,
        "cell_type",
        model=ScBERT.new(genes, seed=0, **SMALL),
        n_splits=3,
        folds=[1],
        finetune_kwargs={"epochs": 1},
    )
    assert set(one["fold"]) == {1} and len(one) == 2
    np.testing.assert_array_equal(adata.uns["scbert_cv"]["folds"][0], folds)  # same assignment, one fold run
    assert one.loc[one["method"] == "l1_logistic", "accuracy"].item() == pytest.approx(l1.iloc[1])


def test_scores_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from scbert_tl._metrics import scores

    truth = np.array(list("aabbbcccd"))
    pred = np.array(list("abbbcccda"))
    s = scores(truth, pred, ["a", "b", "c", "d"])
    assert s["accuracy"] == accuracy_score(truth, pred)
    assert s["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    per_class = f1_score(truth, pred, labels=["a", "b", "c", "d"], average=None)
    assert list(s["per_class_f1"].values()) == pytest.approx(list(per_class))
    np.testing.assert_array_equal(s["confusion"], confusion_matrix(truth, pred, labels=["a", "b", "c", "d"]))
    # a training type absent from the test cells and never predicted counts as F1 0 in the macro average
    s = scores(truth, pred, ["a", "b", "c", "d", "e"])
    assert s["per_class_f1"]["e"] == 0
    assert s["macro_f1"] == pytest.approx(f1_score(truth, pred, labels=list("abcde"), average="macro", zero_division=0))


# ------------------------------------------------------------------------------------------ shell
def test_cli_finetune_annotate_round_trip(split, genes, tmp_path, capsys):
    ref, query = split
    small = ScBERT.new(genes, seed=0, **SMALL)
    small.save(tmp_path / "base")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    argv = ["finetune", str(tmp_path / "ref.h5ad"), "--label-key", "cell_type", "--out", str(tmp_path / "m")]
    assert main([*argv, "--model", str(tmp_path / "base"), "--epochs", "1", "--class-weight", "balanced", "-q"]) == 0
    assert ScBERT.load(tmp_path / "m").provenance["options"]["class_weight"] == "balanced"
    out = str(tmp_path / "out.h5ad")
    assert (
        main(["annotate", str(tmp_path / "query.h5ad"), "--model", str(tmp_path / "m"), "--out", out, "--embed", "-q"])
        == 0
    )
    annotated = ad.read_h5ad(out)
    assert "scbert" in annotated.obs and "X_scbert" in annotated.obsm
    # errors: clear message, non-zero status
    assert main(["annotate", str(tmp_path / "query.h5ad"), "--model", str(tmp_path / "m"), "--out", out, "-q"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:3], "nope", "--out", str(tmp_path / "m2"), "--model", str(tmp_path / "base"), "-q"]) == 1
    assert "label_key='nope' is not a column" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0


def test_cli_finetune_takes_the_genes_of_a_query_file(split, tmp_path):
    ref, query = split
    detected = np.asarray((query.X > 0).sum(0)).ravel()
    reduced = query[:, np.sort(np.argsort(-detected, kind="stable")[:5000])].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    reduced.write_h5ad(tmp_path / "query.h5ad")
    argv = ["finetune", str(tmp_path / "ref.h5ad"), "--label-key", "cell_type", "--out", str(tmp_path / "m")]
    extra = ["--genes-measured-in", str(tmp_path / "query.h5ad"), "--mask-genes", "0.5", "--epochs", "1", "-q"]
    assert main([*argv, *extra]) == 0
    model = ScBERT.load(tmp_path / "m")
    assert set(model.genes) <= set(reduced.var_names) and model.provenance["genes_measured_in"] == reduced.n_vars
    assert model.provenance["options"]["mask_genes"] == 0.5 and model.unmeasured == "mask"  # given: it wins


def test_plots_render(finetuned, split, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    _, query = split
    out = scbert.tl.annotate(query, finetuned, copy=True)
    ax = scbert.pl.confusion(out, truth="cell_type", prediction="scbert", show=False)
    assert ax.get_ylabel() == "true (cell_type), cells"
    truth = [c for c in finetuned.classes if c in set(out.obs["cell_type"])]
    counts = out.obs["cell_type"].astype(str).value_counts()
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{c} ({counts[c]})" for c in truth]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert columns[: len(truth)] == truth  # the diagonal is the diagonal
    ax.figure.savefig(tmp_path / "confusion.png")
    ax = scbert.pl.history(finetuned, show=False)
    assert ax.get_xlabel() == "epoch" and len(ax.lines) >= 2
    ax.figure.savefig(tmp_path / "history.png")
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_demo_data_is_not_scaled_x():
    """The demo bins pbmc68k_reduced's log1p .raw; its scaled .X is refused with advice."""
    data = sc.datasets.pbmc68k_reduced()
    with pytest.raises(ValueError, match="negative values"):
        scbert.pp.bin(data, panel=list(data.var_names), aliases=None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_agrees_with_float32_on_real_cells(finetuned, split, device):
    """bf16 autocast changes no class probability of a real cell by more than 0.02, embeddings keep cosine >= 0.999.

    The claim is about probabilities, not about every argmax: a cell whose two best classes are
    within bf16's rounding of each other may flip (on 2 threads one of 169 cells did, with a
    float32 margin of 0.005, while the largest change of any probability was 0.005). A real bf16
    fault (a wrong cast, an overflow, float16 range) moves probabilities by far more than 0.02.
    """
    _, pbmc = split  # 169 held-out cells (bf16 on a CPU without native bf16 is slow)
    ref = scbert.tl.annotate(pbmc, finetuned, unknown_threshold=0.0, device="cpu", precision="float32", copy=True)
    half = scbert.tl.annotate(pbmc, finetuned, unknown_threshold=0.0, device=device, precision="bfloat16", copy=True)
    p32, p16 = ref.obsm["scbert_probabilities"], half.obsm["scbert_probabilities"]
    change = np.abs(p32 - p16).max(1)  # per cell, the largest change of any class probability
    assert change.max() <= 0.02, f"bf16 moved a probability by {change.max():.4f} (median {np.median(change):.4f})"
    top2 = np.sort(p32, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.04  # cells whose call a change of <= 0.02 per class cannot flip
    assert clear.mean() > 0.8  # the check below covers most cells
    same = ref.obs["scbert"].astype(str).to_numpy() == half.obs["scbert"].astype(str).to_numpy()
    assert same[clear].all(), f"bf16 changed the type of {int((~same[clear]).sum())} clearly called cells"
    a = scbert.tl.embed(pbmc, finetuned, device="cpu", precision="float32", copy=True).obsm["X_scbert"]
    b = scbert.tl.embed(pbmc, finetuned, device=device, precision="bfloat16", copy=True).obsm["X_scbert"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999, f"lowest per-cell cosine {cosine.min():.5f}"


def test_demo_writes_its_outputs(panel_genes, tmp_path):
    """`scbert demo` (one epoch): the annotated test cells with their embedding map, the figure, the model, the scores."""
    from scbert_tl._cli.demo import run_demo

    out = tmp_path / "demo"
    result = run_demo(out, epochs=1)
    query = ad.read_h5ad(out / "annotated.h5ad")
    assert query.n_obs == result["test_cells"] == 142
    assert query.obsm["X_tsne"].shape == (142, 2) and np.isfinite(query.obsm["X_tsne"]).all()
    assert {"scbert", "scbert_confidence"} <= set(query.obs) and "X_scbert" in query.obsm
    assert (out / "demo.png").stat().st_size > 10_000 and (out / "model" / "config.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert 0 < saved["scbert"]["macro_f1"] <= 1 and saved["l1_logistic_regression"]["accuracy"] > 0.7
