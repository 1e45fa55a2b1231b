"""Batched inference: tokens to the device as int8, autocast where asked, results back as numpy.

``scbert.settings.compile = True`` (or the environment variable ``SCBERT_COMPILE=1``) runs inference
through ``torch.compile``'d encoder blocks (off by default: on CPU it measured no faster than the
fused eager path).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._settings import settings
from ._runtime import cpu_runtime

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ..data import TokenMatrix
    from ..model import ScBERTConfig, ScBERTNetwork


def batch_indices(
    n: int | np.ndarray, batch_size: int, *, shuffle: bool = False, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Yield index arrays of at most ``batch_size`` cells, in order or shuffled by ``rng``."""
    idx = np.arange(n) if np.isscalar(n) else np.asarray(n)
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs an rng.")
        idx = rng.permutation(idx)
    for start in range(0, idx.size, batch_size):
        yield idx[start : start + batch_size]


#: Activation memory of one inference batch on CPU (about 30 cells of the compact model, one of the full).
CPU_INFERENCE_BYTES = 256 * 1024**2


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def activation_bytes_per_cell(config: ScBERTConfig, *, training: bool = False, dtype: torch.dtype | None = None) -> int:
    """Bytes of activations one cell holds at the peak of a forward pass (or a training step), fused path.

    One block holds the residual stream and its float32 copies, the normalised input, q/k/v, the
    attention output (float32, then cast), the output projection and the feed-forward hidden layer
    before and after its activation; the fused FAVOR+ keeps no ``positions x features`` matrices (its
    chunks are :func:`chunk_bytes`). A training step keeps every block's activations for the backward
    pass, plus about one block of gradients in flight.
    """
    act = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    dim, inner, hidden = config.dim, config.heads * config.dim_head, config.dim * config.ff_mult
    block = 4 * 2 * dim + act * dim + act * 3 * inner + (4 + act) * inner + act * dim + 2 * act * hidden
    blocks = config.depth + 1 if training else 1
    return int(config.seq_len * block * blocks)


def chunk_bytes(device: torch.device) -> int:
    """Working memory of the fused FAVOR+ chunks (features, their gradients, scratch), independent of batch size."""
    from ..model import _favor

    elements = _favor.CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _favor.CPU_CHUNK_ELEMENTS
    return 3 * 4 * elements


def auto_batch_size(
    config: ScBERTConfig, device: torch.device, *, training: bool = False, dtype: torch.dtype | None = None
) -> int:
    """Cells per batch that fit the device for this architecture (a conservative estimate).

    ``settings.batch_size`` wins when it is a number. On CUDA the budget is 60% of the free device
    memory less the fused attention's chunk memory. On CPU it is 2 GiB for training and
    :data:`CPU_INFERENCE_BYTES` for inference: larger CPU batches do not raise throughput (the compact
    model's inference CPU time per cell is the same from 32 to 256 cells) while memory grows with them,
    and a cell's result does not depend on its batch-mates (in the last bit it can depend on the batch's
    size, through the CPU kernels chosen for it). ``dtype`` is the autocast dtype
    (``None``: the settings' choice for ``device``).
    """
    if settings.batch_size != "auto":
        return int(settings.batch_size)
    device = torch.device(device)
    if dtype is None:
        dtype = settings.resolve_dtype(device)
    per_cell = activation_bytes_per_cell(config, training=training, dtype=dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.6 * free - chunk_bytes(device)
    else:
        budget = 2 * 1024**3 if training else CPU_INFERENCE_BYTES
    return int(max(1, min(512, budget // max(per_cell, 1))))


@contextlib.contextmanager
def compiled_blocks(network: ScBERTNetwork, enabled: bool = True):
    """Run ``network``'s encoder blocks through ``torch.compile`` inside the ``with`` block; restored after.

    The blocks are swapped for their compiled wrappers in place (same parameters), so everything that
    calls the network (``encode``, ``forward``, ``mlm_logits``) uses them. Compilation happens on the
    first batch and is cached by torch for later calls.
    """
    if not enabled:
        yield network
        return
    originals = list(network.layers)
    try:
        for i, layer in enumerate(originals):
            network.layers[i] = torch.compile(layer)
        yield network
    finally:
        for i, layer in enumerate(originals):
            network.layers[i] = layer


def check_compute(
    device: str | torch.device | None = None, precision: str | None = None, batch_size: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and autocast dtype of a run, resolved (and ``batch_size`` checked) before a tool changes anything."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer (or None for the setting), got {batch_size!r}.")
    dev = settings.resolve_device(device)
    return dev, settings.resolve_dtype(dev, precision)


@torch.inference_mode()
def run_batches(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    fn: Callable[[ScBERTNetwork, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    *,
    rows: np.ndarray | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    desc: str = "scBERT",
    progress: bool = True,
) -> list[np.ndarray]:
    """Apply ``fn(network, tokens_on_device)`` to every batch of cells; concatenate the outputs as float32 numpy.

    ``fn`` returns one tensor, or a tuple of tensors, with the cells along the first axis. On CUDA the
    next batch is prepared and copied (pinned, asynchronously) while the current one computes.
    ``progress=False`` shows no bar (a caller that runs chunk after chunk shows its own).
    """
    dev, dtype = check_compute(device, precision, batch_size)
    was_training = network.training
    network.eval().to(dev)
    rows = np.arange(tokens.n_cells) if rows is None else np.asarray(rows)
    batch_size = batch_size or auto_batch_size(network.config, dev, dtype=dtype)
    outputs: list[list[np.ndarray]] = []
    bar = tqdm(
        total=rows.size,
        desc=desc,
        unit="cells",
        disable=not (progress and settings.progress) or rows.size <= batch_size,
    )

    def load(idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(tokens.dense(idx))
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
        return x

    batches = iter(batch_indices(rows, batch_size))
    idx = next(batches, None)
    x = load(idx) if idx is not None else None
    try:
        with cpu_runtime(dev, desc=desc), compiled_blocks(network, settings.compile):
            while idx is not None:
                with autocast(dev, dtype):
                    out = fn(network, x)
                done = idx.size
                idx = next(batches, None)
                x = load(idx) if idx is not None else None  # overlaps the device's work on `out`
                out = out if isinstance(out, tuple) else (out,)
                outputs.append([o.float().cpu().numpy() for o in out])
                bar.update(done)
    finally:
        bar.close()
        network.train(was_training)
    n_out = len(outputs[0]) if outputs else 0
    return [np.concatenate([o[i] for o in outputs]) for i in range(n_out)]
