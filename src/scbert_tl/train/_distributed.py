"""The place of this process in a ``torchrun`` launch, and the few collective operations the loops need."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .._settings import settings

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """The place of this process in a ``torchrun`` launch (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows bars and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"Environment variable {name}={value!r} is not an integer (set by torchrun).") from e


@contextlib.contextmanager
def distributed_context(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), if any.

    Reads the environment when called (never at import). Initialises the default process group
    (NCCL when training on CUDA, Gloo on CPU) unless one exists, and destroys it on exit only when
    it was created here. Without those variables, or with ``WORLD_SIZE=1``, yields rank 0 of 1.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), False)
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistContext()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = settings.resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    if rank == 0:
        logger.info("Joined a %d-process %s group.", world, backend)
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, True)
    finally:
        dist.destroy_process_group()


def all_reduce(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def resolve_device(device: str | torch.device | None, ctx: DistContext) -> torch.device:
    dev = settings.resolve_device(device)
    if dev.type == "cuda" and ctx.distributed:
        dev = torch.device("cuda", ctx.local_rank)
    return dev
