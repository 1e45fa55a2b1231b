"""Pretraining checkpoints: written atomically, read safely (tensors and plain types only), and the same-run check on resume."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._files import as_umask_allows

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "scbert-tl-pretrain-checkpoint"
CHECKPOINT_VERSION = 1

# arguments that define the trajectory: a resumed run must use the same ones
TRAJECTORY_KEYS = (
    "random_state",
    "world_size",
    "batch_size",
    "accumulate",
    "epochs",
    "max_steps",
    "total_steps",
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
    "mask_prob",
    "replace_prob",
    "redraw_every",
    "chunk_size",
    "shuffle_buffer",
    "n_validation",
    "data",
)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with :func:`torch.save` atomically: a temporary file in the same folder, then :func:`os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_umask_allows(tmp, folder=False)  # mkstemp's file is private (0o600)
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a pretraining checkpoint (``weights_only=True``: tensors and plain Python types only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise RuntimeError(f"{path} could not be read as a pretraining checkpoint ({e}).") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} is not an scbert-tl pretraining checkpoint.")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise RuntimeError(f"{path} was written by a newer scbert-tl; upgrade to resume it.")
    return state


def check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path | None) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in TRAJECTORY_KEYS
        if plain(saved.get(k)) != plain(now.get(k))
    ]
    if diffs:
        raise ValueError(
            f"Cannot resume {path}: this call differs from the run that wrote it ({'; '.join(diffs)}). "
            "Resume with the same data and arguments, or start a new run in another checkpoint_dir."
        )


def plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
