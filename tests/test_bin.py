"""pp.bin on real data against the definition, the input kinds, gene alignment and every bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scbert_tl as scbert
from scbert_tl.pp._kinds import detect_kind
from scbert_tl.tl._data import tokens_for


def _definition(counts: np.ndarray, n_bins: int = 5, total: np.ndarray | None = None) -> np.ndarray:
    """Tokens straight from the definition: normalise each cell to 1e4 (over the given genes, or by ``total``),
    log2(1 + x), floor, cap."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True) if total is None else np.asarray(total, dtype=np.float64).reshape(-1, 1)
    x = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0) * 1e4
    return np.minimum(np.floor(np.log2(1 + x)), n_bins).astype(np.int8)


@pytest.fixture
def panel(panel_genes):
    return panel_genes


def _panel_columns(adata, panel):
    """User columns and their panel positions, matched independently (symbol, then case-insensitive)."""
    upper = {g.upper(): i for i, g in enumerate(panel)}
    exact = {g: i for i, g in enumerate(panel)}
    cols, pos = [], []
    for j, name in enumerate(adata.var_names):
        i = exact.get(name, upper.get(name.upper()))
        if i is not None:
            cols.append(j)
            pos.append(i)
    return np.array(cols), np.array(pos)


def test_pbmc3k_counts_match_the_definition(pbmc3k, panel):
    scbert.pp.bin(pbmc3k, aliases=None)
    cols, pos = _panel_columns(pbmc3k, panel)
    dense = pbmc3k.X[:400][:, cols].toarray()
    got = pbmc3k.layers["scbert_bins"][:400][:, cols].toarray()
    np.testing.assert_array_equal(got, _definition(dense))
    assert sp.isspmatrix_csr(pbmc3k.layers["scbert_bins"]) and pbmc3k.layers["scbert_bins"].dtype == np.int8
    np.testing.assert_array_equal(np.sort(pbmc3k.var["scbert_panel_index"].to_numpy()[cols]), np.sort(pos))
    assert pbmc3k.uns["scbert"]["normalize"] == "panel"  # the published panel: the original preprocessing
    outside = np.setdiff1d(np.arange(pbmc3k.n_vars), cols)
    assert (pbmc3k.var["scbert_panel_index"].to_numpy()[outside] == -1).all()
    assert pbmc3k.layers["scbert_bins"][:, outside].nnz == 0


def test_pbmc3k_library_normalisation_matches_the_definition(pbmc3k, panel):
    scbert.pp.bin(pbmc3k, aliases=None, normalize="library")
    cols, _ = _panel_columns(pbmc3k, panel)
    library = np.asarray(pbmc3k.X[:400].sum(axis=1)).ravel()
    expected = _definition(pbmc3k.X[:400][:, cols].toarray(), total=library)
    np.testing.assert_array_equal(pbmc3k.layers["scbert_bins"][:400][:, cols].toarray(), expected)
    assert pbmc3k.uns["scbert"]["params"]["bin"]["normalize"] == "library"


def test_pbmc3k_coverage_figures(pbmc3k, panel):
    scbert.pp.bin(pbmc3k, aliases=None)
    cov = pbmc3k.uns["scbert"]["coverage"]
    cols, _ = _panel_columns(pbmc3k, panel)
    assert cov["panel_genes_matched"] == cols.size == 11149  # 11,147 exact symbols + 2 by case
    assert cov["by_method"]["exact"] == 11147 and cov["by_method"]["case"] == 2
    assert cov["panel_fraction"] == pytest.approx(11149 / 16906)
    expected_fraction = pbmc3k.X[:, cols].sum() / pbmc3k.X.sum()
    assert cov["counts_fraction"] == pytest.approx(expected_fraction, rel=1e-9)
    assert pbmc3k.uns["scbert"]["input_kind"] == "counts"
    assert pbmc3k.uns["scbert"]["params"]["bin"]["n_bins"] == 5


@pytest.mark.parametrize("log", ["log1p", "log2"])
def test_counts_and_log_normalised_give_the_same_bins(pbmc3k, log):
    counts = pbmc3k.copy()
    scbert.pp.bin(counts, aliases=None)
    lognorm = pbmc3k.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm, base=2 if log == "log2" else None)
    scbert.pp.bin(lognorm, aliases=None)
    assert lognorm.uns["scbert"]["input_kind"] == log
    assert (counts.layers["scbert_bins"] != lognorm.layers["scbert_bins"]).nnz == 0


def test_pbmc68k_raw_is_log1p_and_matches_the_definition(panel):
    adata = sc.datasets.pbmc68k_reduced()
    scbert.pp.bin(adata, use_raw=True, aliases=None)
    assert adata.uns["scbert"]["input_kind"] == "log1p" and adata.uns["scbert"]["input"] == "adata.raw.X"
    cols, _ = _panel_columns(adata, panel)
    linear = np.expm1(adata.raw.X[:, cols].toarray().astype(np.float64))
    got = adata.layers["scbert_bins"][:, cols].toarray()
    np.testing.assert_array_equal(got, _definition(linear))
    assert adata.uns["scbert"]["coverage"]["panel_genes_matched"] == cols.size


def test_nothing_of_the_users_is_lost(pbmc3k):
    before_obs, before_var = list(pbmc3k.obs.columns), list(pbmc3k.var.columns)
    x_before = pbmc3k.X.copy()
    out = scbert.pp.bin(pbmc3k, aliases=None, copy=True)
    assert "scbert_bins" not in pbmc3k.layers and "scbert" not in pbmc3k.uns  # copy=True left it alone
    scbert.pp.bin(pbmc3k, aliases=None)
    assert (pbmc3k.X != x_before).nnz == 0
    assert list(pbmc3k.obs.columns)[: len(before_obs)] == before_obs
    assert list(pbmc3k.var.columns)[: len(before_var)] == before_var
    assert (out.layers["scbert_bins"] != pbmc3k.layers["scbert_bins"]).nnz == 0


def test_low_quality_cells_are_flagged_then_removed_on_request(pbmc3k):
    flagged = scbert.pp.bin(pbmc3k, aliases=None, copy=True)
    n_genes = np.asarray((pbmc3k.X > 0).sum(axis=1)).ravel()
    np.testing.assert_array_equal(flagged.obs["scbert_n_genes"], n_genes)
    np.testing.assert_array_equal(flagged.obs["scbert_low_quality"], n_genes < 200)
    assert flagged.n_obs == pbmc3k.n_obs
    removed = scbert.pp.bin(pbmc3k, aliases=None, min_genes=500, copy=True)
    assert removed.n_obs == int((n_genes >= 500).sum()) < pbmc3k.n_obs


def test_backed_and_chunked_equal_in_memory(pbmc3k, tmp_path):
    small = pbmc3k[:300].copy()
    small.write_h5ad(tmp_path / "small.h5ad")
    backed = ad.read_h5ad(tmp_path / "small.h5ad", backed="r")
    scbert.pp.bin(backed, aliases=None, chunk_size=64)
    scbert.pp.bin(small, aliases=None)
    assert (backed.layers["scbert_bins"] != small.layers["scbert_bins"]).nnz == 0


# ---------------------------------------------------------------------------------------------- alignment
PANEL = ["CD3E", "MS4A1", "MARCHF1", "SEPTIN7", "LYZ", "Gm42418"]
HGNC = pd.DataFrame(
    {
        "hgnc_id": ["HGNC:1674", "HGNC:7315", "HGNC:26077", "HGNC:1717", "HGNC:6740"],
        "symbol": ["CD3E", "MS4A1", "MARCHF1", "SEPTIN7", "LYZ"],
        "prev_symbol": ["", "CD20", "MARCH1", "SEPT7", ""],
        "alias_symbol": ["", "B1|S7", "RNF171", "", "LZM"],
        "ensembl_gene_id": ["ENSG00000198851", "ENSG00000156738", "", "", "ENSG00000090382"],
    }
)


def _adata(genes, rng, n=20, var=None):
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n, len(genes))).astype(np.float32))
    return ad.AnnData(counts, var=var if var is not None else pd.DataFrame(index=genes))


def test_alignment_by_case_alias_and_ensembl(rng, tmp_path):
    genes = ["cd3e", "CD20", "MARCH1", "ENSG00000090382.12", "NOT_A_GENE"]
    adata = _adata(genes, rng)
    path = tmp_path / "hgnc.tsv"
    HGNC.to_csv(path, sep="\t", index=False)
    scbert.pp.bin(adata, panel=PANEL, aliases=path)
    np.testing.assert_array_equal(adata.var["scbert_panel_index"], [0, 1, 2, 4, -1])
    by = adata.uns["scbert"]["coverage"]["by_method"]
    assert by == {"exact": 0, "case": 1, "nomenclature": 2, "ensembl": 1}
    assert adata.uns["scbert"]["nomenclature"].startswith("HGNC-format table")
    without = scbert.pp.bin(_adata(genes, rng), panel=PANEL, aliases=None, copy=True)
    np.testing.assert_array_equal(without.var["scbert_panel_index"], [0, -1, -1, -1, -1])


def test_ensembl_ids_through_gene_key(rng):
    var = pd.DataFrame({"gene_ids": ["ENSG00000198851", "ENSG00000156738"]}, index=["a", "b"])
    adata = _adata(["a", "b"], rng, var=var)
    scbert.pp.bin(adata, panel=PANEL, gene_key="gene_ids", aliases=HGNC)
    np.testing.assert_array_equal(adata.var["scbert_panel_index"], [0, 1])
    assert adata.uns["scbert"]["coverage"]["by_method"]["ensembl"] == 2


def test_exact_match_wins_and_duplicates_are_summed(rng):
    genes = ["CD3E", "MS4A1", "ms4a1", "LYZ", "LYZ"]
    adata = _adata(genes, rng)
    scbert.pp.bin(adata, panel=PANEL, aliases=None)
    idx = adata.var["scbert_panel_index"].to_numpy()
    np.testing.assert_array_equal(idx, [0, 1, -1, 4, -1])  # ms4a1 shadowed by the exact MS4A1; 2nd LYZ summed
    cov = adata.uns["scbert"]["coverage"]
    assert cov["duplicates_summed"] == 1 and cov["shadowed"] == 1
    X = adata.X.toarray().astype(np.float64)
    panel_counts = np.stack([X[:, 0], X[:, 1], X[:, 3] + X[:, 4]], axis=1)
    expected = _definition(panel_counts, total=X.sum(axis=1))  # a gene list: normalised by library size
    np.testing.assert_array_equal(adata.layers["scbert_bins"][:, [0, 1, 3]].toarray(), expected)


def test_low_coverage_warns(rng, caplog):
    adata = _adata(["CD3E", "FOO", "BAR"], rng)
    scbert.pp.bin(adata, panel=PANEL, aliases=None)
    assert "Only 1 of the 6 panel genes" in caplog.text


def test_panel_from_a_model(rng):
    model = scbert.ScBERT.new(PANEL, dim=16, depth=1, heads=2, dim_head=8)
    adata = _adata(PANEL[::-1], rng)
    tokens = tokens_for(adata, model)  # bins on demand, in the model's gene order
    assert adata.uns["scbert"]["panel_size"] == len(PANEL)
    dense = tokens.dense(np.arange(adata.n_obs))
    np.testing.assert_array_equal(dense, _definition(adata.X.toarray()[:, ::-1]))
    model.normalization = "panel"  # another normalisation: binned again
    tokens_for(adata, model)
    assert adata.uns["scbert"]["normalize"] == "panel"


def test_unmeasured_model_genes_are_zero_or_unknown_as_the_model_says(rng, caplog):
    model = scbert.ScBERT.new(PANEL, dim=16, depth=1, heads=2, dim_head=8)
    counts = rng.poisson(2.0, size=(20, 3)) + np.array([1, 0, 1])
    counts[:, 1] = 0  # CD3E measured but not expressed: it stays 0 either way
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=["LYZ", "CD3E", "NOT_A_GENE"]))
    rows = np.arange(adata.n_obs)
    with caplog.at_level("WARNING"):
        zero = tokens_for(adata, model).dense(rows)
    assert "measures 2 of the model's 6 genes (33.3%)" in caplog.text and "not expressed (token 0)" in caplog.text
    assert model.unmeasured == "zero" and zero[:, [1, 2, 3, 5]].max() == 0 and zero[:, 4].min() > 0
    model.unmeasured = "mask"
    caplog.clear()
    tokens = tokens_for(adata, model)
    masked = tokens.dense(rows)
    assert "fed as unknown ([MASK])" in caplog.text and tokens.coverage == pytest.approx(2 / 6)
    np.testing.assert_array_equal(masked[:, [1, 2, 3, 5]], model.config.mask_token)
    np.testing.assert_array_equal(masked[:, [0, 4]], zero[:, [0, 4]])
    np.testing.assert_array_equal(tokens_for(adata, model, unmeasured="zero").dense(rows), zero)
    with pytest.raises(ValueError, match="unmeasured must be"):
        tokens_for(adata, model, unmeasured="nan")


# ---------------------------------------------------------------------------------------------- bad input
def test_scaled_data_is_refused(pbmc3k):
    sc.pp.normalize_total(pbmc3k)
    sc.pp.log1p(pbmc3k)
    small = pbmc3k[:200, :500].copy()
    sc.pp.scale(small)
    with pytest.raises(ValueError, match=r"negative values .* looks scaled .* layer='counts'"):
        scbert.pp.bin(small, aliases=None)


def test_nan_is_refused(rng):
    adata = _adata(PANEL, rng)
    adata.X = adata.X.toarray()
    adata.X[3, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        scbert.pp.bin(adata, panel=PANEL, aliases=None)


def test_values_of_no_known_form_are_refused(rng):
    adata = ad.AnnData(rng.uniform(0.1, 3.0, size=(30, len(PANEL))), var=pd.DataFrame(index=PANEL))
    with pytest.raises(ValueError, match="neither integer counts nor log1p / log2"):
        scbert.pp.bin(adata, panel=PANEL, aliases=None)


def test_no_gene_overlap_is_an_error(rng):
    adata = _adata(["FOO", "BAR"], rng)
    with pytest.raises(ValueError, match="None of the 2 genes of adata"):
        scbert.pp.bin(adata, panel=PANEL, aliases=None)


def test_ensembl_without_nomenclature_says_what_to_do(rng):
    adata = _adata(["ENSG00000198851", "ENSG00000156738"], rng)
    with pytest.raises(ValueError, match="look like Ensembl IDs: pass gene_key="):
        scbert.pp.bin(adata, panel=PANEL, aliases=None)


def test_input_choice_errors(rng):
    adata = _adata(PANEL, rng)
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        scbert.pp.bin(adata, panel=PANEL, layer="counts", aliases=None)
    with pytest.raises(ValueError, match="adata.raw is None"):
        scbert.pp.bin(adata, panel=PANEL, use_raw=True, aliases=None)
    adata.raw = adata
    sub = adata[:, :3].copy()
    with pytest.raises(ValueError, match=r"adata.raw has 6 genes but adata has 3.*to_adata"):
        scbert.pp.bin(sub, panel=PANEL, use_raw=True, aliases=None)
    with pytest.raises(KeyError, match="gene_key='symbol' is not a column"):
        scbert.pp.bin(adata, panel=PANEL, gene_key="symbol", aliases=None)


def test_detect_kind_on_normalised_not_logged(rng):
    counts = sp.csr_matrix(rng.poisson(1.0, size=(50, 40)).astype(np.float64) + 1)
    normalised = sp.csr_matrix(counts.multiply(1e4 / counts.sum(axis=1)))
    assert detect_kind(counts) == "counts"
    assert detect_kind(normalised) == "normalized"
