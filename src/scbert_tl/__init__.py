"""scBERT for the scverse: Performer-based cell type annotation on AnnData."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _logging, datasets, model, pl, pp, tl
from ._scbert import ScBERT
from ._settings import settings

try:
    __version__ = version("scbert-tl")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

_logging.install()  # INFO and WARNING reach the notebook or shell (settings.verbosity); see _logging

__all__ = ["ScBERT", "datasets", "model", "pl", "pp", "settings", "tl", "__version__"]
