"""scBERT for the scverse: Performer-based cell type annotation on AnnData."""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    # before torch loads its OpenMP runtime: waiting threads sleep instead of spinning, which keeps
    # several threads fast on a busy machine (see scbert_tl.train._runtime); a value already set wins
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _logging, datasets, model, pl, pp, tl  # noqa: E402
from ._scbert import ScBERT  # noqa: E402
from ._settings import settings  # noqa: E402
from ._version import __version__  # noqa: E402

_logging.install()  # INFO and WARNING reach the notebook or shell (settings.verbosity); see _logging

__all__ = ["ScBERT", "datasets", "model", "pl", "pp", "settings", "tl", "__version__"]
