"""Cells streamed from sparse bins in bounded memory: a seeded plan of shards, epochs and batches.

The sources (:class:`~scbert_tl.data.TokenSource`) return rows of cells as CSR int8 tokens in
panel order; they live in :mod:`scbert_tl.data`. A :class:`StreamPlan` cuts the sources
into chunks of rows, holds out a seeded set of validation cells, gives each process of a
distributed run its own shard of chunks, and streams shuffled batches: per epoch the shard's
chunks are put in a random order, read a few at a time (a "block" of ``shuffle_buffer`` chunks),
and the cells of a block are shuffled. At most one block plus one batch of cells is held in memory,
whatever the corpus size.

Every random choice is a pure function of the seed and a key (purpose, epoch, rank, block) through
:class:`numpy.random.SeedSequence` spawn keys, so any position in the stream can be re-entered
exactly, e.g. when a run resumes from a checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..data import TokenSource

logger = logging.getLogger(__name__)

# purposes of derived random streams (first spawn key); never renumber, checkpoints depend on them
SPLIT, SHARD, ORDER, BLOCK, MASK, EVAL, REDRAW, HEAD, SAMPLE = range(9)


def derive_seed(seed: int, *key: int) -> np.random.SeedSequence:
    """The seed sequence of one random stream: ``SeedSequence(seed).spawn(...)`` followed along ``key``.

    ``derive_seed(s, a, b)`` equals ``SeedSequence(s).spawn(a + 1)[a].spawn(b + 1)[b]``: independent
    streams, one per purpose, epoch, rank, ..., each reproducible on its own.
    """
    return np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))


def derive_rng(seed: int, *key: int) -> np.random.Generator:
    """A :class:`numpy.random.Generator` on the stream :func:`derive_seed` names."""
    return np.random.default_rng(derive_seed(seed, *key))


def derive_int(seed: int, *key: int) -> int:
    """A 63-bit integer seed (e.g. for :meth:`torch.Generator.manual_seed`) for the stream ``key``."""
    return int(derive_seed(seed, *key).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- plan
def resolve_validation_size(validation_size: float | int | None, n_cells: int) -> int:
    """Held-out cells for ``validation_size``: None = 5% capped at 2,000; a float in [0, 1) a fraction; an int a count."""
    if validation_size is None:
        n = min(round(0.05 * n_cells), 2000)
    elif isinstance(validation_size, bool) or not isinstance(validation_size, int | float):
        raise TypeError(f"validation_size must be None, a fraction or a number of cells, got {validation_size!r}.")
    elif isinstance(validation_size, float):
        if not 0 <= validation_size < 1:
            raise ValueError(f"A fractional validation_size must be in [0, 1), got {validation_size}.")
        n = round(validation_size * n_cells)
    else:
        n = validation_size
    if n < 0 or n >= n_cells:
        raise ValueError(f"validation_size={validation_size!r} leaves no training cells out of {n_cells}.")
    return int(n)


class StreamPlan:
    """Chunks, held-out cells, shards and shuffled batches over a list of sources (see the module docstring).

    Parameters
    ----------
    sources
        The corpus, in order; global cell numbers run through them one after another.
    chunk_size
        Rows per read. Chunks never span two sources.
    shuffle_buffer
        Chunks read and shuffled together.
    validation_size
        Held-out cells (see :func:`resolve_validation_size`), chosen uniformly from the whole corpus.
    seed
        Seed of every random choice.
    rank, world_size
        This process and the number of processes; each reads its own shard of chunks.
    max_open
        Files kept open at once (the least recently read is closed first).
    """

    def __init__(
        self,
        sources: Sequence[TokenSource],
        *,
        chunk_size: int = 2048,
        shuffle_buffer: int = 4,
        validation_size: float | int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_open: int = 8,
    ) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("No data to pretrain on: the list of inputs is empty.")
        for s in self.sources:
            if s.n_cells == 0:
                raise ValueError(f"{s.name} has no cells; remove it from the inputs.")
        n_genes = {s.n_genes for s in self.sources}
        if len(n_genes) != 1:
            raise ValueError(f"All sources must be in the same panel; got panel sizes {sorted(n_genes)}.")
        for name, value in (("chunk_size", chunk_size), ("shuffle_buffer", shuffle_buffer), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        self.n_genes = n_genes.pop()
        self.chunk_size, self.shuffle_buffer, self.seed = chunk_size, shuffle_buffer, int(seed)
        self.rank, self.world_size, self.max_open = rank, world_size, max_open
        self._open: OrderedDict[int, None] = OrderedDict()

        sizes = np.array([s.n_cells for s in self.sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_cells = int(self.offsets[-1])
        # chunks: (source, global start, global stop)
        src, start = [], []
        for i, n in enumerate(sizes):
            starts = np.arange(0, n, chunk_size)
            src.append(np.full(starts.size, i))
            start.append(starts + self.offsets[i])
        self.chunk_source = np.concatenate(src)
        self.chunk_start = np.concatenate(start)
        self.chunk_stop = np.minimum(self.chunk_start + chunk_size, self.offsets[self.chunk_source + 1])

        n_val = resolve_validation_size(validation_size, self.n_cells)
        val = derive_rng(self.seed, SPLIT).choice(self.n_cells, size=n_val, replace=False) if n_val else []
        self.validation = np.sort(np.asarray(val, dtype=np.int64))
        lo = np.searchsorted(self.validation, self.chunk_start)
        hi = np.searchsorted(self.validation, self.chunk_stop)
        self.chunk_train = (self.chunk_stop - self.chunk_start) - (hi - lo)

        order = derive_rng(self.seed, SHARD).permutation(self.chunk_start.size)
        self.shards = [np.sort(order[r::world_size]) for r in range(world_size)]
        self.shard_train = np.array([int(self.chunk_train[s].sum()) for s in self.shards], dtype=np.int64)
        if (self.shard_train == 0).any():
            raise ValueError(
                f"{self.chunk_start.size} chunks of {chunk_size} cells cannot give each of {world_size} processes "
                "training cells; use a smaller chunk_size or fewer processes."
            )

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def n_train(self) -> int:
        """Training cells in the corpus (all shards)."""
        return int(self.shard_train.sum())

    @property
    def shard(self) -> np.ndarray:
        """The chunk ids of this rank."""
        return self.shards[self.rank]

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches every rank runs per epoch (the shortest shard's; longer shards leave out their last few cells)."""
        return int(min(math.ceil(int(n) / batch_size) for n in self.shard_train))

    def epoch_blocks(self, epoch: int) -> list[np.ndarray]:
        """The chunks of this rank for ``epoch``, in read order, grouped into blocks of ``shuffle_buffer``."""
        order = derive_rng(self.seed, ORDER, epoch, self.rank).permutation(self.shard)
        return [order[i : i + self.shuffle_buffer] for i in range(0, order.size, self.shuffle_buffer)]

    def position(self, epoch: int, batches_done: int, batch_size: int) -> dict[str, int]:
        """Where this rank's stream stands after ``batches_done`` batches of ``epoch``: block, chunk and offset."""
        cells = min(batches_done * batch_size, int(self.shard_train[self.rank]))
        blocks = self.epoch_blocks(epoch)
        sizes = np.array([self.chunk_train[b].sum() for b in blocks])
        ends = np.cumsum(sizes)
        b = int(np.searchsorted(ends, cells, side="right"))
        if b >= len(blocks):
            return {"epoch": epoch, "block": len(blocks), "chunk": -1, "offset": 0, "cells": cells}
        return {
            "epoch": epoch,
            "block": b,
            "chunk": int(blocks[b][0]),
            "offset": int(cells - (ends[b] - sizes[b])),
            "cells": cells,
        }

    # ------------------------------------------------------------------------------------------ reading
    def _read(self, source: int, start: int, stop: int) -> sp.csr_matrix:
        src = self.sources[source]
        out = src.read(start, stop)
        self._touch(source)
        return out

    def _touch(self, source: int) -> None:
        self._open[source] = None
        self._open.move_to_end(source)
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            self.sources[old].close()

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, sp.csr_matrix]:
        """The training cells of one chunk: global ids and tokens (held-out cells removed)."""
        s = int(self.chunk_source[chunk])
        g0, g1 = int(self.chunk_start[chunk]), int(self.chunk_stop[chunk])
        local0 = g0 - int(self.offsets[s])
        mat = self._read(s, local0, local0 + (g1 - g0))
        if mat.shape[0] != g1 - g0:
            raise RuntimeError(f"{self.sources[s].name} returned {mat.shape[0]} rows for a chunk of {g1 - g0}.")
        ids = np.arange(g0, g1)
        lo, hi = np.searchsorted(self.validation, [g0, g1])
        if hi > lo:
            keep = np.ones(g1 - g0, dtype=bool)
            keep[self.validation[lo:hi] - g0] = False
            ids, mat = ids[keep], mat[keep]
        return ids, mat

    def read_block(self, epoch: int, block: int, chunks: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """Read the chunks of one block and shuffle their cells (seeded by epoch, rank and block)."""
        parts = [self.read_chunk(int(c)) for c in chunks]
        ids = np.concatenate([p[0] for p in parts])
        mat = sp.vstack([p[1] for p in parts], format="csr")
        perm = derive_rng(self.seed, BLOCK, epoch, self.rank, block).permutation(ids.size)
        return ids[perm], mat[perm]

    def iter_batches(
        self, epoch: int, batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield ``(global cell ids, tokens)`` batches ``start:stop`` of this rank's stream for ``epoch``.

        Every batch has ``batch_size`` cells except possibly the last of the shard. Without ``stop``
        the whole shard is streamed (every training cell of the shard exactly once); the training
        loop passes :meth:`batches_per_epoch` so that all ranks run the same number of batches.
        Starting at batch ``start`` reads only the blocks from there on.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        n_cells = int(self.shard_train[self.rank])
        cell = min(start * batch_size, n_cells)
        end = n_cells if stop is None else min(stop * batch_size, n_cells)
        blocks = self.epoch_blocks(epoch)
        sizes = np.array([self.chunk_train[b].sum() for b in blocks])
        ends = np.cumsum(sizes)
        b = int(np.searchsorted(ends, cell, side="right"))
        offset = int(cell - (ends[b] - sizes[b])) if b < len(blocks) else 0
        ids_parts: list[np.ndarray] = []
        mat_parts: list[sp.csr_matrix] = []
        pending = 0
        while cell < end and b < len(blocks):
            ids, mat = self.read_block(epoch, b, blocks[b])
            i = offset
            offset = 0
            while i < ids.size and cell < end:
                n = min(batch_size - pending, ids.size - i, end - cell)
                ids_parts.append(ids[i : i + n])
                mat_parts.append(mat[i : i + n])
                i, cell, pending = i + n, cell + n, pending + n
                if pending == batch_size or cell == end:
                    yield np.concatenate(ids_parts), sp.vstack(mat_parts, format="csr")
                    ids_parts, mat_parts, pending = [], [], 0
            b += 1

    def validation_cells(self) -> tuple[np.ndarray, sp.csr_matrix]:
        """The share of the held-out cells of this rank (every ``world_size``-th): global ids and tokens."""
        ids = self.validation[self.rank :: self.world_size]
        if ids.size == 0:
            return ids, sp.csr_matrix((0, self.n_genes), dtype=np.int8)
        src = np.searchsorted(self.offsets, ids, side="right") - 1
        parts = []
        for s in np.unique(src):
            local = ids[src == s] - self.offsets[s]
            parts.append(self.sources[s].take(local))
            self._touch(int(s))
        return ids, sp.vstack(parts, format="csr")

    def close(self) -> None:
        """Close every open file."""
        for s in self.sources:
            s.close()
        self._open.clear()

    def describe(self) -> list[dict[str, int | str]]:
        """The corpus for provenance: each source's name and cell count."""
        return [{"name": s.name, "n_cells": int(s.n_cells)} for s in self.sources]
