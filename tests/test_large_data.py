"""Large data: backed and dask-backed AnnData, the streamed shell commands, resuming, torchrun shards.

Real cells (the Allen M1 nuclei, 141 marker genes); every streamed or sharded result is compared
bit for bit with the in-memory one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl._cli import main

ALLEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "allen_m1_140genes.h5ad"
TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "n_features": 8, "classifier_hidden": (32, 16)}
SLOTS = ("scbert", "scbert_confidence", "scbert_novelty")


@pytest.fixture(scope="module")
def allen(tmp_path_factory):
    """2,500 real cells in an .h5ad file, and a tiny model fine-tuned on 600 others."""
    if not ALLEN.exists():
        pytest.skip(f"needs the Allen M1 cells at {ALLEN} (../shared/data beside the project)")
    full = ad.read_h5ad(ALLEN)
    rng = np.random.default_rng(0)
    rows = rng.permutation(full.n_obs)
    folder = tmp_path_factory.mktemp("large")
    path = folder / "query.h5ad"
    full[np.sort(rows[:2500])].copy().write_h5ad(path)
    ref = full[np.sort(rows[2500:3100])].copy()
    model = scbert.tl.finetune(
        ref, "celltype", model=ScBERT.new(list(full.var_names), seed=0, **TINY), epochs=1, batch_size=32
    )
    model.save(folder / "model")
    return path, folder / "model"


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _in_memory(path: Path, model: ScBERT, batch_size: int | None = None) -> ad.AnnData:
    """The in-memory results, in batches of ``batch_size`` as the streamed run compared with them.

    Equal batches give equal results bit for bit; a batch of another size may take other CPU kernels
    (MKL or oneDNN, split differently between threads), which can change the last bit.
    """
    adata = ad.read_h5ad(path)
    scbert.tl.annotate(adata, model, batch_size=batch_size)
    scbert.tl.embed(adata, model, batch_size=batch_size)
    return adata


def _assert_same(a: ad.AnnData, b: ad.AnnData, embed: bool = True) -> None:
    for key in SLOTS:
        np.testing.assert_array_equal(a.obs[key].to_numpy(), b.obs[key].to_numpy())
    np.testing.assert_array_equal(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"])
    if embed:
        np.testing.assert_array_equal(a.obsm["X_scbert"], b.obsm["X_scbert"])


def test_backed_tools_stream_and_leave_the_file_alone(allen):
    path, model_dir = allen
    model = ScBERT.load(model_dir)
    expected = _in_memory(path, model, batch_size=64)
    before = _digest(path)

    backed = ad.read_h5ad(path, backed="r")
    scbert.tl.annotate(backed, model, chunk_size=300, batch_size=64)  # 5 chunks of 320 cells, a partial last one
    scbert.tl.embed(backed, model, chunk_size=300, batch_size=64)
    _assert_same(expected, backed)
    assert "scbert_bins" not in backed.layers  # binned on the fly, chunk by chunk: nothing of the size of the data kept
    assert backed.uns["scbert"]["classes"] == list(model.classes)

    scbert.pp.bin(backed, panel=model)  # reads X in chunks; the bins stay in memory
    mem = ad.read_h5ad(path)
    scbert.pp.bin(mem, panel=model)
    assert (backed.layers["scbert_bins"] != mem.layers["scbert_bins"]).nnz == 0
    with pytest.raises(ValueError, match="backed"):
        scbert.pp.bin(backed, panel=model, min_genes=5)
    with pytest.raises(ValueError, match="copy=True"):
        scbert.tl.annotate(backed, model, copy=True)
    backed.file.close()
    assert _digest(path) == before  # bytes and modification time


def test_results_that_would_not_fit_are_refused_with_the_way_out(allen, monkeypatch):
    from scbert_tl.data import _chunks

    path, model_dir = allen
    monkeypatch.setattr(_chunks, "available_memory", lambda: 10_000)  # bytes: far less than 2,500 cells need
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(MemoryError, match="scbert annotate IN.h5ad"):
        scbert.tl.annotate(backed, ScBERT.load(model_dir), chunk_size=500)
    assert "scbert" not in backed.obs


def test_dask_matrix_runs_through_dask(allen):
    pytest.importorskip("dask.array")
    import h5py
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    path, model_dir = allen
    model = ScBERT.load(model_dir)
    expected = _in_memory(path, model, batch_size=64)
    with h5py.File(path, "r") as f:
        lazy = ad.AnnData(X=read_elem_lazy(f["X"], chunks=(512, -1)), obs=read_elem(f["obs"]), var=read_elem(f["var"]))
        scbert.tl.annotate(lazy, model, batch_size=64)
        scbert.tl.embed(lazy, model, batch_size=64)
    _assert_same(expected, lazy)


def test_read_lazy_anndata_is_annotated_through_dask(allen):
    """``anndata.experimental.read_lazy`` (dask X, xarray obs): the tools stream X and write into the lazy obs."""
    pytest.importorskip("dask.array")
    pytest.importorskip("xarray", reason="anndata's read_lazy needs xarray")
    from anndata.experimental import read_lazy

    path, model_dir = allen
    model = ScBERT.load(model_dir)
    expected = _in_memory(path, model, batch_size=64)
    lazy = read_lazy(path)
    scbert.tl.annotate(lazy, model, batch_size=64)
    scbert.tl.embed(lazy, model, batch_size=64)
    for key in SLOTS:
        np.testing.assert_array_equal(np.asarray(lazy.obs[key]), expected.obs[key].to_numpy())
    for key in ("scbert_probabilities", "X_scbert"):
        np.testing.assert_array_equal(np.asarray(lazy.obsm[key]), expected.obsm[key])


@pytest.mark.slow
def test_dask_cluster_runs_the_blocks_on_its_workers(allen):
    """With a dask.distributed client, the blocks run in the cluster's worker processes, with the same results."""
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import h5py
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    path, model_dir = allen
    model = ScBERT.load(model_dir)
    expected = _in_memory(path, model, batch_size=100)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client, h5py.File(path, "r") as f:
        lazy = ad.AnnData(X=read_elem_lazy(f["X"], chunks=(500, -1)), obs=read_elem(f["obs"]), var=read_elem(f["var"]))
        workers = set(client.scheduler_info()["workers"])
        with distributed.get_task_stream(client) as tasks:
            scbert.tl.annotate(lazy, model, batch_size=100)
            scbert.tl.embed(lazy, model, batch_size=100)
    ran_on = [t["worker"] for t in tasks.data if "block" in str(t["key"])]
    assert len(ran_on) == 2 * 5  # one task per block of 500 cells for each tool
    assert set(ran_on) <= workers
    _assert_same(expected, lazy)


def _annotate_cli(path, model_dir, out, *extra):
    return main(["annotate", str(path), "--model", str(model_dir), "--out", str(out), "--embed", "-q", *extra])


def test_cli_streams_the_same_annotation(allen, tmp_path):
    path, model_dir = allen
    out = tmp_path / "out.h5ad"
    assert _annotate_cli(path, model_dir, out, "--chunk-size", "700", "--batch-size", "100") == 0
    result = ad.read_h5ad(out)
    _assert_same(_in_memory(path, ScBERT.load(model_dir), batch_size=100), result)
    source = ad.read_h5ad(path)
    assert (result.X != source.X).nnz == 0 and result.obs_names.equals(source.obs_names)  # a copy of the input
    assert result.obs["celltype"].equals(source.obs["celltype"])
    assert not (tmp_path / "out.h5ad.partial").exists()
    assert _annotate_cli(path, model_dir, out) == 1  # exists: --overwrite needed

    emb_out = tmp_path / "emb.h5ad"
    assert (
        main(["embed", str(path), "--model", str(model_dir), "--out", str(emb_out), "-q", "--batch-size", "100"]) == 0
    )
    np.testing.assert_array_equal(ad.read_h5ad(emb_out).obsm["X_scbert"], result.obsm["X_scbert"])


def test_cli_resumes_after_an_interruption(allen, tmp_path, monkeypatch):
    from scbert_tl.tl import _job

    path, model_dir = allen
    run_chunks = _job.run_chunks
    computed: list[int] = []

    def interrupted_after(k):
        def wrapper(*args, **kwargs):
            for i, outputs in run_chunks(*args, **kwargs):
                if len(computed) == k:
                    raise KeyboardInterrupt
                computed.append(i)
                yield i, outputs

        return wrapper

    out = tmp_path / "out.h5ad"
    monkeypatch.setattr(_job, "run_chunks", interrupted_after(2))
    assert _annotate_cli(path, model_dir, out, "--chunk-size", "500", "--batch-size", "100") == 130
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "out.h5ad.partial").glob("chunk-*")) == [
        "chunk-000000.npz",
        "chunk-000001.npz",
    ]

    monkeypatch.setattr(_job, "run_chunks", interrupted_after(10**6))
    computed.clear()
    assert _annotate_cli(path, model_dir, out, "--chunk-size", "500", "--batch-size", "100") == 0
    assert computed == [2, 3, 4]  # only the chunks not done before
    _assert_same(_in_memory(path, ScBERT.load(model_dir), batch_size=100), ad.read_h5ad(out))

    # a partial run of other options is not mixed in: the run starts over
    monkeypatch.setattr(_job, "run_chunks", interrupted_after(1))
    computed.clear()
    out2 = tmp_path / "out2.h5ad"
    assert _annotate_cli(path, model_dir, out2, "--chunk-size", "500", "--batch-size", "100") == 130
    monkeypatch.setattr(_job, "run_chunks", interrupted_after(10**6))
    computed.clear()
    assert _annotate_cli(path, model_dir, out2, "--chunk-size", "1000", "--batch-size", "100") == 0
    assert computed == [0, 1, 2]
    _assert_same(ad.read_h5ad(out), ad.read_h5ad(out2))


@pytest.mark.slow
def test_torchrun_shards_equal_one_process(allen, tmp_path):
    path, model_dir = allen
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # one thread per process in both runs
    args = ["-m", "scbert_tl", "annotate", str(path), "--model", str(model_dir), "--embed", "--chunk-size", "400", "-q"]
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one.h5ad")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run(
        [*launcher, *args, "--out", str(tmp_path / "two.h5ad")], env=env, capture_output=True, text=True, timeout=240
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _assert_same(ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "two.h5ad"))
    assert not (tmp_path / "two.h5ad.partial").exists()


def test_file_rows_read_only_their_part_of_the_file(allen, monkeypatch):
    """Ranges of rows of a CSR matrix equal anndata's, at the edges too, without reading the whole ``indptr``."""
    import scipy.sparse as sp

    from scbert_tl.data import H5adFile

    path, _ = allen
    backed = ad.read_h5ad(path, backed="r")
    expected = {(a, b): sp.csr_matrix(backed.X[a:b]) for a, b in [(0, 1), (7, 900), (2400, 2500), (30, 30)]}
    backed.file.close()
    # the ranges must not go through anndata's sparse dataset, which reads every cell's offset
    monkeypatch.setattr("anndata.io.sparse_dataset", lambda *_: pytest.fail("read through sparse_dataset"))
    file = H5adFile(path)
    for (a, b), want in expected.items():
        got = file.rows("X", a, b)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert (got != want).nnz == 0
    assert file.rows("X", 2490, 2600).shape[0] == 10  # a range past the end stops at the last cell
