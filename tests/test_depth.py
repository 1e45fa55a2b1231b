"""Depth augmentation of fine-tuning: counts thinned to a lower depth, binned as pp.bin does."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl.data import TokenMatrix
from scbert_tl.pp._binning import bin_counts, prepare_binning
from scbert_tl.tl._depth import depth_augmentation

SMALL = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "classifier_hidden": (32, 16)}


def _counts(rng, n_cells=60, n_genes=160):
    X = rng.negative_binomial(2, 0.6, size=(n_cells, n_genes)).astype(np.float32)
    X[:, :20] *= rng.integers(5, 60, size=(n_cells, 1))  # a few highly expressed genes: every bin is used
    return sp.csr_matrix(X)


@pytest.mark.parametrize("normalize", ["library", "panel"])
def test_bin_counts_of_panel_counts_equal_the_binning(rng, normalize):
    X = _counts(rng)
    # two data genes on one panel gene (the last column is a second G5)
    ids = pd.Index([f"G{i}" for i in range(X.shape[1] - 1)] + ["G5"])
    # the panel: 130 of the genes in another order and 20 the data lacks
    panel = [f"G{i}" for i in rng.permutation(130)] + [f"ABSENT{i}" for i in range(20)]
    binning = prepare_binning(X, "X", ids, panel=panel, n_bins=9, normalize=normalize)
    chunk = binning(X.astype(np.float64))
    expected = TokenMatrix(chunk.bins, binning.alignment.panel_index, len(panel)).csr.toarray()
    counts, library = binning.panel_counts(X.astype(np.float64))
    assert counts.shape == (X.shape[0], len(panel))
    got = bin_counts(counts, library if normalize == "library" else None, 9).toarray()
    np.testing.assert_array_equal(got, expected)
    assert expected.max() == 9 and got.dtype == np.int8


def _augmentation(rng, min_depth, seed=0, n_cells=60, gene_bias=0.0):
    X = _counts(rng, n_cells)
    genes = [f"G{i}" for i in range(X.shape[1])]
    adata = ad.AnnData(X, var=pd.DataFrame(index=genes))
    model = ScBERT.new([*genes[:120], "NOT_MEASURED"], seed=0, n_bins=9, **SMALL)
    model.unmeasured = "mask"
    from scbert_tl.tl._data import tokens_for

    tokens = tokens_for(adata, model)
    rows = np.arange(n_cells)
    aug = depth_augmentation(adata, model, tokens, rows, min_depth=min_depth, gene_bias=gene_bias, seed=seed)
    return aug, tokens, rows


def test_thinning_drops_counts_keeps_the_unmeasured_fill_and_is_seeded(rng):
    aug, tokens, rows = _augmentation(rng, min_depth=50)
    original = tokens.dense(rows)
    x = aug(rows)
    changed = (x != original).any(axis=1)
    assert 0.2 < changed.mean() < 0.8  # about half of the cells are thinned
    # thinning never creates expression: a gene not detected stays undetected
    assert not ((original == 0) & (x > 0)).any()
    assert (x[changed] > 0).sum() < (original[changed] > 0).sum()
    # the model gene the data lacks is still fed as [MASK]
    assert (x[:, -1] == tokens.unmeasured_token).all() and tokens.unmeasured_token == 10
    again, _, _ = _augmentation(np.random.default_rng(0), min_depth=50)
    first, _, _ = _augmentation(np.random.default_rng(0), min_depth=50)
    np.testing.assert_array_equal(again(rows), first(rows))


class _FixedFactors:
    """The augmentation's generator, but with the log capture factors of the step fixed."""

    def __init__(self, rng, log_factors):
        self.rng, self.log_factors, self.calls = rng, log_factors, 0

    def normal(self, loc, scale, size):
        self.calls += 1
        assert size == self.log_factors.size  # one factor per model gene, for all the step's cells
        return self.log_factors

    def __getattr__(self, name):
        return getattr(self.rng, name)


def test_gene_bias_applies_one_capture_factor_per_gene_to_the_step(rng):
    aug, tokens, rows = _augmentation(rng, min_depth=50, gene_bias=0.5)
    original = tokens.dense(rows)
    log_factors = np.zeros(tokens.n_genes)
    log_factors[:120:2] = -60.0  # every other measured gene: not captured at all by this "protocol"
    aug.rng = _FixedFactors(aug.rng, log_factors)
    x = aug(rows)
    assert aug.rng.calls == 1
    changed = (x != original).any(axis=1)
    assert changed.sum() > 10
    assert (x[changed][:, :120:2] == 0).all()  # gone in every thinned cell
    assert (x[changed][:, 1:120:2] > 0).sum() > 0.5 * (original[changed][:, 1:120:2] > 0).sum()  # the others kept
    np.testing.assert_array_equal(x[~changed], original[~changed])  # cells not thinned are untouched
    assert not ((original == 0) & (x > 0)).any()  # nothing appears where nothing was measured
    assert (x[:, -1] == tokens.unmeasured_token).all()
    # seeded, and another draw than without gene bias
    first, _, _ = _augmentation(np.random.default_rng(1), min_depth=50, gene_bias=0.5)
    again, _, _ = _augmentation(np.random.default_rng(1), min_depth=50, gene_bias=0.5)
    plain, _, _ = _augmentation(np.random.default_rng(1), min_depth=50)
    np.testing.assert_array_equal(first(rows), again(rows))
    assert (first(rows) != plain(rows)).any()


def test_cells_at_or_below_the_lowest_depth_are_left_alone(rng):
    aug, tokens, rows = _augmentation(rng, min_depth=1e9)
    np.testing.assert_array_equal(aug(rows), tokens.dense(rows))


def test_finetune_records_downsample_and_skips_values_that_are_not_counts(rng, caplog):
    X = _counts(rng, n_cells=80).toarray()
    labels = np.repeat(["a", "b"], 40)
    X[labels == "b", :10] += 30
    genes = [f"G{i}" for i in range(X.shape[1])]
    adata = ad.AnnData(
        sp.csr_matrix(X),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(80)]),
        var=pd.DataFrame(index=genes),
    )
    model = ScBERT.new(genes[:120], seed=0, n_bins=9, **SMALL)
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        out = scbert.tl.finetune(adata, "cell_type", model=model, epochs=1, downsample=20)
    assert out.provenance["options"]["downsample"] == 20
    assert out.provenance["options"]["gene_bias"] == 0.0  # off unless asked
    assert "Depth augmentation: in each step" in caplog.text
    assert caplog.text.count("looks like raw counts") == 1  # said by the binning, not again by the augmentation
    biased = scbert.tl.finetune(adata, "cell_type", model=model, epochs=1, downsample=20, gene_bias=0.5)
    assert biased.provenance["options"]["gene_bias"] == 0.5
    caplog.clear()
    # log-normalised values of non-integer "counts" (e.g. after ambient RNA removal): nothing to thin
    corrected = X * rng.uniform(0.5, 1.5, size=X.shape)
    noisy = adata.copy()
    noisy.X = sp.csr_matrix(np.log1p(corrected / corrected.sum(1, keepdims=True) * 1e4))
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        scbert.tl.finetune(noisy, "cell_type", model=model, epochs=1)
    assert "Depth augmentation is off" in caplog.text
    with pytest.raises(ValueError, match="downsample"):
        scbert.tl.finetune(adata, "cell_type", model=model, epochs=1, downsample=-1)
    with pytest.raises(ValueError, match="gene_bias"):
        scbert.tl.finetune(adata, "cell_type", model=model, epochs=1, downsample=20, gene_bias=-0.5)
    with pytest.raises(ValueError, match="pass downsample > 0"):
        scbert.tl.finetune(adata, "cell_type", model=model, epochs=1, downsample=0, gene_bias=0.5)
