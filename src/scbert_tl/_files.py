"""File permissions of what the package writes: as the user's umask allows, like any file they create."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where it is there, so that nothing changes it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (briefly)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike, *, folder: bool) -> None:
    """Give ``path`` the mode a new folder (``0o777``) or file (``0o666``) gets under the umask.

    :func:`tempfile.mkdtemp` and :func:`tempfile.mkstemp` create private ``0o700`` / ``0o600`` entries;
    a model or checkpoint moved into place from one would be unreadable to colleagues the umask lets in.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())
