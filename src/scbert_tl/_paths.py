"""Checks on the paths a command or tool will write or read, done before any work starts."""

from __future__ import annotations

import json
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def check_model_target(path: Path, *, overwrite: bool) -> bool:
    """Whether saving to ``path`` replaces a model there; raises when it may not be written (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a model is saved as a directory. Choose another path.")
    if not path.exists() or not any(path.iterdir()):
        check_writable(path)
        return False
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists and is not empty; pass overwrite=True (--overwrite in the shell) to replace it."
        )
    try:
        is_model = json.loads((path / "config.json").read_text()).get("format") == "scbert-tl"
    except (OSError, ValueError, AttributeError):
        is_model = False
    if not is_model:
        raise FileExistsError(f"{path} exists and is not an scbert-tl model folder; refusing to write into it.")
    check_writable(path)
    return True


def check_writable(path: Path) -> None:
    """Raise (before any work) when ``path``, or the nearest folder above it that exists, cannot be written."""
    folder = path if path.is_dir() else next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot write {path}: {folder} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"Cannot write {path}: the folder {folder} is not writable ({e.strerror}).") from e


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file (as an ``.h5ad`` is), by its signature."""
    import h5py

    return bool(h5py.is_hdf5(str(path)))
