"""Time of the attention-received computation against a plain forward pass (``encode``), same cells, same network.

``scbert_tl.model.attention_received`` runs the encoder block by block and, in each block, computes the
attention output and the column sums of every head's FAVOR+ attention matrix from the same features.
This script times it against ``ScBERTNetwork.encode`` on the same random (sparse, cell-like) tokens,
alternating the two and keeping the best of the timed repeats of each, and prints the ratio of the
wall-clock times and of the process CPU times (on a shared machine the CPU-time ratio is the steadier
one: other processes' load stretches wall-clock time but not the CPU time this process uses).

Examples
--------
The published configuration (16,907 positions) on CPU, a few cells::

    python benchmarks/bench_attention.py --config full --cells 2 --repeats 3

The compact configuration (2,001 positions), more cells::

    python benchmarks/bench_attention.py --config compact --cells 64 --batch-size 32

On CUDA (bf16 autocast for the matrix products, as the tools use by default)::

    python benchmarks/bench_attention.py --config full --cells 64 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from scbert_tl.model import ScBERTConfig, ScBERTNetwork, attention_received
from scbert_tl.train import autocast

#: Configurations: the published full scBERT and the CPU-sized compact model (as ``model="compact"``).
CONFIGS = {
    "full": {"n_genes": 16906, "dim": 200, "depth": 6, "heads": 10, "dim_head": 64, "ff_mult": 4},
    "compact": {"n_genes": 2000, "dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "ff_mult": 4},
}


def _tokens(cells: int, n_genes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.85, 0.06, 0.04, 0.025, 0.015, 0.01])  # ~85% zeros, the rest over the bins
    return torch.multinomial(probs, cells * n_genes, replacement=True, generator=g).view(cells, n_genes).to(torch.int8)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fn, tokens: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn`` over all cells."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast(device, dtype):
        for i in range(0, tokens.shape[0], batch_size):
            fn(tokens[i : i + batch_size].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a summary and return it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="cells per pass (default: all cells)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["float32", "bf16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each, alternating")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "float32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch_size = args.batch_size or args.cells
    torch.manual_seed(0)
    config = ScBERTConfig(**CONFIGS[args.config], gene_emb_trainable=args.config != "full")
    network = ScBERTNetwork(config).eval().to(device)
    tokens = _tokens(args.cells, config.n_genes, seed=0)
    fns = {"encode": network.encode, "attention": lambda x: attention_received(network, x)}

    for _ in range(args.warmup):
        for fn in fns.values():
            _time(fn, tokens[:batch_size], batch_size, device, dtype)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            w, c = _time(fn, tokens, batch_size, device, dtype)
            wall[name].append(w)
            cpu[name].append(c)
    best = {name: min(t) for name, t in wall.items()}
    best_cpu = {name: min(t) for name, t in cpu.items()}
    result = {
        "config": args.config,
        "positions": config.seq_len,
        "cells": args.cells,
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "best_wall_seconds": best,
        "best_cpu_seconds": best_cpu,
        "cells_per_second": {name: args.cells / t for name, t in best.items()},
        "ratio_wall": best["attention"] / best["encode"],
        "ratio_cpu": best_cpu["attention"] / best_cpu["encode"],
    }
    print(
        f"{args.config} ({config.seq_len} positions), {args.cells} cells in batches of {batch_size}, "
        f"{result['device']}, {precision}, {result['threads']} threads, torch {torch.__version__}, "
        f"load average {result['load_average']}"
    )
    for name in fns:
        print(
            f"  {name:<10} best {best[name]:8.3f} s wall ({args.cells / best[name]:8.2f} cells/s), "
            f"{best_cpu[name]:8.3f} s CPU; wall: " + ", ".join(f"{t:.3f}" for t in wall[name])
        )
    print(f"  attention / encode = {result['ratio_wall']:.2f} (wall), {result['ratio_cpu']:.2f} (process CPU time)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
