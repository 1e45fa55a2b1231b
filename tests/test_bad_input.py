"""Nothing silently wrong: visible logs, offline honesty, model integrity, stale bins, suspicious input, clear errors.

Every refused call is checked for its exception type and message, and for leaving its inputs
(AnnData objects, files) as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scbert_tl as scbert
from scbert_tl import ScBERT, data
from scbert_tl._cli import main
from scbert_tl.model import CheckpointError
from scbert_tl.pp import _genes
from scbert_tl.tl._data import tokens_for

GENES = [f"GENE{i}" for i in range(300)]
TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "n_features": 8}


def _adata(rng, genes=GENES, n=120) -> ad.AnnData:
    counts = rng.poisson(rng.gamma(0.6, 2.0, size=len(genes)), size=(n, len(genes))).astype(np.float32)
    counts[:, 0] += 1  # every cell has counts in the panel
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    adata.obs_names = [f"cell{i}" for i in range(n)]
    adata.obs["cell_type"] = pd.Categorical(rng.choice(["T", "B", "NK"], size=n))
    return adata


def _model(genes=GENES, classes=("B", "NK", "T")) -> ScBERT:
    m = ScBERT.new(genes, seed=0, **TINY)
    m.network.add_classifier(len(classes))
    m.classes = list(classes)
    return m


def _snapshot(adata: ad.AnnData) -> ad.AnnData:
    return adata.copy()


def _assert_unchanged(adata: ad.AnnData, before: ad.AnnData) -> None:
    assert adata.shape == before.shape
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert set(adata.layers) == set(before.layers) and set(adata.obsm) == set(before.obsm)
    assert set(adata.uns) == set(before.uns)
    x, y = adata.X, before.X
    if sp.issparse(x):
        assert sp.issparse(y) and (x != y).nnz == 0
    else:
        np.testing.assert_array_equal(x, y)


def _digest(path) -> str:
    if path.is_dir():
        return "".join(f"{p.name}:{_digest(p)}" for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def _unconfigured_logging():
    """As in a session without logging configured: pytest's capture handlers off the root logger for a while."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    try:
        yield
    finally:
        root.handlers = saved


# ------------------------------------------------------------------------------------------ logging
def test_log_messages_reach_stderr_by_default(rng, capsys):
    adata = _adata(rng)
    panel = GENES + [f"OTHER{i}" for i in range(400)]
    err = []
    with _unconfigured_logging():
        for level in (2, 1, 0):
            scbert.settings.verbosity = level
            scbert.pp.bin(adata, panel=panel, aliases=None)
            err.append(capsys.readouterr().err)
    assert "pp.bin: adata.X looks like raw counts" in err[0]  # info
    assert "WARNING: Only 300 of the 700 panel genes" in err[0]  # warning
    assert "pp.bin: adata.X looks like" not in err[1] and "WARNING: Only 300" in err[1]
    assert err[2] == ""


def test_configured_logging_gets_each_line_once(rng, capsys):
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    with _unconfigured_logging():
        logging.getLogger().addHandler(handler)  # what logging.basicConfig does
        scbert.settings.verbosity = 2
        scbert.pp.bin(_adata(rng), panel=GENES, aliases=None)
    assert capsys.readouterr().err == ""  # not printed a second time by the package's own handler
    assert stream.getvalue().count("looks like raw counts") == 1


def test_caplog_still_captures(rng, caplog):
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        scbert.pp.bin(_adata(rng), panel=GENES, aliases=None)
    assert "looks like raw counts" in caplog.text


def test_import_configures_no_logging():
    code = "import logging, scbert_tl; assert not logging.getLogger().handlers; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_cli_verbosity_flags(rng, tmp_path, capsys):
    adata = _adata(rng)
    adata.write_h5ad(tmp_path / "q.h5ad")
    _model().save(tmp_path / "m")
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "m")]
    err = {}
    with _unconfigured_logging():
        for flag in ("", "-q", "-v"):
            assert main([*argv, "--out", str(tmp_path / f"out{flag}.h5ad"), *([flag] if flag else [])]) == 0
            err[flag] = capsys.readouterr().err
    assert "annotate: 120 cells" in err[""] and "annotate: 120 cells" in err["-v"]
    assert "annotate:" not in err["-q"]


# ------------------------------------------------------------------------------------------ offline
def test_compact_model_without_the_panel_is_an_error_that_says_how_to_fix_it(rng, tmp_path, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)
    monkeypatch.setattr(scbert.settings, "_cachedir", tmp_path / "empty-cache")
    adata = _adata(rng)
    before = _snapshot(adata)
    with pytest.raises(OSError, match=r"scBERT gene panel.*put it at .*scbert-panglao-genes.*SCBERT_DATA_DIR"):
        scbert.tl.finetune(adata, "cell_type", model="compact", epochs=1)
    _assert_unchanged(adata, before)


def test_hgnc_is_tried_once_per_process_and_a_local_copy_can_be_set(rng, tmp_path, monkeypatch, caplog):
    from scbert_tl import datasets

    calls = []

    def offline():
        calls.append(1)
        raise OSError("no network")

    monkeypatch.setattr(datasets, "hgnc_table", offline)
    _genes._registry_nomenclature.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="scbert_tl"):
            for _ in range(3):
                scbert.pp.bin(_adata(rng), panel=GENES)
        assert len(calls) == 1
        assert caplog.text.count("HGNC nomenclature table could not be fetched") == 1
        assert "settings.hgnc_path" in caplog.text
    finally:
        _genes._registry_nomenclature.cache_clear()
    table = tmp_path / "hgnc.tsv"
    table.write_text(
        "hgnc_id\tsymbol\tprev_symbol\talias_symbol\tensembl_gene_id\nHGNC:1\tGENE1\tOLDNAME\t\tENSG00000000001\n"
    )
    genes = ["OLDNAME", *GENES[2:]]  # GENE1 under its previous symbol, GENE0 absent
    monkeypatch.setattr(scbert.settings, "hgnc_path", table)
    adata = _adata(rng, genes=genes)
    scbert.pp.bin(adata, panel=GENES)
    assert adata.var["scbert_panel_index"].iloc[0] == 1
    assert "settings.hgnc_path" in adata.uns["scbert"]["nomenclature"]
    assert len(calls) == 1  # the registry was not asked
    with pytest.raises(FileNotFoundError, match="is not a file"):
        scbert.settings.hgnc_path = tmp_path / "missing.tsv"


# ------------------------------------------------------------------------------------------ saved models
def _tensor_data_offset(path) -> int:
    """Where the bytes of the first tensor's storage start inside torch's zip file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = path.read_bytes()
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


def test_a_flipped_byte_anywhere_in_the_weights_is_refused(tmp_path):
    path = _model().save(tmp_path / "m")
    weights = path / "model.pt"
    original = weights.read_bytes()
    size = len(original)
    data = _tensor_data_offset(weights)
    positions = [0, 40, data, data + 7, size // 3, size // 2, size - 30, size - 1]
    for pos in positions:
        flipped = bytearray(original)
        flipped[pos] ^= 0x01
        weights.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in config.json"):
            ScBERT.load(path)
    weights.write_bytes(original)
    ScBERT.load(path)  # intact again


def test_an_old_save_without_checksum_loads_with_a_note(tmp_path, caplog):
    path = _model().save(tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    del meta["model_sha256"]
    (path / "config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        m = ScBERT.load(path)
    assert m.classes == ["B", "NK", "T"]
    assert "without a checksum of its weights" in caplog.text


def test_overwrite_replaces_only_the_models_own_files(tmp_path):
    path = _model().save(tmp_path / "m")
    (path / "notes.txt").write_text("my notes")
    (path / "plots").mkdir()
    (path / "plots" / "umap.png").write_bytes(b"png")
    other = _model(classes=("a", "b"))
    other.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "my notes" and (path / "plots" / "umap.png").exists()
    assert ScBERT.load(path).classes == ["a", "b"]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.pt", "notes.txt", "plots"]


def test_save_refuses_folders_that_hold_no_model(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n")
    (folder / "config.json").write_text('{"something": "else"}')
    before = _digest(folder)
    with pytest.raises(FileExistsError, match="is not an scbert-tl model"):
        _model().save(folder, overwrite=True)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _model().save(folder)
    assert _digest(folder) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        _model().save(tmp_path / "file", overwrite=True)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        _model().save(tmp_path / "file" / "m")


def test_config_without_its_entries_is_a_clear_error(tmp_path):
    path = _model().save(tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    del meta["config"]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has no 'config' entry"):
        ScBERT.load(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="is not an scbert-tl model config"):
        ScBERT.load(path)


def test_files_that_are_not_models(rng, tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        ScBERT.load(text)
    h5ad = tmp_path / "data.h5ad"
    _adata(rng).write_h5ad(h5ad)
    before = _digest(h5ad)
    with pytest.raises(CheckpointError, match=r"is an HDF5 file \(an .h5ad\?\), not a model"):
        ScBERT.load(h5ad)
    assert _digest(h5ad) == before
    weights_dir = _model().save(tmp_path / "m")
    (weights_dir / "model.pt").write_text("garbage")
    meta = json.loads((weights_dir / "config.json").read_text())
    del meta["model_sha256"]  # an old save whose weights were replaced
    (weights_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        ScBERT.load(weights_dir)


def test_annotate_with_a_missing_model_path(rng, tmp_path):
    adata = _adata(rng)
    before = _snapshot(adata)
    with pytest.raises(FileNotFoundError, match="No model at .*nowhere") as e:
        scbert.tl.annotate(adata, tmp_path / "nowhere")
    assert "compact" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="No model at"):
        scbert.tl.embed(adata, str(tmp_path / "nowhere"))
    _assert_unchanged(adata, before)


# ------------------------------------------------------------------------------------------ stale bins
@pytest.mark.parametrize(
    "change",
    [
        "normalize_total",
        "log1p",
        "multiply",
        "replace",
        "edit_sampled_cell",
        "edit_other_cell",
        "layer_values",
        "subset_genes",
    ],
)
def test_changed_input_is_binned_again(rng, change, caplog):
    adata = _adata(rng)
    adata.layers["counts"] = adata.X.copy()
    layer = "counts" if change == "layer_values" else None
    scbert.pp.bin(adata, panel=GENES, layer=layer, aliases=None)
    model = _model()
    if change == "normalize_total":
        sc.pp.normalize_total(adata)
    elif change == "log1p":
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    elif change == "multiply":
        adata.X = adata.X * 3.0
    elif change == "replace":
        adata.X = sp.csr_matrix(rng.poisson(1.0, size=adata.shape).astype(np.float32))
    elif change.startswith("edit"):  # one cell changed: one the fingerprint hashes, or one only its total sees
        sampled = set(adata.uns["scbert"]["fingerprint"]["positions"])
        row = 0 if change == "edit_sampled_cell" else min(set(range(adata.n_obs)) - sampled)
        x = adata.X.tolil()
        x[row, 0] = x[row, 0] + 5
        adata.X = x.tocsr()
    elif change == "layer_values":
        adata.layers["counts"] = sp.csr_matrix(rng.poisson(2.0, size=adata.shape).astype(np.float32))
    elif change == "subset_genes":
        adata = adata[:, 1:].copy()
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        tokens = tokens_for(adata, model)
    assert "Binning adata for this model's panel" in caplog.text
    fresh = adata.copy()
    del fresh.uns["scbert"], fresh.layers["scbert_bins"]
    scbert.pp.bin(fresh, panel=model, layer=layer, aliases=None)
    expected = tokens_for(fresh, model)
    assert (tokens.csr != expected.csr).nnz == 0


def test_scaled_x_after_binning_is_refused_not_reused(rng):
    adata = _adata(rng)
    scbert.pp.bin(adata, panel=GENES, aliases=None)
    sc.pp.scale(adata)  # X scaled in place after the bins were made from counts
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="negative values .* looks scaled"):
        scbert.tl.annotate(adata, _model())
    _assert_unchanged(adata, before)


def test_refused_compute_options_write_nothing(rng):
    adata = _adata(rng)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        scbert.tl.annotate(adata, _model(), batch_size=-5)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        scbert.tl.embed(adata, _model(), device="tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        scbert.tl.finetune(adata, "cell_type", model=_model(), precision="float8")
    _assert_unchanged(adata, before)  # not even binned


def test_min_genes_that_removes_every_cell(rng):
    adata = _adata(rng)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="min_genes=5000 would remove every cell"):
        scbert.pp.bin(adata, panel=GENES, aliases=None, min_genes=5000)
    _assert_unchanged(adata, before)


def test_missing_alias_table(rng, tmp_path):
    adata = _adata(rng)
    with pytest.raises(FileNotFoundError, match="HGNC table .*missing.tsv is not a file"):
        scbert.pp.bin(adata, panel=GENES, aliases=tmp_path / "missing.tsv")


def test_unchanged_or_subset_cells_are_not_binned_again(rng, caplog):
    adata = _adata(rng)
    model = _model()
    scbert.pp.bin(adata, panel=model, aliases=None)
    subset = adata[rng.permutation(adata.n_obs)[:50]].copy()  # cells subset and reordered: the bins still hold
    with caplog.at_level(logging.INFO, logger="scbert_tl"):
        tokens_for(adata, model)
        tokens_for(subset, model)
    assert "Binning adata" not in caplog.text


def test_the_fingerprint_reads_few_rows_of_a_backed_file(rng, tmp_path):
    adata = _adata(rng, n=500)
    scbert.pp.bin(adata, panel=GENES, aliases=None)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    fp = backed.uns["scbert"]["fingerprint"]
    assert len(fp["rows"]) == data._record.FINGERPRINT_ROWS and fp["total"] is not None
    assert data._record.input_unchanged(fp, backed.X, backed.obs_names)
    backed.file.close()


# ------------------------------------------------------------------------------------------ suspicious input
def test_mouse_style_symbols_warn(rng, caplog):
    mouse = [g.capitalize() for g in GENES]  # "Gene12" against the panel's "GENE12"
    adata = _adata(rng, genes=mouse)
    with caplog.at_level(logging.WARNING, logger="scbert_tl"):
        scbert.pp.bin(adata, panel=GENES, aliases=None)
    assert "match the model panel only when case is ignored" in caplog.text and "Cd3e" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scbert_tl"):
        scbert.pp.bin(_adata(rng), panel=GENES, aliases=None)
    assert "case is ignored" not in caplog.text


@pytest.mark.parametrize("bad", ["", "nan", "None", "NaN", " ", "NA"])
def test_placeholder_labels_are_refused(rng, bad):
    adata = _adata(rng)
    labels = adata.obs["cell_type"].astype(str).to_numpy().astype(object)
    labels[:4] = bad
    adata.obs["lab"] = labels
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=r"4 cells have the label .* stands for a missing value"):
        scbert.tl.finetune(adata, "lab", model=_model(), epochs=1)
    with pytest.raises(ValueError, match="stands for a missing value"):
        scbert.tl.cross_validate(adata, "lab", model=_model(), n_splits=2)
    _assert_unchanged(adata, before)


def test_too_few_panel_genes_is_an_error_and_few_a_warning(rng, caplog):
    panel = [f"P{i}" for i in range(2000)]
    adata = _adata(rng, genes=panel[:20] + [f"X{i}" for i in range(200)])
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=r"Only 20 of the 2000 genes .* at least 100 are needed"):
        scbert.pp.bin(adata, panel=panel, aliases=None)
    model = _model(genes=panel)
    with pytest.raises(ValueError, match="at least 100 are needed"):
        scbert.tl.annotate(adata, model)
    _assert_unchanged(adata, before)
    ok = _adata(rng, genes=panel[:150])
    with caplog.at_level(logging.WARNING, logger="scbert_tl"):
        scbert.pp.bin(ok, panel=panel, aliases=None)
    assert "Only 150 of the 2000 panel genes" in caplog.text


# ------------------------------------------------------------------------------------------ other inputs
def test_dask_array_with_sparse_chunks(rng):
    da = pytest.importorskip("dask.array")
    adata = _adata(rng)
    lazy = ad.AnnData(da.from_array(adata.X, chunks=(50, len(GENES)), asarray=False), var=adata.var.copy())
    lazy.obs_names = adata.obs_names
    scbert.pp.bin(lazy, panel=GENES, aliases=None)
    scbert.pp.bin(adata, panel=GENES, aliases=None)
    assert (lazy.layers["scbert_bins"] != adata.layers["scbert_bins"]).nnz == 0
    tokens_for(lazy, _model())  # the fingerprint reads dask rows too


# ------------------------------------------------------------------------------------------ shell
def test_cli_input_that_is_not_an_h5ad_file(rng, tmp_path, capsys):
    _model().save(tmp_path / "m")
    folder = tmp_path / "folder.h5ad"
    folder.mkdir()
    csv = tmp_path / "counts.csv"
    csv.write_text("gene,a\nCD3E,1\n")
    before = _digest(tmp_path)
    out = str(tmp_path / "out.h5ad")
    assert main(["annotate", str(folder), "--model", str(tmp_path / "m"), "--out", out, "-q"]) == 1
    assert f"{folder} is a folder; expected an .h5ad file" in capsys.readouterr().err
    assert main(["annotate", str(csv), "--model", str(tmp_path / "m"), "--out", out, "-q"]) == 1
    assert f"{csv} is not an .h5ad file" in capsys.readouterr().err
    argv = ["finetune", str(csv), "--label-key", "cell_type", "--out", str(tmp_path / "new"), "-q"]
    assert main(argv) == 1
    assert f"{csv} is not an .h5ad file" in capsys.readouterr().err
    assert _digest(tmp_path) == before  # nothing written


def test_cli_model_that_is_data(rng, tmp_path, capsys):
    adata = _adata(rng)
    adata.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "o.h5ad"
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "q.h5ad"), "--out", str(out)]
    assert main([*argv, "-q"]) == 1
    assert "is an HDF5 file (an .h5ad?), not a model" in capsys.readouterr().err
    assert not out.exists()


def test_cli_checks_the_output_before_the_work(rng, tmp_path, capsys, monkeypatch):
    from scbert_tl import tl

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(tl, "finetune", no_work)
    monkeypatch.setattr(tl, "annotate", no_work)
    adata = _adata(rng)
    adata.write_h5ad(tmp_path / "q.h5ad")
    _model().save(tmp_path / "m")
    (tmp_path / "a_file").write_text("x")
    blocked = tmp_path / "a_file" / "sub" / "out"  # under a file: cannot be created
    before = _digest(tmp_path)
    argv = ["finetune", str(tmp_path / "q.h5ad"), "--label-key", "cell_type", "--out", str(blocked), "-q"]
    assert main(argv) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "m"), "--out", f"{blocked}.h5ad", "-q"]
    assert main(argv) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "m"), "--out", str(tmp_path), "-q"]
    assert main(argv) == 1
    assert "is a folder; --out takes the name" in capsys.readouterr().err
    argv = ["finetune", str(tmp_path / "q.h5ad"), "--label-key", "cell_type", "--out", str(tmp_path), "-q"]
    assert main([*argv, "--overwrite"]) == 1  # a folder of data, not a model
    assert "is not an scbert-tl model" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "q.h5ad"), "-o", str(blocked)]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _digest(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into any folder")
def test_cli_unwritable_output_folder(rng, tmp_path, capsys):
    adata = _adata(rng)
    adata.write_h5ad(tmp_path / "q.h5ad")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = ["finetune", str(tmp_path / "q.h5ad"), "--label-key", "cell_type", "--out", str(locked / "m"), "-q"]
        assert main(argv) == 1
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_cli_annotate_creates_a_missing_output_folder(rng, tmp_path):
    adata = _adata(rng)
    adata.write_h5ad(tmp_path / "q.h5ad")
    _model().save(tmp_path / "m")
    out = tmp_path / "new" / "folder" / "out.h5ad"
    assert main(["annotate", str(tmp_path / "q.h5ad"), "--model", str(tmp_path / "m"), "--out", str(out), "-q"]) == 0
    assert "scbert" in ad.read_h5ad(out).obs
