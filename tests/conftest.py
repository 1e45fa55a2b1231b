from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PBMC3K = SHARED / "pbmc3k_counts.h5ad"
PANEL = SHARED / "scbert_panglao_genes.txt"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _offline_cache(tmp_path_factory):
    """Point the asset cache at a fresh folder, pre-filled with the panel from ../shared when present."""
    import scbert_tl as scbert

    cache = tmp_path_factory.mktemp("scbert-cache")
    if PANEL.exists():
        shutil.copy(PANEL, cache / "scbert-panglao-genes")
    old = scbert.settings._cachedir
    scbert.settings.cachedir = cache
    old_verbosity = scbert.settings.verbosity
    scbert.settings.verbosity = 1
    yield cache
    scbert.settings.cachedir = old
    scbert.settings.verbosity = old_verbosity


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP waits make every small op slow."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def panel_genes():
    if not PANEL.exists():
        pytest.skip(f"needs the scBERT panel at {PANEL} (../shared/data beside the project)")
    return PANEL.read_text().split()


@pytest.fixture(scope="session")
def pbmc3k_path():
    if not PBMC3K.exists():
        pytest.skip(f"needs the real PBMC3k counts at {PBMC3K} (../shared/data beside the project)")
    return PBMC3K


@pytest.fixture
def pbmc3k(pbmc3k_path):
    import anndata as ad

    return ad.read_h5ad(pbmc3k_path)


@pytest.fixture(autouse=True)
def _restore_settings():
    """Tests (and the shell command they call) may change settings; each test starts from the same ones."""
    import scbert_tl as scbert

    saved = (scbert.settings.verbosity, scbert.settings.device, scbert.settings.batch_size)
    yield
    scbert.settings.verbosity, scbert.settings.device, scbert.settings.batch_size = saved
