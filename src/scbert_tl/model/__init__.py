"""The scBERT network in pure PyTorch: no AnnData, no pandas.

Use this layer to embed scBERT in other torch code; :class:`scbert_tl.ScBERT` wraps it with a gene
panel, class names and AnnData-facing methods.
"""

from ._attention import attention_matrices, attention_received, column_sums
from ._config import ScBERTConfig
from ._convert import CheckpointError, detect_format, infer_config, load_into, to_own_state_dict
from ._favor import FavorAttention, linear_attention, orthogonal_random_matrix, softmax_features
from ._network import ClassifierHead, PerformerBlock, ScBERTNetwork

__all__ = [
    "CheckpointError",
    "ClassifierHead",
    "FavorAttention",
    "PerformerBlock",
    "ScBERTConfig",
    "ScBERTNetwork",
    "attention_matrices",
    "attention_received",
    "column_sums",
    "detect_format",
    "infer_config",
    "linear_attention",
    "load_into",
    "orthogonal_random_matrix",
    "softmax_features",
    "to_own_state_dict",
]
