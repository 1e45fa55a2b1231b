"""What the tools and the shell command write: output names, file permissions, label order, result slots."""

from __future__ import annotations

import os
import stat

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl._cli import main
from scbert_tl.tl._finetune import class_order

GENES = [f"GENE{i}" for i in range(300)]
TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "n_features": 8}


def _adata(rng, labels=("T", "B", "NK"), n=120) -> ad.AnnData:
    counts = rng.poisson(rng.gamma(0.6, 2.0, size=len(GENES)), size=(n, len(GENES))).astype(np.float32)
    counts[:, 0] += 1
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=GENES))
    adata.obs_names = [f"cell{i}" for i in range(n)]
    adata.obs["cell_type"] = rng.choice(np.asarray(labels, dtype=object), size=n)
    return adata


def _model(classes=("B", "NK", "T")) -> ScBERT:
    m = ScBERT.new(GENES, seed=0, **TINY)
    m.network.add_classifier(len(classes))
    m.classes = list(classes)
    return m


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask():
    """Set the process umask for a test, and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ---------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_model_folders_are_as_readable_as_the_umask_allows(tmp_path, umask, mask):
    from scbert_tl.train._checkpoint import save_checkpoint

    umask(mask)
    path = _model().save(tmp_path / "shared" / "model")
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
    for name in ("model.pt", "config.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o777 & ~mask
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"step": 1})
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o666 & ~mask
    _model().save(path, overwrite=True)  # replacing keeps the folder and gives new files the same modes
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((path / "model.pt").stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------------------------------------- label order
def test_class_order_is_natural_for_integer_labels():
    assert class_order(np.array([10, 2, 1, 2])) == ["1", "2", "10"]
    assert class_order(["10", "2", "1", "-3"]) == ["-3", "1", "2", "10"]
    assert class_order(pd.Series(["b", "a", "B"])) == ["B", "a", "b"]  # text: as text (unchanged)
    assert class_order(["c10", "c2"]) == ["c10", "c2"]  # not integers: as text
    cat = pd.Series(pd.Categorical(["x", "10", "x"], categories=["x", "2", "10"]))
    assert class_order(cat) == ["x", "10"]  # a categorical's own order, the categories that occur


def test_integer_labels_are_ordered_naturally_in_finetune_and_the_evaluation(rng):
    from scbert_tl.tl._evaluation._comparison import comparison

    adata = _adata(rng, labels=(1, 2, 10))
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(int)
    model = scbert.tl.finetune(adata, "cell_type", model=ScBERT.new(GENES, seed=0, **TINY), epochs=1)
    assert model.classes == ["1", "2", "10"]
    adata.obs["as_text"] = adata.obs["cell_type"].astype(str)  # the same labels stored as text
    assert comparison(adata, "as_text", model, 0.1, 0, [], None).classes == ["1", "2", "10"]
    scbert.tl.annotate(adata, model)
    table = scbert.pl.confusion_table(adata, truth="as_text")
    assert list(table.index) == ["1", "2", "10"]


# ---------------------------------------------------------------------------------------------- result slots
def test_embed_writes_only_its_embedding(rng):
    adata = _adata(rng)
    scbert.pp.bin(adata, panel=_model())
    uns = set(adata.uns)
    scbert.tl.embed(adata, _model(), key_added="X_scbert")
    assert adata.obsm["X_scbert"].shape == (adata.n_obs, TINY["dim"])
    assert set(adata.uns) == uns and "X_scbert" not in adata.uns


# ---------------------------------------------------------------------------------------------- the shell
def test_cli_refuses_an_output_named_for_something_else_before_any_work(rng, tmp_path, capsys, monkeypatch):
    from scbert_tl import tl
    from scbert_tl.tl import _files

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(tl, "finetune", no_work)
    monkeypatch.setattr(_files, "annotate_file", no_work)  # scbert annotate / embed stream the file
    monkeypatch.setattr(_files, "embed_file", no_work)
    _adata(rng).write_h5ad(tmp_path / "q.h5ad")
    _model().save(tmp_path / "m")
    q, m = str(tmp_path / "q.h5ad"), str(tmp_path / "m")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["annotate", q, "--model", m, "--out", str(tmp_path / "x.txt"), "-q"]) == 1
    assert "--out" in (err := capsys.readouterr().err) and "writes an .h5ad file" in err and "x.h5ad" in err
    assert main(["embed", q, "--model", m, "--out", str(tmp_path / "e.csv"), "-q"]) == 1
    assert "writes an .h5ad file" in (err := capsys.readouterr().err) and "e.h5ad" in err
    assert main(["finetune", q, "--label-key", "cell_type", "--out", str(tmp_path / "model.h5ad"), "-q"]) == 1
    assert "writes a model folder, not a .h5ad file" in capsys.readouterr().err
    assert main(["pretrain", q, "--out", str(tmp_path / "model.pt"), "-q"]) == 1
    assert "writes a model folder, not a .pt file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo.png"), "-q"]) == 1
    assert "writes a folder, not a .png file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_cli_annotate_summary_lists_only_types_that_got_cells(rng, tmp_path, capsys):
    _adata(rng).write_h5ad(tmp_path / "q.h5ad")
    _model(classes=("B", "NK", "T", "never")).save(tmp_path / "m")
    out = tmp_path / "a.h5ad"
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "m"), "--out", str(out), "-q"]
    assert main([*argv, "--unknown-threshold", "0"]) == 0  # threshold 0: no cell is 'unknown'
    printed = capsys.readouterr().out.splitlines()
    counts = ad.read_h5ad(out).obs["scbert"].value_counts()
    assert (counts == 0).any()  # 'unknown' at least got no cells
    listed = {line.rsplit(maxsplit=1)[0]: int(line.rsplit(maxsplit=1)[1]) for line in printed[2:]}
    assert listed == {k: int(v) for k, v in counts.items() if v > 0}


def test_prediction_arrays_are_what_annotate_and_embed_write(rng):
    """The array path the evaluation uses (tl/_predict) gives what the tools write, and writes nothing itself."""
    from scbert_tl.tl._predict import Annotation, predict

    adata, model = _adata(rng), _model()
    scbert.pp.bin(adata, panel=model)
    slots = (set(adata.obs), set(adata.obsm), set(adata.uns))
    annotation = Annotation.predict(adata, model)
    hidden = predict(adata, model, "classifier")
    assert (set(adata.obs), set(adata.obsm), set(adata.uns)) == slots
    assert annotation.probabilities.shape == (adata.n_obs, 3) and annotation.classes == ["B", "NK", "T"]
    scbert.tl.annotate(adata, model, unknown_threshold=0)  # 0: no cell is called unknown
    scbert.tl.embed(adata, model, representation="classifier")
    np.testing.assert_array_equal(adata.obsm["scbert_probabilities"], annotation.probabilities.astype(np.float32))
    assert adata.obs["scbert"].astype(str).tolist() == annotation.labels.tolist()
    np.testing.assert_array_equal(adata.obsm["X_scbert"], hidden.astype(np.float32))
    with pytest.raises(ValueError, match="no classifier"):
        predict(adata, ScBERT.new(GENES, seed=0, **TINY), "logits")
