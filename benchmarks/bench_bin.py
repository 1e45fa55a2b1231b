"""Benchmark ``scbert.pp.bin`` on a large synthetic count matrix: wall time and peak memory.

Target (issue: pp.bin): 100,000 cells x 33,000 genes of sparse counts at 5-10% density, under 30 s and
under 4 GB peak memory on 2 cores.

The matrix is generated in one process and saved; a fresh process loads it and bins it, so its peak
resident memory (``ru_maxrss``) is the input plus what ``pp.bin`` needs::

    python benchmarks/bench_bin.py --cells 100000 --genes 33000 --density 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

PANEL_SIZE = 16906


def generate(path: Path, n_cells: int, n_genes: int, density: float, seed: int = 0) -> None:
    """Counts with per-gene expression rates spread over orders of magnitude, like real droplet data."""
    rng = np.random.default_rng(seed)
    rates = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)
    p = rates / rates.sum() * density * n_genes
    p = np.clip(p, 0, 1)
    chunks = []
    for start in range(0, n_cells, 1000):
        n = min(1000, n_cells - start)
        mask = rng.random((n, n_genes), dtype=np.float32) < p.astype(np.float32)
        rows, cols = np.nonzero(mask)
        values = 1 + rng.poisson(0.7 * rates[cols]).astype(np.float32)
        chunks.append(sp.csr_matrix((values, (rows, cols)), shape=(n, n_genes), dtype=np.float32))
    sp.save_npz(path, sp.vstack(chunks, format="csr"), compressed=False)


def run(path: Path, chunk_size: int) -> dict:
    import anndata as ad
    import pandas as pd

    import scbert_tl as scbert

    scbert.settings.verbosity = 1
    X = sp.load_npz(path)
    n_genes = X.shape[1]
    rng = np.random.default_rng(1)
    genes = np.array([f"G{i}" for i in range(n_genes)])[rng.permutation(n_genes)]  # panel genes scattered
    adata = ad.AnnData(X, var=pd.DataFrame(index=genes))
    panel = [f"G{i}" for i in range(PANEL_SIZE)]
    rss_input = _current_rss_gib()
    t0 = time.perf_counter()
    scbert.pp.bin(adata, panel=panel, aliases=None, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "cells": X.shape[0],
        "genes": n_genes,
        "nnz": int(X.nnz),
        "density": X.nnz / (X.shape[0] * n_genes),
        "seconds": seconds,
        "peak_rss_gib": peak,
        "input_rss_gib": rss_input,
        "bins_nnz": int(adata.layers["scbert_bins"].nnz),
        "chunk_size": chunk_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=33_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--_run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        print(json.dumps(run(args._run, args.chunk_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counts.npz"
        t0 = time.perf_counter()
        generate(path, args.cells, args.genes, args.density)
        print(f"generated {args.cells} x {args.genes} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cmd = [sys.executable, __file__, "--_run", str(path), "--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu"] = _cpu_name()
    result["cores"] = os.cpu_count()
    result["load_average_1min"] = os.getloadavg()[0]  # other work on the machine inflates the time
    print(json.dumps(result, indent=1))
    print(
        f"pp.bin: {result['cells']:,} cells x {result['genes']:,} genes, {result['nnz']:,} non-zeros "
        f"({100 * result['density']:.1f}%): {result['seconds']:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB "
        f"(before binning, with the input loaded: {result['input_rss_gib']:.2f} GiB) on {result['cores']} cores of "
        f"{result['cpu']} (load average {result['load_average_1min']:.1f})"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
