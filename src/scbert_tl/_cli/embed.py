"""``scbert embed``: a cell embedding into a copy of the ``.h5ad``, streamed and resumable as ``scbert annotate``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._streamed import run_streamed, streamed_options, streamed_parser

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = streamed_parser(
        sub,
        "embed",
        "embed the cells of a .h5ad with a model (for neighbours, UMAP, clustering)",
        "Write a cell embedding (obsm[KEY]) into a copy of the .h5ad, streamed and resumable as scbert annotate.",
        cells="cells to embed",
        model="a trained model's folder (scbert finetune or pretrain)",
        out="embedded .h5ad to write",
        key_added=("X_scbert", "obsm key of the embedding (default: X_scbert)"),
    )
    p.add_argument(
        "--representation",
        choices=["genes", "classifier"],
        default="genes",
        help="'genes': mean of the final gene vectors (default); 'classifier': the classifier's last hidden layer",
    )
    return streamed_options(p)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    n = run_streamed(
        args,
        "embed_file",
        representation=args.representation,
    )
    if n is not None:  # the process that wrote the output (process 0 under torchrun)
        print(f"Embedded {n} cells -> {args.out} (obsm[{args.key_added!r}])")
    return 0
