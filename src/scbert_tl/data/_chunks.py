"""Cells taken a chunk at a time: the chunks of a streamed run, and whether its in-memory results fit.

Used by the streamed tools (:mod:`scbert_tl.tl._stream`, :mod:`scbert_tl.tl._job`); nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Cells read, binned and run at a time (rounded up to whole batches).
CHUNK_SIZE = 8192
#: Bytes per output value held by a tool at its peak: the float32 outputs, the float64 copies made from them.
RESULT_BYTES_PER_VALUE = 4 + 8 + 4


def is_dask(X: Any) -> bool:
    """Whether ``X`` is a dask array."""
    return type(X).__module__.split(".")[0] == "dask"


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """``(index, start, stop)`` of each chunk of ``n_cells`` cells."""
    return [(i, s, min(s + chunk_size, n_cells)) for i, s in enumerate(range(0, n_cells, chunk_size))]


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(n_cells: int, width: int, desc: str) -> None:
    """Refuse, before the work, in-memory results of ``n_cells x width`` that would not fit in the memory available."""
    need = n_cells * width * RESULT_BYTES_PER_VALUE
    available = available_memory()
    if available is not None and need > available:
        raise MemoryError(
            f"{desc}: the results for {n_cells} cells ({width} values each) would need about {need / 1e9:.1f} GB in "
            f"memory, more than the {available / 1e9:.1f} GB available. Run the shell command instead (scbert "
            f"{desc} IN.h5ad --model MODEL --out OUT.h5ad), which writes them into the output file a chunk at a time, "
            "or annotate a subset at a time."
        )
