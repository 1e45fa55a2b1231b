"""scBERT for the scverse: Performer-based cell type annotation on AnnData.

``import scbert_tl`` is light: the subpackages (``pp``, ``tl``, ``pl``, ``model``, ``datasets``) and
:class:`ScBERT` are imported on first use (``scbert.pp.bin`` imports ``scbert_tl.pp`` then), so that
the ``scbert`` command answers ``--help`` without loading torch or scanpy.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` when torch has not been imported yet and the
variable is not set already (a value already set wins). torch's OpenMP runtime reads it when torch
is first imported, which with this package happens later, on first use; waiting OpenMP threads then
sleep instead of spinning, which keeps several threads fast on a busy machine (see
:mod:`scbert_tl.train._runtime`). Import ``scbert_tl`` before ``torch`` to get it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _logging  # noqa: E402
from ._settings import settings  # noqa: E402
from ._version import __version__  # noqa: E402

if TYPE_CHECKING:
    from . import datasets, model, pl, pp, tl
    from ._scbert import ScBERT

_logging.install()  # INFO and WARNING reach the notebook or shell (settings.verbosity); see _logging

_SUBPACKAGES = ("datasets", "model", "pl", "pp", "tl")

__all__ = ["ScBERT", "datasets", "model", "pl", "pp", "settings", "tl", "__version__"]


def __getattr__(name: str) -> Any:
    """Import a subpackage or :class:`ScBERT` on first use (PEP 562)."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # also sets it as an attribute of the package
    if name == "ScBERT":
        from ._scbert import ScBERT

        globals()["ScBERT"] = ScBERT
        return ScBERT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
