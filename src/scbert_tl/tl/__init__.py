"""Tools: pretrain, fine-tune, annotate, embed, explain, evaluate."""

from ._annotate import annotate
from ._attention import attention
from ._cross_validate import cross_validate
from ._embed import embed
from ._finetune import finetune
from ._imbalance import class_imbalance
from ._novel_type import novel_type_detection
from ._pretrain import pretrain
from ._reference_size import reference_size_curve
from ._transfer import dataset_transfer

__all__ = [
    "annotate",
    "attention",
    "class_imbalance",
    "cross_validate",
    "dataset_transfer",
    "embed",
    "finetune",
    "novel_type_detection",
    "pretrain",
    "reference_size_curve",
]
