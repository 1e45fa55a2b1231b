"""``scbert embed``: a cell embedding into a copy of the ``.h5ad``, streamed and resumable as ``scbert annotate``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._common import check_input, check_output_file, compute_options, input_options, stream_kwargs, stream_options

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = sub.add_parser(
        "embed",
        help="embed the cells of a .h5ad with a model (for neighbours, UMAP, clustering)",
        description="Write a cell embedding (obsm[KEY]) into a copy of the .h5ad, streamed and resumable as "
        "scbert annotate.",
    )
    p.add_argument("input", type=Path, metavar="IN.h5ad", help="cells to embed")
    p.add_argument("--model", required=True, help="a trained model's folder (scbert finetune or pretrain)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad", help="embedded .h5ad to write")
    p.add_argument(
        "--representation",
        choices=["genes", "classifier"],
        default="genes",
        help="'genes': mean of the final gene vectors (default); 'classifier': the classifier's last hidden layer",
    )
    p.add_argument("--key-added", default="X_scbert", help="obsm key of the embedding (default: X_scbert)")
    stream_options(p)
    input_options(p)
    compute_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from .._scbert import ScBERT
    from ..tl._files import embed_file

    check_output_file(args.out, overwrite=args.overwrite)
    check_input(args.input)
    model = ScBERT.load(args.model)
    n = embed_file(
        args.input,
        args.out,
        model,
        representation=args.representation,
        key_added=args.key_added,
        **stream_kwargs(args),
    )
    if n is not None:  # the process that wrote the output (process 0 under torchrun)
        print(f"Embedded {n} cells -> {args.out} (obsm[{args.key_added!r}])")
    return 0
