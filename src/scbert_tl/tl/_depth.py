"""Depth augmentation for fine-tuning: training cells thinned to a lower sequencing depth, then binned as ``pp.bin`` does.

A reference sequenced deeply (Smart-seq2 reads, a deep 10x run) and a shallow query (droplets with
a few thousand UMIs) differ in far more than scale: at low depth most genes of a cell are not
detected at all and the detected ones fall into coarser bins. A model that met only the deep
cells reads the shallow ones as another cell type. Thinning a training cell's counts (each count
kept with probability ``p``, a binomial draw) gives the cell as a shallower run would have measured
it, so the model meets every depth in training.

Another technology also measures each gene with its own efficiency (gene length with full-length
protocols, capture, sequence): with ``gene_bias`` the thinned cells of a step are drawn with one
capture factor per gene for the whole step, ``exp(N(0, gene_bias**2))``, as if that step's cells came
from another protocol (a Poisson draw of ``count * p * factor`` instead of the binomial one).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._logging import quieted
from ..data import gene_ids, in_memory, matrix
from ..pp._binning import bin_counts, prepare_binning

if TYPE_CHECKING:
    from anndata import AnnData

    from .._scbert import ScBERT
    from ..data import TokenMatrix

logger = logging.getLogger(__name__)

THINNED_SHARE = 0.5  # share of the training cells of each step that are thinned


class DepthAugmentation:
    """Dense tokens of training cells, half of them thinned to a depth drawn log-uniformly between ``min_depth`` and their own.

    Parameters
    ----------
    counts
        ``(training cells, model genes)`` counts in panel order.
    library
        Each training cell's total count over all its genes.
    n_bins
        The model's expression bins.
    library_normalised
        Whether bins are normalised by the total over all genes (``"library"``) or over the panel genes.
    tokens
        All cells' tokens (their unmeasured genes and fill token are used for the thinned cells too).
    rows
        The training cells: rows of ``tokens``, in the order of ``counts``.
    min_depth
        Fewest total counts a cell is thinned to.
    gene_bias
        Standard deviation of the log of the per-gene capture factors drawn for each step's thinned
        cells; ``0``: none (each count kept with the same chance).
    seed
        Seed of the draws (which cells, what depth, which counts).
    """

    def __init__(
        self,
        counts: sp.csr_matrix,
        library: np.ndarray,
        n_bins: int,
        *,
        library_normalised: bool,
        tokens: TokenMatrix,
        rows: np.ndarray,
        min_depth: float,
        gene_bias: float = 0.0,
        seed: int,
    ) -> None:
        self.position = np.full(tokens.n_cells, -1, dtype=np.int64)  # a row of tokens -> its row of counts
        self.position[rows] = np.arange(len(rows))
        self.counts = counts
        self.library = library
        self.panel_totals = np.asarray(counts.sum(axis=1)).ravel()
        self.n_bins = n_bins
        self.library_normalised = library_normalised
        self.tokens = tokens
        self.min_depth = float(min_depth)
        self.gene_bias = float(gene_bias)
        self.rng = np.random.default_rng([seed, 0xDE97])

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), n_genes)`` int8 tokens of the cells ``rows``, about half of them thinned."""
        x = self.tokens.dense(rows)
        local = self.position[rows]
        if (local < 0).any():
            raise ValueError("Depth augmentation was asked for cells it was not prepared for (not training cells).")
        depth = self.library[local]
        chosen = (self.rng.random(len(rows)) < THINNED_SHARE) & (depth > self.min_depth)
        if not chosen.any():
            return x
        picked = local[chosen]
        depth = depth[chosen]
        target = np.exp(self.rng.uniform(np.log(self.min_depth), np.log(depth)))
        p = target / depth
        sub = self.counts[picked]
        p_counts = np.repeat(p, np.diff(sub.indptr))
        if self.gene_bias > 0:  # one capture factor per gene for the step: another protocol's view of the cells
            factor = np.exp(self.rng.normal(0.0, self.gene_bias, sub.shape[1]))
            kept = self.rng.poisson(sub.data * p_counts * factor[sub.indices])
        else:
            kept = self.rng.binomial(sub.data.astype(np.int64), p_counts)
        thinned = sp.csr_matrix((kept.astype(np.float64), sub.indices, sub.indptr), shape=sub.shape)
        library = None
        if self.library_normalised:  # the cell's other genes are thinned alike
            rest = np.maximum(np.round(self.library[picked] - self.panel_totals[picked]), 0).astype(np.int64)
            library = np.asarray(thinned.sum(axis=1)).ravel() + self.rng.binomial(rest, p)
        bins = bin_counts(thinned, library, self.n_bins).toarray()
        measured = self.tokens.measured
        x[np.ix_(np.flatnonzero(chosen), np.flatnonzero(measured))] = bins[:, measured]
        return x


def depth_augmentation(
    adata: AnnData,
    model: ScBERT,
    tokens: TokenMatrix,
    rows: np.ndarray,
    *,
    min_depth: float,
    gene_bias: float = 0.0,
    seed: int,
    gene_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
) -> DepthAugmentation | None:
    """Depth augmentation of the cells ``rows`` of ``adata`` for ``model``; ``None`` (logged) when it cannot apply.

    It needs counts: raw counts, or normalised values from which :func:`scbert_tl.pp.bin` recovers
    them. When any value of the training cells is not a whole count, nothing is thinned (logged).
    """
    X, where = matrix(adata, layer, bool(use_raw))
    # the same preparation as the bins' (pp.bin said what it found about the input; not again here)
    with quieted(logging.getLogger("scbert_tl.pp"), below=logging.ERROR):
        binning = prepare_binning(
            X, where, gene_ids(adata, gene_key), panel=model, n_bins=model.n_bins, normalize=model.normalization
        )
    counts, library = binning.panel_counts(in_memory(X[rows]))  # the training cells' only
    whole = counts.data == np.round(counts.data)
    if not whole.all():
        logger.info(
            "Depth augmentation is off: %s holds values that are not counts (%.1f%% of them), so its cells cannot be "
            "thinned to a lower depth. Pass raw counts (layer=...) to use it.",
            where,
            100 * (1 - whole.mean()),
        )
        return None
    deep = int((library > min_depth).sum())
    logger.info(
        "Depth augmentation: in each step about half of the training cells are thinned to between %g counts and their "
        "own depth (%d of %d cells are deeper than %g; median depth %g)%s",
        min_depth,
        deep,
        rows.size,
        min_depth,
        float(np.median(library)) if rows.size else 0.0,
        f", with per-gene capture factors of log standard deviation {gene_bias:g}" if gene_bias > 0 else "",
    )
    return DepthAugmentation(
        counts,
        library,
        model.n_bins,
        library_normalised=model.normalization == "library",
        tokens=tokens,
        rows=rows,
        min_depth=min_depth,
        gene_bias=gene_bias,
        seed=seed,
    )
