"""Benchmark pretraining at the full scBERT configuration (16,906 genes + 1 position): throughput and peak memory.

Each configuration runs in a fresh process (so ``ru_maxrss`` is that run's peak) through
``scbert_tl.train.pretrain_network``: masking, forward, backward and AdamW on a handful of cells.
Tokens are PBMC3k binned to the scBERT panel when ``../shared/data`` is beside the project
(about 770 non-zero tokens per cell), otherwise synthetic cells with the same sparsity.

    python benchmarks/bench_pretrain.py                       # CPU: batch 1 and 2, with and without checkpointing
    python benchmarks/bench_pretrain.py --device cuda --batch-sizes 1 4 8 --steps 10

Reported per configuration: seconds per optimiser step (median over the steps after the first),
cells/s from that, end-to-end cells/s (first step included), peak resident memory (CPU) or peak
allocated GPU memory (CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
N_GENES = 16906


def tokens(n_cells: int, seed: int = 0) -> tuple[sp.csr_matrix, str]:
    """Panel-order int8 tokens of ``n_cells`` cells: real PBMC3k when available, else synthetic."""
    counts, panel = SHARED / "pbmc3k_counts.h5ad", SHARED / "scbert_panglao_genes.txt"
    if counts.exists() and panel.exists():
        import anndata as ad

        import scbert_tl as scbert
        from scbert_tl.data import to_panel_csr

        a = ad.read_h5ad(counts)[:n_cells].copy()
        scbert.pp.bin(a, panel=panel.read_text().split(), aliases=None)
        return to_panel_csr(a.layers["scbert_bins"], a.var["scbert_panel_index"].to_numpy(), N_GENES), "PBMC3k"
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, N_GENES, density=770 / N_GENES, format="csr", random_state=seed)
    m.data = rng.choice([1, 2, 3, 4, 5], size=m.nnz, p=[0.1, 0.55, 0.19, 0.07, 0.09]).astype(np.int8)
    return m, "synthetic"


def run(batch_size: int, steps: int, checkpointing: bool, device: str, threads: int | None) -> dict:
    import torch

    import scbert_tl as scbert
    from scbert_tl.data import MemorySource
    from scbert_tl.model import ScBERTConfig, ScBERTNetwork
    from scbert_tl.train import _step, pretrain_network

    if threads:
        torch.set_num_threads(threads)
    scbert.settings.verbosity = 1
    x, kind = tokens(batch_size * (steps + 1))
    torch.manual_seed(0)
    net = ScBERTNetwork(ScBERTConfig())  # the full configuration
    times: list[float] = []
    orig = _step.train_step

    def timed(*args, **kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = orig(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        return out

    _step.train_step = timed
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pretrain_network(
        net,
        [MemorySource(x)],
        max_steps=steps + 1,
        batch_size=batch_size,
        validation_size=0,
        chunk_size=x.shape[0],
        gradient_checkpointing=checkpointing,
        device=device,
    )
    total = time.perf_counter() - t0
    step = float(np.median(times[1:])) if len(times) > 1 else times[0]
    out = {
        "device": device,
        "tokens": kind,
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "steps_timed": len(times) - 1,
        "threads": torch.get_num_threads(),
        "s_per_step": round(step, 3),
        "cells_per_s": round(batch_size / step, 4),
        "cells_per_s_end_to_end": round(batch_size * (steps + 1) / total, 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "mean_nonzero_tokens": round(x.nnz / x.shape[0], 1),
    }
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.one:
        b, ckpt = args.one.split(",")
        print(json.dumps(run(int(b), args.steps, ckpt == "1", args.device, args.threads)))
        return
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    for b in args.batch_sizes:
        for ckpt in modes:
            cmd = [sys.executable, __file__, "--one", f"{b},{int(ckpt)}", "--steps", str(args.steps)]
            cmd += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"batch_size": b, "gradient_checkpointing": ckpt, "error": proc.stderr[-500:]}))
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
