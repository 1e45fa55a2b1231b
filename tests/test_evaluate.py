"""Evaluation protocols, their plots and ``scbert benchmark``, on a few real PBMC3k cells with a tiny model."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl._cli import main
from scbert_tl.tl._evaluation import _comparison, _folds, _levels, _methods, _transfer

TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "classifier_hidden": (32, 16), "classifier_dropout": 0.0}
FAST = {"epochs": 1, "batch_size": 32}
TYPES = ["B", "NK", "CD14+ Mono", "Naive CD4 T"]


@pytest.fixture(scope="module")
def cells(pbmc3k_path):
    """16 cells of each of four PBMC3k types (raw counts), 60 highly variable genes as a tiny model's panel."""
    adata = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.permutation(np.flatnonzero(adata.obs["cell_type"] == t))[:16] for t in TYPES])
    adata = adata[np.sort(keep)].copy()
    sc.pp.filter_genes(adata, min_cells=3)
    tmp = adata.copy()
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    sc.pp.highly_variable_genes(tmp, n_top_genes=60, flavor="cell_ranger")
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata, list(tmp.var_names[tmp.var["highly_variable"]])


@pytest.fixture
def data(cells):
    return cells[0].copy()


@pytest.fixture
def model(cells):
    return ScBERT.new(cells[1], seed=0, **TINY)


@pytest.fixture
def calls(monkeypatch):
    """Every training run of every method: (method, training obs names, test obs names, validation obs names)."""
    from scbert_tl.tl import _finetune

    seen = []
    predict, finetune = _methods.predict, _finetune.finetune

    def spy(method, ref, query, label_key, **kwargs):
        if method == "scbert":  # record the validation cells finetune draws (from ref, the only data it gets)

            def recording(adata, *args, **kw):
                m = finetune(adata, *args, **{**kw, "split_key": "spy_split"})
                seen.append(
                    (
                        method,
                        set(adata.obs_names),
                        set(query.obs_names),
                        set(adata.obs_names[adata.obs["spy_split"] == "validation"]),
                    )
                )
                return m

            monkeypatch.setattr(_finetune, "finetune", recording)
        else:
            seen.append((method, set(ref.obs_names), set(query.obs_names), set()))
        return predict(method, ref, query, label_key, **kwargs)

    monkeypatch.setattr(_comparison, "predict", spy)
    monkeypatch.setattr(_transfer, "predict", spy)
    return seen


# ------------------------------------------------------------------------------------------ shared pieces
def test_stratified_subsamples_are_nested_and_proportional():
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 3)
    order = np.random.default_rng(0).permutation(labels.size)
    subsets = [_folds.stratified_subsample(labels, order, f) for f in (0.1, 0.5, 1.0)]
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert set(small) <= set(large)
    counts = [pd.Series(labels[s]).value_counts().to_dict() for s in subsets]
    assert counts[0] == {"a": 5, "b": 2, "c": 1}  # round(0.1 * n), at least one of each type
    assert counts[1] == {"a": 25, "b": 10, "c": 2}
    assert subsets[2].size == labels.size


def test_folds_partition_the_cells_and_follow_the_seed():
    labels = np.repeat(["a", "b", "c"], [30, 12, 6])
    splits = _folds.fold_splits(labels, 3, seed=4)
    tests = np.concatenate([te for _, te in splits])
    assert np.array_equal(np.sort(tests), np.arange(labels.size))  # every cell tested exactly once
    for train, test in splits:
        assert np.intersect1d(train, test).size == 0 and train.size + test.size == labels.size
        assert (labels[test] == "c").sum() == 2  # stratified
    again = _folds.fold_splits(labels, 3, seed=4)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    with pytest.raises(ValueError, match="n_splits"):
        _folds.fold_splits(labels, 1, seed=0)


def test_unknown_baselines_and_missing_celltypist(monkeypatch, caplog):
    with pytest.raises(ValueError, match="Unknown baselines"):
        _methods.resolve_baselines(["l1_logistic", "svm"])
    monkeypatch.setattr(_methods, "celltypist_available", lambda: False)
    with caplog.at_level("WARNING", logger="scbert_tl.tl._evaluation._methods"):
        assert _methods.resolve_baselines(["l1_logistic", "celltypist"]) == ["l1_logistic"]
    assert "celltypist baseline is skipped" in caplog.text and "pip install" in caplog.text


@pytest.mark.skipif(not _methods.celltypist_available(), reason="celltypist (optional) is not installed")
def test_celltypist_baseline_on_the_same_folds(data, model, calls):
    frame = scbert.tl.cross_validate(
        data, "cell_type", model=model, n_splits=2, baselines=("celltypist",), finetune_kwargs=FAST
    )
    assert list(frame["method"]) == ["scbert", "celltypist"] * 2
    by_fold = {}
    for method, train, test, _ in calls:
        by_fold.setdefault(frozenset(test), set()).add((method, frozenset(train)))
    assert len(by_fold) == 2 and all(len({t for _, t in runs}) == 1 for runs in by_fold.values())  # same folds
    assert (frame.query("method == 'celltypist'")["accuracy"] > 0.5).all()


# ------------------------------------------------------------------------------------------ protocols
def test_reference_size_subsets_are_nested_sized_and_stratified(data, model, calls, tmp_path):
    fractions = (0.3, 1.0)
    frame = scbert.tl.reference_size_curve(
        data, "cell_type", fractions=fractions, model=model, n_splits=4, finetune_kwargs=FAST, rng=3
    )
    assert list(frame.columns[:5]) == ["method", "fold", "fraction", "n_train", "n_test"]
    assert len(frame) == 2 * len(fractions) and set(frame["fold"]) == {0}
    record = data.uns["scbert_size"]
    assert record["params"]["rng"] == 3 and record["params"]["fractions"] == list(fractions)
    train, test = _folds.fold_splits(data.obs["cell_type"].to_numpy(), 4, seed=3)[0]
    train_names, test_names = set(data.obs_names[train]), set(data.obs_names[test])
    subsets = [set(record["subsets"]["0"][f"{f:g}"]) for f in fractions]
    assert subsets[0] < subsets[1] == train_names
    per_type = pd.Series(data.obs["cell_type"].to_numpy()[train]).value_counts()
    for f, subset in zip(fractions, subsets, strict=True):
        counts = data.obs.loc[list(subset), "cell_type"].value_counts()
        assert all(counts[t] == max(1, round(f * per_type[t])) for t in per_type.index)
    for _, ref, query, validation in calls:
        assert query == test_names and ref in subsets and not ref & query and validation <= ref
    assert frame.groupby("fraction")["n_train"].first().tolist() == [len(s) for s in subsets]
    data.write_h5ad(tmp_path / "size.h5ad")


def test_class_imbalance_has_the_requested_design(data, model, calls, tmp_path):
    types = ["CD14+ Mono", "B", "Naive CD4 T"]
    frame = scbert.tl.class_imbalance(
        data, "cell_type", types=types, n_large=9, n_small=2, model=model, n_splits=4, finetune_kwargs=FAST
    )
    record = data.uns["scbert_imbalance"]
    assert record["design"] == {"CD14+ Mono": 9, "B": 2, "Naive CD4 T": 9} and record["rare"] == ["B"]
    cells = record["training_cells"]["0"]
    assert data.obs.loc[cells, "cell_type"].value_counts().to_dict() == record["design"]
    assert [c for c in frame.columns if c.startswith("f1:")] == [f"f1:{t}" for t in types]
    data.write_h5ad(tmp_path / "imbalance.h5ad")
    for _, ref, query, _ in calls:
        assert ref == set(cells) and not ref & query
        assert set(data.obs.loc[list(query), "cell_type"]) == set(types)  # NK is in neither
    with pytest.raises(ValueError, match="more training cells than a type has"):
        scbert.tl.class_imbalance(data, "cell_type", types=types, n_large=500, model=model, finetune_kwargs=FAST)
    with pytest.raises(KeyError, match="not in adata.obs"):
        scbert.tl.class_imbalance(data, "cell_type", types=["B", "T rex"], model=model)


def test_novel_type_never_in_training_and_recall_grows_with_the_threshold(data, model, calls, tmp_path, monkeypatch):
    thresholds = (0.0, 0.3, 0.5, 0.9, 1.0)
    fitted = []  # cells L1 logistic regression is trained on
    fit_l1 = _methods._fit_l1
    monkeypatch.setattr(_methods, "_fit_l1", lambda x, y, seed: fitted.append(len(y)) or fit_l1(x, y, seed))
    frame = scbert.tl.novel_type_detection(
        data, "cell_type", leave_out="NK", thresholds=thresholds, model=model, n_splits=4, finetune_kwargs=FAST
    )
    nk = set(data.obs_names[data.obs["cell_type"] == "NK"])
    assert len(calls) == 2
    for _, ref, query, _ in calls:
        assert not ref & nk and nk <= query and not ref & query
    assert len(frame) == 2 * len(thresholds) and set(frame["left_out"]) == {"NK"}
    assert (frame["n_novel"] == len(nk)).all()
    for _, part in frame.groupby("method"):
        part = part.sort_values("threshold")
        assert part["novel_recall"].is_monotonic_increasing and part["known_accuracy"].is_monotonic_decreasing
        zero, one = part.iloc[0], part.iloc[-1]
        assert zero["novel_recall"] == 0 and zero["known_accuracy"] == zero["known_accuracy_forced"]
        assert one["novel_recall"] == 1 and one["known_accuracy"] == 0  # confidence never exceeds 1
    chosen = data.uns["scbert_novel"]["chosen"]
    assert sorted(zip(chosen["method"], chosen["score"], strict=True)) == [
        ("l1_logistic", "probability"),
        ("scbert", "calibrated_probability"),
        ("scbert", "energy"),
        ("scbert", "probability"),
    ]
    assert chosen["auroc"].between(0, 1).all() and chosen["ece"].between(0, 1).all()
    # thresholds chosen on validation cells of known types only, the same cells for every method
    (validation,) = {frozenset(v) for m, _, _, v in calls if m == "scbert"}
    assert validation and not validation & nk
    assert len(fitted) == 1 and fitted[0] == len(calls[0][1]) - len(validation)  # L1 did not train on them
    assert (chosen["validation_unknown"] <= 0.05 + 1 / len(validation)).all()
    novel_as = data.uns["scbert_novel"]["novel_as"]
    assert set(novel_as["predicted"]) <= {"B", "CD14+ Mono", "Naive CD4 T"}
    assert novel_as.groupby("method")["n"].sum().eq(len(nk)).all()
    data.write_h5ad(tmp_path / "novel.h5ad")  # the record is saved with the data
    assert ad.read_h5ad(tmp_path / "novel.h5ad").uns["scbert_novel"]["params"]["leave_out"] == ["NK"]
    with pytest.raises(KeyError, match="leave_out"):
        scbert.tl.novel_type_detection(data, "cell_type", leave_out="T rex", model=model)


def test_dataset_transfer_never_trains_on_the_held_out_dataset(data, model, calls):
    parts = [data[i::3, :400].copy() for i in range(3)]
    sc.pp.normalize_total(parts[1], target_sum=1e4)  # a log-normalised dataset beside raw counts
    sc.pp.log1p(parts[1])
    parts[2] = parts[2][:, 40:].copy()  # and one with fewer genes
    frame = scbert.tl.dataset_transfer(parts, "cell_type", names=["a", "b", "c"], model=model, finetune_kwargs=FAST)
    assert list(frame["held_out"]) == ["a", "a", "b", "b", "c", "c"]
    assert (frame["n_train"] + frame["n_test"] == data.n_obs).all()
    for (_, ref, query, _), held_out in zip(calls, frame["held_out"], strict=True):
        assert all(not name.startswith(f"{held_out}:") for name in ref) and not ref & query
    training = parts[0].uns["scbert_transfer"]["training"]
    assert training["c"]["datasets"] == ["a", "b"] and training["a"]["n_genes"] == parts[2].n_vars
    assert parts[2].uns["scbert_transfer"]["results"] is not None
    with pytest.raises(ValueError, match="at least two datasets"):
        scbert.tl.dataset_transfer(parts[:1], "cell_type", model=model)


def _labelled_counts(labels, name, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    x = rng.poisson(2.0, (len(labels), n_genes)).astype(np.float32)
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))


def test_transfer_scores_a_query_labelled_at_another_level(monkeypatch, tmp_path):
    """Hand-made: fine reference types mapped to query lineages; an unmatched reference type, an unseen query type."""
    ref = _labelled_counts(["A1"] * 3 + ["A2"] * 3 + ["B"] * 3 + ["P"] * 2, "ref")
    query = _labelled_counts(["A", "A", "A", "B", "B", "C", "?", "?"], "query", seed=1)
    classes = ["A1", "A2", "B", "P"]
    # what the method predicts for the scored query cells (the '?' cells are left out), with probabilities
    predicted = {"c0": "A1", "c1": "A2", "c2": "P", "c3": "B", "c4": "A1", "c5": "B"}
    probabilities = {"c0": [0.5, 0.3, 0.1, 0.1]}
    seen = []

    def stub(method, fit, q, label_key, **kwargs):
        if method == "l1_logistic":  # the baselines' expression: the same cells, on the genes both share
            assert kwargs["ref_x"].shape == (fit.n_obs, len(kwargs["genes"])) and kwargs["query_x"].shape[0] == q.n_obs
            return stub("scbert", fit, q, label_key)
        seen.append((sorted(set(fit.obs[label_key])), list(q.obs_names)))
        names = [n.split(":")[1] for n in q.obs_names]
        labels = np.array([predicted[n] for n in names])
        probs = np.array([probabilities.get(n, np.eye(4)[classes.index(predicted[n])]) for n in names])
        return _methods.Prediction(labels, probs.max(1), 0.0, probabilities=probs, classes=classes)

    monkeypatch.setattr(_transfer, "predict", stub)
    frame = scbert.tl.dataset_transfer(
        {"ref": ref, "query": query},
        "cell_type",
        reference="ref",
        label_map={"A1": "A", "A2": "A", "?": None},
        baselines=("l1_logistic",),
    )
    assert seen == [(classes, [f"query:c{i}" for i in range(6)])] * 2  # trained on its own types; '?' not scored
    assert frame.drop(columns="method").iloc[0].equals(frame.drop(columns="method").iloc[1])
    row = frame.iloc[0]
    assert (row["held_out"], row["reference"], row["n_test"], row["n_unseen"], row["n_unmatched"]) == (
        "query",
        "ref",
        6,
        1,
        1,
    )
    # shared predictions A A P B A B against truth A A A B B C: 3 of 6 right
    assert row["accuracy"] == pytest.approx(0.5)
    # over the types both have (A, B): F1(A) = 2*2/(2*2+1+1), F1(B) = 2*1/(2*1+1+1)
    assert row["f1:A"] == pytest.approx(2 / 3) and row["f1:B"] == pytest.approx(0.5)
    assert row["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert "f1:P" not in frame and "f1:C" not in frame
    training = query.uns["scbert_transfer"]["training"]["query"]
    assert list(training["unmatched"]) == ["P"] and list(training["unseen"]) == ["C"]
    assert training["labels"] == "own" and training["label_map"] == {"A1": "A", "A2": "A"}
    query.write_h5ad(tmp_path / "query.h5ad")  # the record, with its label map, is saved with the data
    params = ad.read_h5ad(tmp_path / "query.h5ad").uns["scbert_transfer"]["params"]
    assert json.loads(params["label_map"]) == {"A1": "A", "A2": "A", "?": None} and params["reference"] == ["ref"]
    # the probability of a shared label sums its types: cell c0 is A1 0.5 + A2 0.3
    assert _levels.shared_prediction(
        _methods.Prediction(np.array(["A1"]), np.array([0.5]), 0, np.array([[0.5, 0.3, 0.1, 0.1]]), classes),
        {"A1": "A", "A2": "A", "B": "B", "P": "P"},
    )[1] == pytest.approx([0.8])
    other = _labelled_counts(["X", "Y"], "other")
    with pytest.raises(ValueError, match="shares no cell type with ref"):
        scbert.tl.dataset_transfer({"ref": ref, "other": other}, "cell_type", reference="ref", baselines=())
    with pytest.raises(KeyError, match="must name datasets"):
        scbert.tl.dataset_transfer({"ref": ref, "query": query}, "cell_type", reference="atlas", baselines=())


def test_transfer_gives_a_new_compact_model_the_query_genes(monkeypatch):
    ref = _labelled_counts(["A"] * 4 + ["B"] * 4, "ref", n_genes=30)
    query = _labelled_counts(["A", "B"], "query", n_genes=20, seed=1)
    seen = {}

    def stub(method, fit, q, label_key, **kwargs):
        seen[(kwargs["model"], method)] = kwargs["finetune_kwargs"].get("genes_measured_in")
        labels = fit.obs[label_key].astype(str).to_numpy()[: q.n_obs]
        return _methods.Prediction(labels, np.ones(q.n_obs), 0.0)

    monkeypatch.setattr(_transfer, "predict", stub)
    data = {"ref": ref, "query": query}
    scbert.tl.dataset_transfer(data, "cell_type", reference="ref", baselines=())
    assert seen[("compact", "scbert")] == list(query.var_names)  # the query's 20 genes, not the reference's 30
    assert query.uns["scbert_transfer"]["params"]["query_genes"] is True
    scbert.tl.dataset_transfer(data, "cell_type", reference="ref", baselines=(), query_genes=False)
    assert seen[("compact", "scbert")] is None
    scbert.tl.dataset_transfer(data, "cell_type", reference="ref", baselines=(), model="trained-model")
    assert seen[("trained-model", "scbert")] is None  # a model with its own genes
    with pytest.raises(ValueError, match="genes_measured_in"):
        scbert.tl.dataset_transfer(data, "cell_type", reference="ref", finetune_kwargs={"genes_measured_in": ["G0"]})


def test_transfer_pools_references_at_the_shared_level_of_an_obs_column(monkeypatch, tmp_path):
    a = _labelled_counts(["A1", "A2", "B", "B"], "a")
    a.obs["lineage"] = ["A", "A", "B", np.nan]  # the last cell is left out
    b = _labelled_counts(["A", "A", "B", "B"], "b", seed=1)  # labelled at the shared level: no column
    c = _labelled_counts(["A9", "A9", "B", "B"], "c", seed=2)
    c.obs["lineage"] = ["A", "A", "B", "B"]
    seen = {}

    def stub(method, fit, q, label_key, **kwargs):
        seen[q.obs_names[0].split(":")[0]] = (sorted(fit.obs[label_key]), q.n_obs)
        labels = np.array(["A"] * q.n_obs)
        return _methods.Prediction(labels, np.ones(q.n_obs), 0.0)

    monkeypatch.setattr(_transfer, "predict", stub)
    frame = scbert.tl.dataset_transfer([a, b, c], "cell_type", names=["a", "b", "c"], label_map="lineage", baselines=())
    assert list(frame["held_out"]) == ["a", "b", "c"]
    assert seen["a"] == (["A", "A", "A", "A", "B", "B", "B", "B"], 3)  # b and c pooled at the shared level
    assert seen["c"] == (["A", "A", "A", "A", "B", "B", "B"], 4)  # a's unlabelled cell left out
    assert frame.set_index("held_out").loc["a", "n_test"] == 3
    b.write_h5ad(tmp_path / "b.h5ad")
    ambiguous = _labelled_counts(["A1", "A1", "B"], "x")
    ambiguous.obs["lineage"] = ["A", "Z", "B"]
    with pytest.raises(ValueError, match="more than one shared label"):
        scbert.tl.dataset_transfer(
            {"x": ambiguous, "b": b}, "cell_type", reference="x", label_map="lineage", baselines=()
        )
    with pytest.raises(KeyError, match="none of the datasets has"):
        scbert.tl.dataset_transfer([a, b], "cell_type", label_map="level", baselines=())


# ------------------------------------------------------------------------------------------ plots
def _records(adata):
    rows = [
        {"method": m, "fold": f, "accuracy": a, "macro_f1": a - 0.1, "f1:B": a - 0.2}
        for m, base in (("scbert", 0.8), ("l1_logistic", 0.9))
        for f, a in enumerate([base, base - 0.05, base + 0.05])
    ]
    adata.uns["cv"] = {"results": pd.DataFrame(rows)}
    size = [
        {"method": m, "fold": 0, "fraction": fr, "n_train": int(100 * fr), "macro_f1": fr * s}
        for m, s in (("scbert", 0.8), ("l1_logistic", 0.9))
        for fr in (0.1, 0.5, 0.9)
    ]
    adata.uns["size"] = {"results": pd.DataFrame(size)}
    novel = [
        {
            "method": "scbert",
            "left_out": t,
            "fold": 0,
            "threshold": th,
            "novel_recall": th,
            "known_accuracy": 1 - th / 2,
        }
        for t in ("B", "NK")
        for th in (0.3, 0.5, 0.7)
    ]
    chosen = [
        {"method": "scbert", "score": score, "left_out": t, "fold": 0, "known_accuracy": acc, "novel_recall": 0.9}
        for t in ("B", "NK")
        for score, acc in (("energy", 0.8), ("probability", 0.6))
    ]
    adata.uns["novel"] = {"results": pd.DataFrame(novel), "chosen": pd.DataFrame(chosen)}


def test_evaluation_plots_draw_the_results(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    adata = ad.AnnData(np.zeros((2, 2)))
    _records(adata)
    ax = scbert.pl.cross_validation(adata, key="cv", metrics=["accuracy", "f1:B"], show=False)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [0.6, 0.7, 0.8, 0.9]  # one bar per method and metric, at the mean over folds
    assert sum(len(c.get_offsets()) for c in ax.collections) == 12  # a point per fold
    ax.figure.savefig(tmp_path / "cv.png")
    ax = scbert.pl.reference_size_curve(adata, key="size", show=False)
    assert [line.get_label() for line in ax.lines] == ["scbert", "l1_logistic"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.09, 0.45, 0.81])
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [10, 50, 90])
    ax.figure.savefig(tmp_path / "size.png")
    ax = scbert.pl.novel_type_detection(adata, key="novel", show=False)
    assert [line.get_label() for line in ax.lines] == ["B", "NK"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0.85, 0.75, 0.65])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.3, 0.5, 0.7])
    stars = [c for c in ax.collections if c.get_sizes()[0] == 120]  # the validation-chosen energy thresholds
    assert len(stars) == 2 and all(np.allclose(c.get_offsets(), [[0.8, 0.9]]) for c in stars)
    ax.figure.savefig(tmp_path / "novel.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("cv.png", "size.png", "novel.png"))
    with pytest.raises(KeyError, match="run scbert.tl.cross_validate"):
        scbert.pl.cross_validation(adata, key="nothing", show=False)
    with pytest.raises(KeyError, match="Methods"):
        scbert.pl.reference_size_curve(adata, key="size", methods=["svm"], show=False)


# ------------------------------------------------------------------------------------------ shell
def test_cli_benchmark_writes_a_report_and_fails_cleanly(data, model, tmp_path, capsys):
    model.save(tmp_path / "tiny")
    data.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "report"
    argv = ["benchmark", str(tmp_path / "cells.h5ad"), "--label-key", "cell_type", "--out", str(out)]
    options = ["--model", str(tmp_path / "tiny"), "--epochs", "1", "--n-splits", "2", "--baselines", "l1_logistic"]
    assert main([*argv, *options, "--protocols", "cv,novel", "--leave-out", "B", "-q"]) == 0
    report = (out / "report.md").read_text()
    assert "### cross-validation" in report and "### novel-type detection" in report and "l1_logistic" in report
    for name in ("cells_cv.png", "cells_cv.csv", "cells_novel.csv", "cells_novel_scbert.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert len(results["results"]["cells_cv"]["rows"]) == 4 and "torch" in results["versions"]
    assert pd.read_csv(out / "cells_novel.csv")["left_out"].eq("B").all()
    assert "At the threshold chosen on the validation cells" in report
    assert set(pd.read_csv(out / "cells_novel_chosen.csv")["score"]) == {
        "energy",
        "probability",
        "calibrated_probability",
    }
    # transfer from a reference at one resolution to a query labelled at another
    ref, query = data[::2].copy(), data[1::2].copy()
    lineage = {"Naive CD4 T": "T", "CD14+ Mono": "Mono"}
    query.obs["cell_type"] = query.obs["cell_type"].map(lambda t: lineage.get(t, t))
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    files = [str(tmp_path / "ref.h5ad"), str(tmp_path / "query.h5ad")]
    transfer = [
        "benchmark",
        *files,
        "--label-key",
        "cell_type",
        "--out",
        str(tmp_path / "tr"),
        "--protocols",
        "transfer",
    ]
    more = ["--reference", "ref", "--label-map", str(tmp_path / "lineage.json")]
    extra = ["--gene-bias", "0.5", "--mask-genes", "0.3", "-q"]
    assert main([*transfer, *options[:-4], "--baselines", "l1_logistic", *more, *extra]) == 0
    text = (tmp_path / "tr" / "report.md").read_text()
    assert '"gene_bias": 0.5' in text and '"mask_genes": 0.3' in text  # passed on to fine-tuning
    rows = pd.read_csv(tmp_path / "tr" / "transfer.csv")
    assert list(rows["held_out"]) == ["query", "query"] and set(rows["reference"]) == {"ref"}
    assert {"f1:T", "f1:Mono", "f1:B", "f1:NK", "ece"} <= set(rows.columns)
    assert "trained on ref (own labels)" in (tmp_path / "tr" / "report.md").read_text()
    capsys.readouterr()
    # errors: a clear message and exit status 1
    bad = [
        ([*argv, *options], "exists and is not empty"),
        ([*argv[:-1], str(tmp_path / "r2"), "--protocols", "cv,magic"], "Unknown protocols ['magic']"),
        ([*argv[:-1], str(tmp_path / "r3"), "--protocols", "transfer"], "needs two or more input files"),
        (
            ["benchmark", str(tmp_path / "none.h5ad"), "--label-key", "x", "--out", str(tmp_path / "r4")],
            "does not exist",
        ),
        ([*argv[:3], "kind", "--out", str(tmp_path / "r5")], "--label-key 'kind' is not a column"),
        ([*argv[:-1], str(tmp_path / "r6"), "--folds", "0,a"], "--folds must be a comma-separated list"),
        ([*transfer[:-3], str(tmp_path / "r7"), "--protocols", "transfer", "--label-map", "no.json"], "no such file"),
    ]
    for args, message in bad:
        assert main([*args, "-q"]) == 1, message
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["benchmark", "--help"])
    assert e.value.code == 0
