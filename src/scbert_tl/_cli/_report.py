"""The report of ``scbert benchmark``: markdown tables, mean and spread over folds, the machine and versions, figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} logical CPUs, {cpu}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("scbert-tl", "torch", "scanpy", "anndata", "scikit-learn", "numpy", "celltypist"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table."""
    import numpy as np

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def mean_sd(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """``mean ± sd`` strings per group (sd over folds; blank sd with one fold)."""
    import numpy as np

    groups = frame.groupby(by, sort=False)[metrics]
    mean, sd = groups.mean(), groups.std()
    out = mean.copy().astype(object)
    for m in metrics:
        out[m] = [f"{a:.3f}" if np.isnan(b) else f"{a:.3f} ± {b:.3f}" for a, b in zip(mean[m], sd[m], strict=True)]
    out.insert(0, "folds", groups.size())
    return out.reset_index()


def save_figure(ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(ax.figure)


def json_default(value: Any) -> Any:
    """Plain values for :func:`json.dumps` (numpy scalars and arrays, tuples, sets; anything else as text)."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray | tuple | set):
        return list(value)
    return str(value)
