"""Tools: pretrain, fine-tune, annotate, embed, explain."""

from ._annotate import annotate
from ._attention import attention
from ._embed import embed
from ._evaluate import cross_validate
from ._finetune import finetune
from ._pretrain import pretrain

__all__ = ["annotate", "attention", "cross_validate", "embed", "finetune", "pretrain"]
