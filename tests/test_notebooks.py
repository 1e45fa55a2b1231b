"""Every tutorial in notebooks/ runs top to bottom (in its fast setting, SCBERT_TUTORIAL_FAST=1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PANEL = SHARED / "scbert_panglao_genes.txt"
PBMC3K = SHARED / "pbmc3k_counts.h5ad"
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# files of ../shared/data each notebook needs (the others use data bundled with scanpy); the panel
# could also be downloaded, which the tests do only with SCBERT_TEST_INTERNET=1
NEEDS = {
    "annotate_pbmc": [PANEL],
    "own_labels": [PBMC3K],
    "published_weights": [PANEL, PBMC3K],
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    online = os.environ.get("SCBERT_TEST_INTERNET") == "1"
    missing = [f for f in NEEDS.get(path.stem, []) if not f.exists() and not (f == PANEL and online)]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(f.name for f in missing)} in ../shared/data beside the project")

    # the kernel is a separate process: give it the offline asset cache the other tests use, one thread,
    # the notebook's data folder, and matplotlib's inline backend (not a non-interactive one set for pytest)
    cache = tmp_path / "cache"
    cache.mkdir()
    if PANEL.exists():
        shutil.copy(PANEL, cache / "scbert-panglao-genes")
    monkeypatch.setenv("SCBERT_DATA_DIR", str(cache))
    monkeypatch.setenv("SCBERT_TUTORIAL_FAST", "1")
    monkeypatch.setenv("SCBERT_TUTORIAL_DATA", str(SHARED))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.delenv("MPLBACKEND", raising=False)

    nb = nbformat.read(path, as_version=4)
    # the cell timeout guards against a hung kernel, it is no speed test: on a 2-core machine under a load
    # of 9 one fine-tuning cell took more than 600 s
    client = nbclient.NotebookClient(
        nb, timeout=3600, startup_timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
