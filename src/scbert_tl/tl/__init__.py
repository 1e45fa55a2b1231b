"""Tools: pretrain, fine-tune, annotate, embed, explain, evaluate."""

from ._annotate import annotate
from ._attention import attention
from ._embed import embed
from ._evaluation import class_imbalance, cross_validate, dataset_transfer, novel_type_detection, reference_size_curve
from ._finetune import finetune
from ._pretrain import pretrain

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
