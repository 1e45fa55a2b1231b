"""A model run over an ``.h5ad`` file in bounded memory that resumes after an interruption and splits across processes.

The cells are cut into chunks (:func:`~scbert_tl.data.chunk_bounds`). Each completed chunk's
outputs are saved at once as a file of their own in a work folder beside the output
(``OUT.partial/``; written under a temporary name, then renamed, so a file there is always whole),
so a run that is interrupted (Ctrl-C, a lost job, a crash) continues where it stopped when the same
command runs again: completed chunks are not recomputed. Under ``torchrun`` each process takes a
contiguous shard of the chunks and writes them there; after a barrier, process 0 copies the input
to the output file, writes the results into it a chunk at a time, and removes the work folder.
The chunks, and so the batches, are the same whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .._settings import settings
from ..data import FileMatrix, H5adFile, chunk_bounds, gene_ids, matrix_key, recorded_params
from ._stream import ModelTokens, chunk_size_for, run_chunks, run_options

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import h5py

    from .._scbert import ScBERT
    from ._stream import OutputFn

logger = logging.getLogger(__name__)

JOB_VERSION = 1


def model_digest(model: ScBERT) -> str:
    """A fingerprint of a model's weights, genes, classes and calibration (what decides its outputs)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([model.genes, model.classes, model.calibration, model.unmeasured], default=str).encode())
    return h.hexdigest()[:32]


class FileJob:
    """A streamed run of a model's output functions over the cells of an ``.h5ad`` file (see the module docstring).

    Parameters
    ----------
    path
        The input ``.h5ad``; its expression (``X``, a layer or ``raw/X``, as ``layer``/``use_raw`` or the
        file's last :func:`~scbert_tl.pp.bin` say) is read a chunk at a time and binned on the fly.
    out
        The output ``.h5ad`` (written by :meth:`finish`); the work folder is ``OUT.partial`` beside it.
    model
        The model.
    fns
        Named output functions ``fn(network, tokens) -> (cells, width)``, each saved per chunk.
    desc
        Name of the progress bar.
    **options
        The input and compute options of the tools (:data:`~scbert_tl.tl._stream.RUN_OPTIONS`):
        ``gene_key``, ``layer``, ``use_raw`` (default: those recorded by the file's last
        :func:`~scbert_tl.pp.bin`), ``chunk_size`` (cells per chunk, rounded up to whole batches; default
        :data:`~scbert_tl.data.CHUNK_SIZE`), ``batch_size``, ``device``, ``precision``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        out: str | os.PathLike,
        model: ScBERT,
        fns: dict[str, OutputFn],
        *,
        desc: str = "scBERT",
        **options: Any,
    ) -> None:
        from anndata import AnnData

        o = run_options(options)
        self.path, self.out = Path(path), Path(out)
        self.model, self.fns, self.desc = model, fns, desc
        self.device, self.precision = o["device"], o["precision"]
        self.file = H5adFile(self.path)
        if self.file.n_obs == 0:
            raise ValueError(f"{self.path} has no cells.")
        params = recorded_params(self.file.uns)
        params.update({k: o[k] for k in ("gene_key", "layer", "use_raw") if o[k] is not None})
        var = self.file.raw_var if params.get("use_raw") else self.file.var
        if var is None:
            raise ValueError(f"{self.path} has no raw; drop use_raw (--use-raw) to read X.")
        key = matrix_key(params)
        if key.startswith("layers/") and key.removeprefix("layers/") not in self.file.layers:
            raise KeyError(f"{self.path} has no layer {key.removeprefix('layers/')!r}; its layers: {self.file.layers}.")
        self.matrix = FileMatrix(self.file, params)
        self.tokens = ModelTokens(
            self.matrix, f"{self.path.name}:{key}", gene_ids(AnnData(var=var), params.get("gene_key")), model
        )
        self.n_cells = self.file.n_obs
        self.batch_size, self.chunk_size = chunk_size_for(model.network, o["chunk_size"], o["batch_size"], self.device)
        self.bounds = chunk_bounds(self.n_cells, self.chunk_size)
        self.work = self.out.parent / f"{self.out.name}.partial"
        stat = self.path.stat()
        self.record = {
            "version": JOB_VERSION,
            "input": str(self.path.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "input_params": params,
            "model": model_digest(model),
            "outputs": sorted(fns),
            "n_cells": self.n_cells,
            "chunk_size": self.chunk_size,
            "batch_size": self.batch_size,
            "precision": str(self.precision),
        }

    # ------------------------------------------------------------------------------------------ chunks
    def _chunk_file(self, i: int) -> Path:
        return self.work / f"chunk-{i:06d}.npz"

    def done(self, i: int) -> bool:
        """Whether chunk ``i`` is complete."""
        return self._chunk_file(i).exists()

    def shard(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
        """The chunks ``(index, start, stop)`` of process ``rank``: a contiguous share."""
        n = len(self.bounds)
        return self.bounds[rank * n // world_size : (rank + 1) * n // world_size]

    def prepare(self) -> None:
        """Create the work folder, or check that the one there belongs to this job (else start over)."""
        job_file = self.work / "job.json"
        if job_file.exists():
            try:
                saved = json.loads(job_file.read_text())
            except (OSError, ValueError):
                saved = None
            if saved == json.loads(json.dumps(self.record)):
                n_done = sum(self.done(i) for i, _, _ in self.bounds)
                if n_done:
                    logger.info(
                        "%s: resuming: %d of %d chunks are already done (in %s)",
                        self.desc,
                        n_done,
                        len(self.bounds),
                        self.work,
                    )
                return
            logger.warning(
                "%s holds the partial results of another run (other input, model or options); starting over.", self.work
            )
            shutil.rmtree(self.work)
        elif self.work.exists() and any(self.work.iterdir()):
            raise FileExistsError(f"{self.work} exists and is not a work folder of scbert; move it away or remove it.")
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.work / f".job.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, job_file)

    def run(self, rank: int = 0, world_size: int = 1) -> int:
        """Compute the chunks of this process's shard that are not done yet; returns how many were computed."""
        shard = self.shard(rank, world_size)
        todo = [b for b in shard if not self.done(b[0])]
        total = sum(stop - start for _, start, stop in shard)
        initial = total - sum(stop - start for _, start, stop in todo)
        label = self.desc if world_size == 1 else f"{self.desc} (process {rank} of {world_size})"
        bar = tqdm(total=total, initial=initial, desc=label, unit="cells", disable=not settings.progress)
        computed = 0
        try:
            for i, outputs in run_chunks(
                self.model.network,
                lambda a, b: self.tokens(self.matrix[a:b], a),
                self.fns,
                todo,
                batch_size=self.batch_size,
                device=self.device,
                precision=self.precision,
                bar=bar,
            ):
                tmp = self.work / f".chunk-{i:06d}.{os.getpid()}.tmp"
                with open(tmp, "wb") as fh:
                    np.savez(fh, **outputs)
                os.replace(tmp, self._chunk_file(i))
                computed += 1
        except BaseException:
            done = sum(self.done(i) for i, _, _ in self.bounds)
            logger.warning(
                "%s: stopped with %d of %d chunks done; they are kept in %s: run the same command again to continue.",
                self.desc,
                done,
                len(self.bounds),
                self.work,
            )
            raise
        finally:
            bar.close()
        return computed

    def results(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(start, stop, outputs)`` of every chunk, in order (all chunks must be done)."""
        for i, start, stop in self.bounds:
            with np.load(self._chunk_file(i)) as z:
                yield start, stop, {k: z[k] for k in z.files}

    def finish(self, write: Callable[[FileJob, h5py.File], None]) -> None:
        """Copy the input to the output, let ``write`` add the results to it (open for writing), move it into place."""
        import h5py

        missing = [i for i, _, _ in self.bounds if not self.done(i)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} chunks are missing in {self.work} (e.g. chunk {missing[0]}); run again."
            )
        tmp = self.work / "output.h5ad"
        shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "r+") as f:
            write(self, f)
        os.replace(tmp, self.out)
        shutil.rmtree(self.work)


def run_file_job(make: Callable[[], FileJob], write: Callable[[FileJob, h5py.File], None], device: str | None) -> bool:
    """Run a :class:`FileJob` made by ``make``: alone, or as one process of a ``torchrun`` launch; returns whether this process wrote the output.

    Process 0 prepares the work folder, every process computes its shard, and process 0 writes the
    output once all are done.
    """
    import torch.distributed as dist

    from ..train._distributed import distributed_context
    from ._pretrain import _main_rank_only

    with distributed_context(device) as ctx, _main_rank_only(ctx):
        job = make()
        if ctx.is_main:
            job.prepare()
        if ctx.distributed:
            dist.barrier()
        job.run(ctx.rank, ctx.world_size)
        if ctx.distributed:
            dist.barrier()
        if ctx.is_main:
            job.finish(write)
        return ctx.is_main
