"""The evaluation protocols: scBERT fine-tuning beside baselines on the same cells, scored the same way.

A protocol chooses training and test cells (:mod:`._folds`), runs every method of a
:class:`~._comparison.Comparison` on them (:mod:`._methods`), scores each run with
:func:`~._comparison.score_row` and keeps a record in ``adata.uns`` (:func:`~._comparison.store`).
"""

from ._cross_validate import cross_validate
from ._imbalance import class_imbalance
from ._novel_type import novel_type_detection
from ._reference_size import reference_size_curve
from ._transfer import dataset_transfer

__all__ = [
    "class_imbalance",
    "cross_validate",
    "dataset_transfer",
    "novel_type_detection",
    "reference_size_curve",
]
