"""Cell type labels: their natural order (the classes a model learns, the protocols score and the plots show)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Sequence

_INTEGER = re.compile(r"[+-]?\d+")


def class_order(labels: pd.Series | np.ndarray | Sequence) -> list[str]:
    """The distinct labels as text, in their natural order.

    A categorical's own category order (the categories that occur); integer labels by value
    (``1, 2, 10``, not ``"1", "10", "2"``), whether stored as numbers or as text; other labels sorted
    as text. Every place that builds classes (fine-tuning, the evaluation protocols, the plots) uses it.
    """
    col = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    present = set(col.astype(str))
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories if str(c) in present]
    if all(_INTEGER.fullmatch(n) for n in present):
        return sorted(present, key=lambda n: (int(n), n))
    return sorted(present)
