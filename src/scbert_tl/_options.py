"""The options of a pretraining run, declared once: :func:`scbert_tl.tl.pretrain`, ``scbert pretrain`` and the loop read them here.

Torch-free (the command line reads the defaults before anything heavy is imported). The public
tool keeps an explicit keyword signature for its documentation; a test keeps its defaults equal to
these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import os

Schedule = Literal["cosine", "linear", "constant"]


@dataclass(frozen=True)
class PretrainOptions:
    """What a pretraining run optimises, how it reads the data, and where it keeps its checkpoint.

    The meaning of each field is that of the argument of the same name of
    :func:`scbert_tl.tl.pretrain`. ``lr=None`` leaves the peak learning rate to the caller: the tool
    takes 1e-3 for a new model and 1e-4 when continuing one; the loop alone takes 1e-4.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int | None = None
    accumulate: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: float | int = 0.05
    schedule: Schedule = "cosine"
    max_grad_norm: float | None = 1.0
    mask_prob: float = 0.15
    replace_prob: float = 0.9
    redraw_every: int | None = 1000
    validation_size: float | int | None = None
    eval_every: int | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = 1000
    resume: bool = False
    stop_after: int | None = None
    chunk_size: int = 2048
    shuffle_buffer: int = 4
    gradient_checkpointing: bool = False
    random_state: int = 0

    @classmethod
    def of(cls, arguments: dict[str, Any], **changes: Any) -> PretrainOptions:
        """The options among a call's ``arguments`` (e.g. its ``locals()``), with ``changes`` applied."""
        return cls(**{**{f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}, **changes})

    def as_dict(self) -> dict[str, Any]:
        """The options as keyword arguments (shallow: values are not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
