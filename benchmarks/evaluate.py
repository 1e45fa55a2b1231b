"""Cross-validate scBERT (compact config) beside L1 logistic regression on the real data sets.

    python benchmarks/evaluate.py pbmc3k --epochs 6 --out docs/_static/cv_pbmc3k.json
    python benchmarks/evaluate.py pbmc68k --epochs 15 --out docs/_static/cv_pbmc68k.json

``pbmc3k`` reads ``../shared/data/pbmc3k_counts.h5ad`` (raw counts, ``cell_type``); ``pbmc68k`` is
scanpy's bundled ``pbmc68k_reduced`` (``.raw``: log1p, ``bulk_labels``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PBMC3K = HERE.parent.parent / "shared" / "data" / "pbmc3k_counts.h5ad"


def load(name: str):
    import anndata as ad
    import scanpy as sc

    if name == "pbmc3k":
        return ad.read_h5ad(PBMC3K), "cell_type"
    data = sc.datasets.pbmc68k_reduced()
    adata = data.raw.to_adata()
    adata.obs = data.obs.copy()
    return adata, "bulk_labels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=["pbmc3k", "pbmc68k"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: finetune's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine per-fold result files and print the table")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return

    import logging

    import scbert_tl as scbert

    scbert.settings.verbosity = 1  # no progress bars; fold results still logged:
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("scbert_tl.tl._evaluation").setLevel(logging.INFO)
    adata, key = load(args.data)
    t0 = time.perf_counter()
    frame = scbert.tl.cross_validate(
        adata,
        key,
        model="compact",
        n_splits=args.folds,
        finetune_kwargs={
            "epochs": args.epochs,
            "patience": args.patience,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        folds=args.fold,
        rng=args.seed,
    )
    summary = adata.uns["scbert_cv"]["summary"]
    print(frame[["method", "fold", "accuracy", "macro_f1", "seconds"]].to_string(index=False))
    print(summary.to_string(index=False))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    result = {
        "data": args.data,
        "cells": adata.n_obs,
        "args": vars(args) | {"out": str(args.out)},
        "summary": summary.to_dict(orient="records"),
        "folds": frame.to_dict(orient="records"),
        "seconds": time.perf_counter() - t0,
        "machine": f"{os.cpu_count()} cores of {cpu}",
        "torch": __import__("torch").__version__,
        "scbert_tl": scbert.__version__,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")


def merge(paths: list[Path], out: Path | None) -> None:
    """One table from result files of disjoint folds of the same cross-validation."""
    import pandas as pd

    parts = [json.loads(p.read_text()) for p in paths]
    frame = pd.DataFrame([row for part in parts for row in part["folds"]]).sort_values(["method", "fold"])
    if frame.duplicated(["method", "repeat", "fold"]).any():
        raise SystemExit("the files overlap: the same fold appears twice")
    summary = frame.groupby("method", sort=False)[["accuracy", "macro_f1"]].agg(["mean", "std"])
    print(frame[["method", "fold", "accuracy", "macro_f1", "seconds"]].to_string(index=False))
    print(summary.round(3).to_string())
    if out:
        merged = parts[0] | {
            "folds": frame.to_dict(orient="records"),
            "summary": [
                {"method": m, **{f"{a}_{b}": float(v) for (a, b), v in row.items()}} for m, row in summary.iterrows()
            ],
            "seconds": sum(p["seconds"] for p in parts),
        }
        merged["args"]["fold"] = sorted(int(f) for f in frame["fold"].unique())
        out.write_text(json.dumps(merged, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
