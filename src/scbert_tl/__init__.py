"""scBERT for the scverse: Performer-based cell type annotation on AnnData."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from . import datasets, model, pl, pp, tl
from ._scbert import ScBERT
from ._settings import settings

try:
    __version__ = version("scbert-tl")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["ScBERT", "datasets", "model", "pl", "pp", "settings", "tl", "__version__"]
