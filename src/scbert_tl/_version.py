"""The installed version of scbert-tl (from the package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scbert-tl")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
